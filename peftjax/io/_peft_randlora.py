# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``RANDLORA`` tensors and config, per module.

PEFT (``tuners/randlora``) stores, per Linear module,
``randlora_lambda`` ``(r, n)`` and ``randlora_gamma`` ``(n, s)`` (the layout
of ``peftjax.adapters.RandLoRAParams``), plus the shared bases twice: once as
``base_model.randlora_A`` ``(r, 1, s_max)`` / ``base_model.randlora_B``
``(L_max, n_max, r)`` and once per module (``<module>.randlora_A`` /
``randlora_B``, the same arrays). ``s_max``/``L_max`` are the smaller/larger of
the largest targeted output and input widths. peftjax holds the bases once
(``AdapterState.frozen["@shared"]``).

The bases must be in the file (``save_projection=True``, PEFT's default):
PEFT would otherwise regenerate them with torch's generator, which peftjax
cannot reproduce, so ``save_projection=False`` is refused; ``save_peft``
always writes them, sliced to the shapes PEFT computes from the written
modules. Config: ``r``, ``randlora_alpha``, ``projection_prng_key``,
``sparse``/``very_sparse`` (which generator made the bases), ``randlora_dropout``
and ``init_weights`` (inert once trained) are honoured; ``fan_in_fan_out`` and
``bias`` only at their defaults.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_SUFFIXES = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
_SHARED = ("base_model.randlora_A", "base_model.randlora_B")
_NAME = "randlora"


def _bases_kind(config: Mapping[str, Any]) -> _adapters.RandLoRABases:
    if config.get("very_sparse"):
        return _adapters.RandLoRABases.VERY_SPARSE
    if config.get("sparse"):
        return _adapters.RandLoRABases.SPARSE
    return _adapters.RandLoRABases.DENSE


def _shared_bases(shared: Mapping[str, np.ndarray], source: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(A (r, 1, s_max), B (L_max, n_max, r))``, checked."""
    if set(shared) != set(_SHARED):
        raise ValueError(f"load_peft: the RandLoRA file of {source} lacks "
                         f"{sorted(set(_SHARED) - set(shared))} (has {sorted(shared)}); "
                         "save it with save_projection=True")
    a, b = shared[_SHARED[0]], shared[_SHARED[1]]
    if a.ndim != 3 or a.shape[1] != 1 or b.ndim != 3 or b.shape[2] != a.shape[0]:
        raise ValueError(f"load_peft: base_model.randlora_A {a.shape} / randlora_B "
                         f"{b.shape} in {source} are not (r, 1, s_max) / "
                         "(L_max, n_max, r)")
    return a, b


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    a, b = _shared_bases(m.shared, m.source)
    r = int(m.config.get("r", 32))
    if a.shape[0] != r:
        raise ValueError(f"load_peft: base_model.randlora_A {a.shape} has rank "
                         f"{a.shape[0]} but r={r} in {m.source}")
    for name, full in (("randlora_A", a), ("randlora_B", b)):
        copy = m.tensors.get(name)
        if copy is not None and not np.array_equal(copy, full):
            raise ValueError(f"load_peft: {m.module!r}.{name} {copy.shape} differs from "
                             f"base_model.{name} {full.shape} (PEFT shares one array)")
    small, large = min(m.dims.n_in, m.dims.n_out), max(m.dims.n_in, m.dims.n_out)
    n = -(-small // r)
    lam, gamma = m.tensors["randlora_lambda"], m.tensors["randlora_gamma"]
    if lam.shape != (r, n) or gamma.shape != (n, small):
        raise ValueError(f"load_peft: {m.module!r} (in={m.dims.n_in}, out="
                         f"{m.dims.n_out}) has randlora_lambda {lam.shape} / "
                         f"randlora_gamma {gamma.shape}; r={r} ({m.source}) needs "
                         f"({r}, {n}) / ({n}, {small})")
    if small > a.shape[2] or large > b.shape[0] or n > b.shape[1]:
        raise ValueError(f"load_peft: {m.module!r} (in={m.dims.n_in}, out="
                         f"{m.dims.n_out}) does not fit the shared bases A {a.shape} "
                         f"/ B {b.shape}")
    adapter = _adapters.randlora(
        r, max_in=int(a.shape[2]), max_out=int(b.shape[0]),
        alpha=float(m.config.get("randlora_alpha", 640)),
        projection_seed=int(m.config.get("projection_prng_key", 0)),
        bases=_bases_kind(m.config), init_weights=bool(m.config.get("init_weights", True)),
        shared_name=_NAME, dropout=float(m.config.get("randlora_dropout", 0.0)),
        dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    placeholders = _adapters.RandLoRABasis(a=_adapters.Shared(f"{_NAME}_A"),
                                           b=_adapters.Shared(f"{_NAME}_B"))
    return (adapter, _adapters.RandLoRAParams(jnp.asarray(lam, m.dtype),
                                              jnp.asarray(gamma, m.dtype)), placeholders)


def _shared_frozen(shared: Mapping[str, np.ndarray], config: Mapping[str, Any],
                   dtype: Any) -> dict[str, Any]:
    a, b = _shared_bases(shared, "the config")
    return {_adapters.SHARED: {f"{_NAME}_A": jnp.asarray(a[:, 0, :], dtype),
                               f"{_NAME}_B": jnp.asarray(b, dtype)}}


def _resolve(x: Any, m: _peft_tuner.ModuleWrite) -> np.ndarray:
    if isinstance(x, _adapters.Shared):
        x = m.state.frozen.get(_adapters.SHARED, {}).get(x.name)
        if x is None:
            raise ValueError(f"save_peft: the state has no shared RandLoRA bases for "
                             f"{m.path!r}")
    return np.asarray(jax.device_get(x), np.float32)


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "bases" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.randlora adapter")
    t = m.trainable
    a, b = _resolve(m.frozen.a, m), _resolve(m.frozen.b, m)
    tensors = {"randlora_lambda": np.ascontiguousarray(np.asarray(jax.device_get(t.lam))),
               "randlora_gamma": np.ascontiguousarray(np.asarray(jax.device_get(t.gamma)))}
    info = (hp["rank"], hp["alpha"], hp["projection_seed"], hp["bases"],
            hp["init_weights"], m.adapter.dropout, (m.dims.n_in, m.dims.n_out), a, b)
    return tensors, info


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    """One config; the shared bases sliced to PEFT's shapes, once and per module."""
    fields = {i[:6] for i in infos.values()}
    if len(fields) > 1:
        raise ValueError("save_peft: one PEFT RandLoRA adapter has one r, "
                         "randlora_alpha, projection_prng_key, basis kind, init_weights "
                         f"and dropout; got {sorted(fields, key=repr)}")
    r, alpha, seed, kind, init_weights, dropout = fields.pop()
    first = next(iter(infos.values()))
    for module, info in infos.items():
        if not (np.array_equal(info[7], first[7]) and np.array_equal(info[8], first[8])):
            raise ValueError(f"save_peft: {module!r} reads other RandLoRA bases than "
                             "the other modules; one PEFT file holds one pair")
    max_out = max(i[6][1] for i in infos.values())
    max_in = max(i[6][0] for i in infos.values())
    small, large = min(max_in, max_out), max(max_in, max_out)
    a = np.ascontiguousarray(first[7][:, None, :small])
    b = np.ascontiguousarray(first[8][:large, :-(-small // r), :])
    shared = {_SHARED[0]: a, _SHARED[1]: b}
    for module in infos:
        shared[f"base_model.model.{module}.randlora_A"] = a
        shared[f"base_model.model.{module}.randlora_B"] = b
    return {"r": r, "randlora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "projection_prng_key": seed, "save_projection": True,
            "sparse": kind == _adapters.RandLoRABases.SPARSE.value,
            "very_sparse": kind == _adapters.RandLoRABases.VERY_SPARSE.value,
            "randlora_dropout": dropout, "init_weights": init_weights,
            "fan_in_fan_out": False, "bias": "none"}, shared


def _check(config: Mapping[str, Any], source: str) -> list[str]:
    if config.get("save_projection") is False:
        return ["save_projection=False (PEFT would regenerate the bases with torch's "
                "generator, which peftjax cannot reproduce; save them)"]
    return []


def _needs(found: set[str]) -> set[str]:
    """lambda and gamma; the per-module copies of the bases both or neither."""
    copies = {"randlora_A", "randlora_B"}
    return {"randlora_lambda", "randlora_gamma"} | (copies if found & copies else set())


TUNER = _peft_tuner.Tuner(
    peft_type="RANDLORA",
    params_types=(_adapters.RandLoRAParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "randlora_alpha", "projection_prng_key", "save_projection",
                        "sparse", "very_sparse", "randlora_dropout", "init_weights",
                        "layers_to_transform", "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none"},
    field_types={
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "a positive int"),
        "randlora_alpha": (lambda v: isinstance(v, (int, float))
                           and not isinstance(v, bool), "a number"),
        "projection_prng_key": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                                "an int"),
        "randlora_dropout": (lambda v: isinstance(v, (int, float))
                             and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
    },
    required=_needs,
    is_shared=lambda key: key in _SHARED,
    check=_check,
    shared_frozen=_shared_frozen,
)
