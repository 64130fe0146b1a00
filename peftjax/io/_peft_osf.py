# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``OSF`` tensors and config, per module.

PEFT (``tuners/osf``) stores, per Linear module, only the trainable factors
``osf_svd_params.U_low`` ``(out, r)``, ``osf_svd_params.S_low`` ``(r,)`` and
``osf_svd_params.V_low`` ``(r, in)``; the frozen initial factors and the
preserved bases are non-persistent buffers that PEFT recomputes from an SVD
of the base weight when it loads a file. peftjax does the same (the SVD
of the module's base matrix, as ``osf``'s init takes it, with NumPy on the
host so that no module shape compiles a program): only the product of the
initial factors and the preserved subspaces enter the outputs and
gradients, and both are free of the SVD's signs, so the outputs agree with
PEFT's up to float32 rounding whenever the base's singular values at the
split are distinct. ``OSFParams``: ``v = V_low.T``, ``s = S_low``, ``u = U_low.T``.

Config: ``effective_rank`` (None, an int or a fraction in ``(0, 1]``),
``rank_pattern`` (matched with ``re.search`` on the module name, first key
first, as PEFT's OSF does, unlike LoRA's patterns) and ``init_weights`` are
honoured; ``target_svd_config``, which PEFT ignores, is accepted. A module
whose ``S_low`` disagrees with the rank the config gives is refused naming
it.

Exports: ``TUNER``.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_config, _peft_tuner

_SUFFIXES = ("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low")


def _effective_rank(config: Mapping[str, Any], module: str) -> Any:
    """PEFT's value for ``module``: ``rank_pattern`` (``re.search``) or ``effective_rank``."""
    value = config.get("effective_rank")
    for pattern, v in (config.get("rank_pattern") or {}).items():
        if re.search(pattern, module):
            value = v
            break
    if isinstance(value, float) and not 0 < value <= 1:
        value = int(value)  # PEFT: int(value) outside (0, 1]
    return value


def _basis(w: np.ndarray, k: int, dtype: Any) -> _adapters.OSFBasis:
    """``osf``'s frozen part of the ``(in, out)`` matrix ``w`` with ``k`` preserved
    (its ``init``'s SVD, on the host: no compile per module shape)."""
    left, sv, right_t = np.linalg.svd(np.asarray(w, np.promote_types(w.dtype, np.float32)),
                                      full_matrices=False)
    parts = (left[:, k:], sv[k:], right_t[k:, :], left[:, :k], right_t[:k, :].T)
    return _adapters.OSFBasis(*(jnp.asarray(x, dtype) for x in parts))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    value = _effective_rank(m.config, m.module)
    n_in, n_out = m.dims.n_in, m.dims.n_out
    k = _adapters.osf_rank(value, n_in, n_out)
    r = min(n_in, n_out) - k
    u, s, v = (m.tensors[x] for x in _SUFFIXES)
    if (tuple(u.shape), tuple(s.shape), tuple(v.shape)) != ((n_out, r), (r,), (r, n_in)):
        raise ValueError(
            f"load_peft: {m.module!r} has U_low {tuple(u.shape)}, S_low {tuple(s.shape)}, "
            f"V_low {tuple(v.shape)}; {m.source} (effective_rank or rank_pattern: "
            f"{value!r} for this module) preserves {k} of min(in={n_in}, out={n_out}): expected "
            f"{(n_out, r)}, {(r,)}, {(r, n_in)}")
    init = bool(m.config.get("init_weights", True))
    # The frozen part as PEFT rebuilds it: the SVD of this module's base matrix.
    w = np.asarray(m.base())  # (n_in, n_out), one layer
    frozen = _basis(w, k, m.dtype)
    adapter = _adapters.osf(value, init_weights=init, param_dtype=m.dtype,
                            dimension_numbers=m.dimension_numbers)
    t = _adapters.OSFParams(jnp.asarray(v.T, m.dtype), jnp.asarray(s, m.dtype),
                            jnp.asarray(u.T, m.dtype))
    return adapter, t, frozen


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "effective_rank" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.osf adapter")
    t = m.trainable
    host = lambda x: np.ascontiguousarray(np.asarray(jax.device_get(x)))  # noqa: E731
    tensors = dict(zip(_SUFFIXES, (host(t.u).T, host(t.s), host(t.v).T), strict=True))
    return ({k: np.ascontiguousarray(x) for k, x in tensors.items()},
            (hp["effective_rank"], hp["init_weights"]))


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    inits = {i[1] for i in infos.values()}
    if len(inits) != 1:
        raise ValueError(f"save_peft: one PEFT OSF adapter has one init_weights; the "
                         f"modules have {sorted(inits)}")
    common, others = _peft_config.most_common({m: i[0] for m, i in infos.items()})
    pattern = {f"^{re.escape(m)}$": v for m, v in others.items()}
    return {"effective_rank": common, "rank_pattern": pattern or None,
            "init_weights": inits.pop(), "target_svd_config": None}, {}


def _rank(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)


TUNER = _peft_tuner.Tuner(
    peft_type="OSF",
    params_types=(_adapters.OSFParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"effective_rank", "rank_pattern", "init_weights",
                        "target_svd_config"}),  # the last one PEFT ignores too
    field_types={
        "effective_rank": (_rank, "null, a positive int or a fraction in (0, 1]"),
        "rank_pattern": (lambda v: isinstance(v, dict) and all(_rank(x) for x in v.values()),
                         "an object of positive ints or fractions in (0, 1]"),
        "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    },
)
