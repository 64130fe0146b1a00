# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``BOFT`` tensors and config, per module.

PEFT (``tuners/boft``) stores, per Linear module, ``boft_R`` ``(m, n, b,
b)``: per butterfly factor and block a full matrix whose skew part is
Cayley-transformed, rotating the input ``x ↦ x·M`` before the base layer;
and ``boft_s`` ``(out, 1)``, the output scale. peftjax's ``BOFTParams.r``
is ``boft_R`` as stored (per block, no transpose) and ``BOFTParams.s`` is
``boft_s`` flattened to ``(out,)``. Config: ``boft_block_size`` or
``boft_block_num`` (exactly one non-zero; a layout PEFT refuses on a
module is refused naming it, and a file whose shapes disagree with the
config likewise), ``boft_n_butterfly_factor`` and ``init_weights`` are
honoured; ``boft_dropout`` (PEFT's multiplicative block dropout),
``fan_in_fan_out`` and ``bias`` only at their defaults. Conv2d modules are
not read.

PEFT without its CUDA extension uses one butterfly factor whatever the
config says, so a file with ``boft_n_butterfly_factor > 1`` loads only in a
PEFT whose extension compiled; ``save_peft`` writes the config's factors.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_FIELDS = ("block_size", "block_num", "n_butterfly_factor", "init_weights")


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    r, s = m.tensors["boft_R"], m.tensors["boft_s"]
    c = m.config
    size, num = int(c.get("boft_block_size", 4) or 0), int(c.get("boft_block_num") or 0)
    factors = int(c.get("boft_n_butterfly_factor", 1))
    if (size != 0) == (num != 0):
        raise ValueError(f"load_peft: {m.source} must set exactly one of boft_block_size "
                         f"({size}) and boft_block_num ({num}) non-zero (PEFT's rule)")
    b, n = _adapters.boft_layout(m.dims.n_in, block_size=size, block_num=num,
                                 n_butterfly_factor=factors,
                                 where=f"module {m.module!r} of {m.source}")
    want_r, want_s = (factors, n, b, b), (m.dims.n_out, 1)
    if tuple(r.shape) != want_r or tuple(s.shape) != want_s:
        raise ValueError(f"load_peft: {m.module!r} has boft_R {tuple(r.shape)} and "
                         f"boft_s {tuple(s.shape)}; {m.source} (boft_block_size={size}, "
                         f"boft_block_num={num}, boft_n_butterfly_factor={factors}) on "
                         f"in={m.dims.n_in}, out={m.dims.n_out} gives {want_r} and "
                         f"{want_s}")
    adapter = _adapters.boft(
        size or None, block_num=num or None, n_butterfly_factor=factors,
        init_weights=bool(c.get("init_weights", True)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    params = _adapters.BOFTParams(jnp.asarray(r, m.dtype),
                                  jnp.asarray(s.reshape(-1), m.dtype))
    return adapter, params, None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "n_butterfly_factor" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.boft adapter")
    r = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.r)))
    s = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.s)).reshape(-1, 1))
    return {"boft_R": r, "boft_s": s}, tuple(hp[k] for k in _FIELDS)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    found = set(infos.values())
    if len(found) != 1:
        raise ValueError("save_peft: one PEFT BOFT adapter has one boft_block_size/"
                         "boft_block_num, boft_n_butterfly_factor and init_weights; "
                         f"the modules have {sorted(found, key=repr)} ({', '.join(_FIELDS)})")
    v = dict(zip(_FIELDS, found.pop(), strict=True))
    return {"boft_block_size": v["block_size"], "boft_block_num": v["block_num"],
            "boft_n_butterfly_factor": v["n_butterfly_factor"],
            "init_weights": v["init_weights"], "boft_dropout": 0.0,
            "fan_in_fan_out": False, "bias": "none"}, {}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


TUNER = _peft_tuner.Tuner(
    peft_type="BOFT",
    params_types=(_adapters.BOFTParams,),
    suffixes=("boft_R", "boft_s"),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                        "init_weights", "layers_to_transform", "layers_pattern"}),
    defaults={"bias": "none", "boft_dropout": 0.0, "fan_in_fan_out": False},
    field_types={
        "boft_block_size": (_int, "a non-negative integer"),
        "boft_block_num": (_int, "a non-negative integer"),
        "boft_n_butterfly_factor": (lambda v: _int(v) and v >= 1, "a positive integer"),
        "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    },
)
