# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``PEANUT`` tensors and config, per module.

PEFT (``tuners/peanut``) stores per Linear module ``peanut_A.weight`` ``(r,
out)``, ``peanut_B.weight`` ``(out, r)`` and ``depth`` encoder and decoder
weights ``peanut_encoders.<i>.weight`` / ``peanut_decoders.<i>.weight`` ``(r,
r)``; peftjax's ``PEANUTParams`` hold the transposes (``a = A.T``, ``b =
B.T``, ``encoders[i] = E_i.T``, ``decoders[i] = D_i.T``). Config: ``r``,
``depth``, ``act_fn`` (the activations ``adapters.peanut`` knows) and
``scaling`` are honoured; ``init_weights`` is inert once trained.

Exports: ``TUNER``.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_MAX_DEPTH = 64
_SUFFIXES = ("peanut_A.weight", "peanut_B.weight") + tuple(
    f"peanut_{part}.{i}.weight" for part in ("encoders", "decoders") for i in range(_MAX_DEPTH))
_LAYER = re.compile(r"peanut_(?:en|de)coders\.(\d+)\.weight")


def _needs(found: set[str]) -> set[str]:
    depth = 1 + max((int(m.group(1)) for s in found if (m := _LAYER.fullmatch(s))),
                    default=-1)
    return {"peanut_A.weight", "peanut_B.weight"} | {
        f"peanut_{part}.{i}.weight" for part in ("encoders", "decoders") for i in range(depth)}


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    ts = m.tensors
    a_t, b_t = ts["peanut_A.weight"], ts["peanut_B.weight"]
    depth = sum(1 for s in ts if s.startswith("peanut_encoders."))
    r = int(a_t.shape[0]) if a_t.ndim == 2 else -1
    layers = [ts[f"peanut_{p}.{i}.weight"] for p in ("encoders", "decoders")
              for i in range(depth)]
    if (a_t.ndim != 2 or a_t.shape[1] != m.dims.n_out or b_t.shape != (m.dims.n_out, r)
            or any(x.shape != (r, r) for x in layers)):
        raise ValueError(f"load_peft: {m.module!r} has peanut_A {a_t.shape}, peanut_B "
                         f"{b_t.shape} and encoder/decoder weights "
                         f"{sorted({x.shape for x in layers})}; expected (r, out="
                         f"{m.dims.n_out}), (out, r) and (r, r)")
    for field, got, default in (("r", r, 32), ("depth", depth, 0)):
        want = m.config.get(field, default)
        if got != want:
            raise ValueError(f"load_peft: {m.module!r} has {field}={got} in the file but "
                             f"{field}={want} in {m.source}")
    adapter = _adapters.peanut(r, depth=depth, act_fn=m.config.get("act_fn", "relu"),
                               scaling=float(m.config.get("scaling", 1.0)),
                               param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)

    def stack(part):
        x = [np.asarray(ts[f"peanut_{part}.{i}.weight"]).T for i in range(depth)]
        return jnp.asarray(np.stack(x) if x else np.zeros((0, r, r)), m.dtype)

    t = _adapters.PEANUTParams(jnp.asarray(a_t.T, m.dtype), stack("encoders"),
                               stack("decoders"), jnp.asarray(b_t.T, m.dtype))
    return adapter, t, None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "act_fn" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.peanut adapter")
    t = m.trainable
    tensors = {"peanut_A.weight": _peft_tuner.transposed(t.a),
               "peanut_B.weight": _peft_tuner.transposed(t.b)}
    for part, arr in (("encoders", t.encoders), ("decoders", t.decoders)):
        for i in range(arr.shape[0]):
            tensors[f"peanut_{part}.{i}.weight"] = _peft_tuner.transposed(arr[i])
    return tensors, (hp["rank"], hp["depth"], hp["act_fn"], hp["scaling"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    kinds = set(infos.values())
    if len(kinds) > 1:
        raise ValueError("save_peft: one PEFT PEANUT adapter has one r, depth, act_fn and "
                         f"scaling (PEFT has no per-module pattern); got (r, depth, act_fn, "
                         f"scaling) {sorted(kinds)}")
    r, depth, act_fn, scaling = kinds.pop()
    return {"r": r, "depth": depth, "act_fn": act_fn, "scaling": scaling,
            "init_weights": True}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="PEANUT",
    params_types=(_adapters.PEANUTParams,),
    suffixes=_SUFFIXES,
    build=_build,
    write=_write,
    config=_config,
    required=_needs,
    honoured=frozenset({"r", "depth", "act_fn", "scaling", "init_weights",
                        "layers_to_transform", "layers_pattern"}),
    field_types={
        "depth": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  "an int >= 0"),
        "scaling": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                    "a number"),
        "act_fn": (lambda v: isinstance(v, str), "a string")},
)
