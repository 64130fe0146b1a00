# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``HRA`` tensors and config, per module.

PEFT (``tuners/hra``) stores, per Linear module, ``hra_u`` ``(in, r)``: the
``r`` Householder vectors of ``W' = W · H_1 ⋯ H_r`` (torch ``W (out, in)``;
with ``apply_GS``, ``W · (I - 2 Q Qᵀ)``, ``Q`` their Gram-Schmidt basis).
peftjax's ``HRAParams.u`` is the same array, untransposed (it already lives
on the input side). Config: ``r``, ``apply_GS`` and ``init_weights`` are
honoured (PEFT's ``r`` is one rank for every module; HRA has no
``rank_pattern``); ``bias`` only at its default. Conv2d modules are not read.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    u = m.tensors["hra_u"]
    if u.ndim != 2 or u.shape[0] != m.dims.n_in:
        raise ValueError(f"load_peft: {m.module!r} has hra_u {u.shape}; expected "
                         f"(in={m.dims.n_in}, r)")
    r, want_r = int(u.shape[1]), m.config.get("r", 8)
    if r != want_r:
        raise ValueError(f"load_peft: {m.module!r} has rank {r} in the file but "
                         f"{want_r} in {m.source} (r)")
    adapter = _adapters.hra(
        r, apply_GS=bool(m.config.get("apply_GS", False)),
        init_weights=bool(m.config.get("init_weights", True)), param_dtype=m.dtype,
        dimension_numbers=m.dimension_numbers)
    return adapter, _adapters.HRAParams(jnp.asarray(u, m.dtype)), None


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "apply_GS" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.hra adapter")
    u = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.u)))
    return {"hra_u": u}, (hp["rank"], hp["apply_GS"], hp["init_weights"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    ranks = {i[0] for i in infos.values()}
    gs = {i[1] for i in infos.values()}
    inits = {i[2] for i in infos.values()}
    if len(ranks) > 1 or len(gs) > 1 or len(inits) > 1:
        raise ValueError("save_peft: one PEFT HRA adapter has one r, one apply_GS and "
                         f"one init_weights; got r {sorted(ranks)}, apply_GS "
                         f"{sorted(gs)}, init_weights {sorted(inits)}")
    return {"r": ranks.pop(), "apply_GS": gs.pop(), "init_weights": inits.pop(),
            "bias": "none"}, {}


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="HRA",
    params_types=(_adapters.HRAParams,),
    suffixes=("hra_u",),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "apply_GS", "init_weights", "layers_to_transform",
                        "layers_pattern"}),
    defaults={"bias": "none"},
    field_types={
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "a positive integer"),
        "apply_GS": (_is_bool, "true or false"),
        "init_weights": (_is_bool, "true or false"),
    },
)
