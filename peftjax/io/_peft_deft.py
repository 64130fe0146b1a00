# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``DEFT`` tensors and config, per module.

PEFT (``tuners/deft``) stores, per Linear module, ``deft_P`` ``(out, r)``
and, unless ``para``, ``deft_R`` ``(r, in)`` (``r`` capped at ``out``), with
``W' = (I − P_proj) W + s·Q_P R`` in torch's ``(out, in)`` layout. peftjax's
``DeFTParams`` holds ``p = deft_P`` untransposed and ``inject = deft_Rᵀ``.
Config: ``r``, ``decomposition_method``, ``alpha``, ``para``,
``init_weights`` and ``init_scale`` (inert once the tensors are saved) are
honoured; ``deft_dropout`` (PEFT drops the injection's input only),
``fan_in_fan_out`` and ``bias`` only at their defaults. The ``"qr"``
projector's injection depends on the signs of ``P``'s QR factor, which JAX
and torch both take from LAPACK's Householder QR.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_P, _R = "deft_P", "deft_R"
_FIELDS = ("rank", "decomposition", "alpha", "para", "init_weights", "init_scale")


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    rank = int(c.get("r", 8))
    r = min(rank, m.dims.n_out)
    para = bool(c.get("para", False))
    p = m.tensors[_P]
    if tuple(p.shape) != (m.dims.n_out, r):
        raise ValueError(f"load_peft: {m.module!r} has {_P} {tuple(p.shape)}; r={rank} in "
                         f"{m.source} gives (out={m.dims.n_out}, {r})")
    if (_R in m.tensors) == para:
        raise ValueError(f"load_peft: {m.module!r} {'has' if not para else 'lacks'} {_R} "
                         f"but para={para} in {m.source}")
    if not para and tuple(m.tensors[_R].shape) != (r, m.dims.n_in):
        raise ValueError(f"load_peft: {m.module!r} has {_R} {tuple(m.tensors[_R].shape)}; "
                         f"r={rank} in {m.source} gives ({r}, in={m.dims.n_in})")
    alpha = c.get("alpha")
    adapter = _adapters.deft(
        rank, decomposition=str(c.get("decomposition_method", "relu")),
        alpha=float(alpha) if alpha else None, para=para,
        init_weights=bool(c.get("init_weights", True)),
        init_scale=float(c.get("init_scale", 1.0)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    inject = None if para else jnp.asarray(m.tensors[_R].T, m.dtype)
    return adapter, _adapters.DeFTParams(jnp.asarray(p, m.dtype), inject), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "decomposition" not in hp or not isinstance(m.trainable, _adapters.DeFTParams):
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.deft adapter")
    tensors = {_P: np.ascontiguousarray(np.asarray(m.trainable.p))}
    if m.trainable.inject is not None:
        tensors[_R] = _peft_tuner.transposed(m.trainable.inject)
    return tensors, tuple(hp[k] for k in _FIELDS)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    found = set(infos.values())
    if len(found) != 1:
        raise ValueError("save_peft: one PEFT DEFT adapter has one r, decomposition, "
                         f"alpha and para setting; the modules have "
                         f"{sorted(found, key=repr)} ({', '.join(_FIELDS)})")
    v = dict(zip(_FIELDS, found.pop(), strict=True))
    alpha = v["alpha"]
    if alpha is not None and alpha != int(alpha):
        raise ValueError(f"save_peft: PEFT's DEFT alpha is an integer; got {alpha}")
    return {"r": v["rank"], "decomposition_method": v["decomposition"],
            "alpha": None if alpha is None else int(alpha), "para": v["para"],
            "init_weights": v["init_weights"], "init_scale": v["init_scale"],
            "deft_dropout": 0.0, "fan_in_fan_out": False, "bias": "none"}, {}


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="DEFT",
    params_types=(_adapters.DeFTParams,),
    suffixes=(_P, _R),
    build=_build,
    write=_write,
    config=_config,
    required=lambda found: {_P} | (found & {_R}),
    honoured=frozenset({"r", "decomposition_method", "alpha", "para", "init_weights",
                        "init_scale", "layers_to_transform", "layers_pattern"}),
    defaults={"deft_dropout": 0.0, "fan_in_fan_out": False, "bias": "none"},
    field_types={
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "a positive integer"),
        "decomposition_method": (lambda v: v in ("relu", "qr"), "'relu' or 'qr'"),
        "alpha": (lambda v: _number(v) and v >= 0, "a non-negative number"),
        "para": (_flag, "true or false"),
        "init_weights": (_flag, "true or false"),
        "init_scale": (_number, "a number"),
    },
)
