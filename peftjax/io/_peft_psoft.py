# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``PSOFT`` tensors and config, per module.

PEFT (``tuners/psoft``) stores, per Linear module, only the rotation's
parameters: ``psoft_R.weight`` (``(r(r−1)/2,)``, the upper entries of the
skew-symmetric ``Q`` in ``triu_indices`` order; ``(r, r)``, ``R`` itself, with
``psoft_orth=False``) and, with ``psoft_mag_b``/``psoft_mag_a``, the ``(r,)``
scales ``psoft_R.vector_b``/``psoft_R.vector_a``. peftjax's ``PSOFTParams``
holds the same arrays untransposed (they live in the ``r``-dimensional
subspace, not on a side of the weight).

The frozen factors ``A``/``B`` are not in the file: PEFT recomputes them from
the base weight by a float32 SVD when it builds the adapter, and so does
``load_peft`` (``adapters.psoft_basis`` on the CPU, from the params it is
given). The update depends on the singular vectors' signs, which each LAPACK
picks its own way: the loaded adapter gives PEFT's outputs where peftjax's
SVD (LAPACK ``gesdd`` through JAX on the CPU) and PEFT's (torch's, MKL on a
CPU) agree on the signs of the leading ``r`` singular vectors, which they do
on the tiny test models' square weights and on ``out >= 2·in`` ones but not
on all shapes (a flipped vector conjugates ``R`` by a sign; outputs then
differ, as PEFT's own do between its CPU and GPU SVDs). ``load_peft`` and
``save_peft`` therefore warn on every PSOFT file (``SIGN_WARNING``).

Config: ``r`` (checked against the tensors), ``psoft_alpha``,
``ab_svd_init``, ``psoft_orth``, ``psoft_mag_b``, ``psoft_mag_a``,
``use_cayley_neumann``, ``num_cayley_neumann_terms``, ``cayley_neumann_eps``,
``init_weights`` and ``psoft_dropout`` are honoured, ``random_seed`` and
``psoft_svd_lowrank_niter`` are inert with the full SVD; ``psoft_svd`` only
``"full"`` (PEFT's ``"lowrank"`` draws torch's random sketch) and
``fan_in_fan_out`` only False.

Exports: ``TUNER``.
"""

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

SIGN_WARNING = (
    "PSOFT files hold no singular vectors: the reader recomputes them from the "
    "base weight with its own SVD (PEFT: torch's; peftjax: LAPACK through JAX on "
    "the CPU), and the update depends on their signs, which LAPACK builds choose "
    "differently on most non-square weights (on SmolLM2's 576x1536 MLP weights "
    "most of the leading vectors differ between torch and JAX). Outputs then "
    "differ between PEFT and peftjax, as they do between PEFT's own CPU and GPU "
    "loads; compare a few outputs before relying on a PSOFT file across "
    "libraries or devices")

_W, _B, _A = "psoft_R.weight", "psoft_R.vector_b", "psoft_R.vector_a"
_FIELDS = ("rank", "alpha", "init", "orth", "mag_b", "mag_a", "use_cayley_neumann",
           "num_cayley_neumann_terms", "cayley_neumann_eps", "init_weights", "dropout")


def _basis(m: _peft_tuner.ModuleRead, rank: int, alpha: float, init: str):
    """PEFT's ``A``/``B`` of this module from its base weight, on the CPU."""
    warnings.warn(f"load_peft: {SIGN_WARNING}", UserWarning, stacklevel=2)
    if m.base is None:
        raise ValueError(f"load_peft: PSOFT needs {m.module!r}'s base weight")
    w = np.asarray(m.base(), np.float32).T  # torch (out, in)
    with jax.default_device(jax.devices("cpu")[0]):
        f = _adapters.psoft_basis(w.T, rank, alpha=alpha, init=init)
        return _adapters.PSOFTBasis(*(np.asarray(x) for x in f))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    r = int(c.get("r", 32))
    orth = bool(c.get("psoft_orth", True))
    mag_b, mag_a = bool(c.get("psoft_mag_b", True)), bool(c.get("psoft_mag_a", True))
    weight = m.tensors[_W]
    want = (r * (r - 1) // 2,) if orth else (r, r)
    if tuple(weight.shape) != want:
        raise ValueError(f"load_peft: {m.module!r} has {_W} {tuple(weight.shape)}; r={r}, "
                         f"psoft_orth={orth} in {m.source} give {want}")
    for name, flag, on in ((_B, "psoft_mag_b", mag_b), (_A, "psoft_mag_a", mag_a)):
        have = name in m.tensors
        if have != on:
            raise ValueError(f"load_peft: {m.module!r} {'has' if have else 'lacks'} "
                             f"{name} but {flag}={on} in {m.source}")
        if have and tuple(m.tensors[name].shape) != (r,):
            raise ValueError(f"load_peft: {m.module!r} has {name} "
                             f"{tuple(m.tensors[name].shape)}; r={r} gives ({r},)")
    if r > min(m.dims.n_in, m.dims.n_out):
        raise ValueError(f"load_peft: r={r} in {m.source} exceeds min(in, out) of "
                         f"{m.module!r} (in={m.dims.n_in}, out={m.dims.n_out}), as PEFT "
                         "refuses")
    alpha = float(c.get("psoft_alpha", 32))
    init = str(c.get("ab_svd_init", "psoft_init"))
    eps = c.get("cayley_neumann_eps")
    adapter = _adapters.psoft(
        r, alpha=alpha, init=init, orth=orth, mag_b=mag_b, mag_a=mag_a,
        use_cayley_neumann=bool(c.get("use_cayley_neumann", False)),
        num_cayley_neumann_terms=int(c.get("num_cayley_neumann_terms", 5)),
        cayley_neumann_eps=None if eps is None else float(eps),
        init_weights=bool(c.get("init_weights", True)),
        dropout=float(c.get("psoft_dropout", 0.0) or 0.0),
        param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)

    def arr(name):
        return jnp.asarray(m.tensors[name], m.dtype) if name in m.tensors else None

    t = _adapters.PSOFTParams(arr(_W), arr(_B), arr(_A))
    f = _basis(m, r, alpha, init)
    return adapter, t, _adapters.PSOFTBasis(jnp.asarray(f.a), jnp.asarray(f.b))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "mag_b" not in hp or not isinstance(m.trainable, _adapters.PSOFTParams):
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.psoft adapter")
    warnings.warn(f"save_peft: {SIGN_WARNING}", UserWarning, stacklevel=2)
    tensors = {}
    for name, x in ((_W, m.trainable.weight), (_B, m.trainable.vector_b),
                    (_A, m.trainable.vector_a)):
        if x is not None:
            tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    return tensors, tuple(hp[k] for k in _FIELDS)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    found = set(infos.values())
    if len(found) != 1:
        raise ValueError("save_peft: one PEFT PSOFT adapter has one r, psoft_alpha, "
                         "init and rotation setting; the modules have "
                         f"{sorted(found, key=repr)} ({', '.join(_FIELDS)})")
    v = dict(zip(_FIELDS, found.pop(), strict=True))
    alpha = v["alpha"]
    return {"r": v["rank"], "psoft_alpha": int(alpha) if alpha == int(alpha) else alpha,
            "ab_svd_init": v["init"], "psoft_orth": v["orth"], "psoft_mag_b": v["mag_b"],
            "psoft_mag_a": v["mag_a"], "use_cayley_neumann": v["use_cayley_neumann"],
            "num_cayley_neumann_terms": v["num_cayley_neumann_terms"],
            "cayley_neumann_eps": v["cayley_neumann_eps"],
            "init_weights": v["init_weights"], "psoft_dropout": v["dropout"],
            "psoft_svd": "full", "fan_in_fan_out": False}, {}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="PSOFT",
    params_types=(_adapters.PSOFTParams,),
    suffixes=(_W, _B, _A),
    build=_build,
    write=_write,
    config=_config,
    required=lambda found: {_W} | (found & {_B, _A}),
    honoured=frozenset({"r", "psoft_alpha", "ab_svd_init", "psoft_orth", "psoft_mag_b",
                        "psoft_mag_a", "use_cayley_neumann", "num_cayley_neumann_terms",
                        "cayley_neumann_eps", "init_weights", "psoft_dropout",
                        "random_seed", "psoft_svd_lowrank_niter",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"psoft_svd": "full", "fan_in_fan_out": False},
    field_types={
        "r": (lambda v: _int(v) and v > 0, "a positive integer"),
        "psoft_alpha": (lambda v: _number(v) and v > 0, "a positive number"),
        "ab_svd_init": (lambda v: v in ("psoft_init", "pissa_init"),
                        "'psoft_init' or 'pissa_init'"),
        "psoft_orth": (_flag, "true or false"),
        "psoft_mag_b": (_flag, "true or false"),
        "psoft_mag_a": (_flag, "true or false"),
        "use_cayley_neumann": (_flag, "true or false"),
        "init_weights": (_flag, "true or false"),
        "num_cayley_neumann_terms": (lambda v: _int(v) and v >= 1, "a positive integer"),
        "cayley_neumann_eps": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
        "psoft_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "random_seed": (_int, "an integer"),
        "psoft_svd_lowrank_niter": (_int, "an integer"),
    },
)
