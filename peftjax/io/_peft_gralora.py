# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``GRALORA`` tensors and config, per module.

PEFT (``tuners/gralora``) stores per Linear module ``gralora_A`` ``(k, in/k,
r)`` and ``gralora_B`` ``(k, r, out/k)`` (input axis first already: peftjax's
``GraLoRAParams.a``/``b`` hold them as stored) and, with ``hybrid_r > 0``,
``gralora_A_general.weight`` ``(hybrid_r, in)`` and
``gralora_B_general.weight`` ``(out, hybrid_r)`` (transposed into
``a_hybrid``/``b_hybrid``). Config: ``r``, ``alpha``, ``gralora_k``,
``hybrid_r`` and ``gralora_dropout`` are honoured (one value for every
module: PEFT has no rank or alpha patterns for this type), ``init_weights``
is inert once trained; ``fan_in_fan_out`` and ``bias`` only at their
defaults.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_A, _B = "gralora_A", "gralora_B"
_HA, _HB = "gralora_A_general.weight", "gralora_B_general.weight"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _required(found: set[str]) -> set[str]:
    return {_A, _B, _HA, _HB} if found & {_HA, _HB} else {_A, _B}


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    r, k = int(c.get("r", 32)), int(c.get("gralora_k", 2))
    hybrid_r = int(c.get("hybrid_r", 0) or 0)
    n_in, n_out = m.dims.n_in, m.dims.n_out
    a, b = m.tensors[_A], m.tensors[_B]
    if n_in % k or n_out % k or r % k:
        raise ValueError(f"load_peft: {m.module!r} (in={n_in}, out={n_out}) with r={r} "
                         f"is not divisible by gralora_k={k} in {m.source}")
    want = {_A: (k, n_in // k, r), _B: (k, r, n_out // k)}
    if hybrid_r:
        if _HA not in m.tensors:
            raise ValueError(f"load_peft: {m.module!r} has no {_HA} / {_HB} but "
                             f"hybrid_r={hybrid_r} in {m.source}")
        want.update({_HA: (hybrid_r, n_in), _HB: (n_out, hybrid_r)})
    elif _HA in m.tensors:
        raise ValueError(f"load_peft: {m.module!r} has {_HA} / {_HB} but hybrid_r=0 "
                         f"in {m.source}")
    for name, shape in want.items():
        if tuple(m.tensors[name].shape) != shape:
            raise ValueError(
                f"load_peft: {m.module!r}.{name} has shape {m.tensors[name].shape}; "
                f"r={r}, gralora_k={k}, hybrid_r={hybrid_r} in {m.source} and the "
                f"module (in={n_in}, out={n_out}) give {shape}")
    t = _adapters.GraLoRAParams(
        a=jnp.asarray(a, m.dtype), b=jnp.asarray(b, m.dtype),
        a_hybrid=jnp.asarray(m.tensors[_HA].T, m.dtype) if hybrid_r else None,
        b_hybrid=jnp.asarray(m.tensors[_HB].T, m.dtype) if hybrid_r else None)
    adapter = _adapters.gralora(
        r, alpha=c.get("alpha", 64), gralora_k=k, hybrid_r=hybrid_r,
        dropout=float(c.get("gralora_dropout", 0.0) or 0.0),
        dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    return adapter, t, None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "gralora_k" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.gralora adapter")
    t = m.trainable
    tensors = {_A: np.ascontiguousarray(np.asarray(jax.device_get(t.a))),
               _B: np.ascontiguousarray(np.asarray(jax.device_get(t.b)))}
    if t.a_hybrid is not None:
        tensors[_HA] = _peft_tuner.transposed(t.a_hybrid)
        tensors[_HB] = _peft_tuner.transposed(t.b_hybrid)
    return tensors, (hp["rank"], hp["alpha"], hp["gralora_k"], hp["hybrid_r"],
                     hp["dropout"])


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    distinct = sorted(set(infos.values()))
    if len(distinct) > 1:
        raise ValueError(
            "save_peft: one PEFT GraLoRA adapter has one (r, alpha, gralora_k, "
            f"hybrid_r, gralora_dropout) for every module (no patterns); got {distinct}")
    r, alpha, k, hybrid_r, dropout = distinct[0]
    return {"r": r, "alpha": _number(alpha), "gralora_k": k, "hybrid_r": hybrid_r,
            "gralora_dropout": dropout, "fan_in_fan_out": False, "bias": "none",
            "init_weights": True}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="GRALORA",
    params_types=(_adapters.GraLoRAParams,),
    suffixes=(_A, _B, _HA, _HB),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout",
                        "init_weights", "layers_to_transform", "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none"},
    field_types={
        "gralora_k": (lambda v: _int(v) and v > 0, "a positive int"),
        "hybrid_r": (lambda v: _int(v) and v >= 0, "a non-negative int"),
        "gralora_dropout": (lambda v: isinstance(v, (int, float))
                            and not isinstance(v, bool) and 0 <= v < 1,
                            "a number in [0, 1)"),
        "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    },
    required=_required,
)
