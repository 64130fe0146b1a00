# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``SHIRA`` tensors and config, per module.

PEFT (``tuners/shira``) stores per Linear module ``shira_weight`` ``(k,)``
(the trainable values, ``k = r·(in + out)``) and ``shira_indices`` ``(2,
k)`` int32 (row = output unit, column = input feature of the torch weight
``(out, in)``), both under ``base_model.model.<module>.``; the indices are
read from the file whatever ``mask_type`` made them (PEFT does the same: its
loader replaces the mask it builds by the saved one). peftjax's
``SHiRAParams``/``SHiRAIndices`` hold them unchanged (the Flax kernel's entry
is ``W[col, row]``). Config: ``r`` (checked against ``k``), ``mask_type``
and ``random_seed`` (recorded; the indices come from the file) and
``init_weights`` (inert once trained) are honoured; ``fan_in_fan_out`` only
at its default.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    """``(adapter, SHiRAParams, SHiRAIndices)`` of one module."""
    values, idx = m.tensors["shira_weight"], m.tensors["shira_indices"]
    r = int(m.config.get("r", 32))
    n_in, n_out = m.dims.n_in, m.dims.n_out
    k = r * (n_in + n_out)
    if values.shape != (k,):
        raise ValueError(f"load_peft: {m.module!r}.shira_weight has shape "
                         f"{values.shape} but r={r} in {m.source} gives "
                         f"r*(in+out)=({k},) for in={n_in}, out={n_out}")
    if idx.shape != (2, k):
        raise ValueError(f"load_peft: {m.module!r}.shira_indices has shape "
                         f"{idx.shape}; expected (2, {k}) for shira_weight ({k},)")
    if not np.all(np.round(idx) == idx):  # PEFT on Windows saves float32 indices
        raise ValueError(f"load_peft: {m.module!r}.shira_indices holds non-integer "
                         f"values (dtype {idx.dtype})")
    idx = idx.astype(np.int64)
    if idx.min(initial=0) < 0 or np.any(idx[0] >= n_out) or np.any(idx[1] >= n_in):
        raise ValueError(f"load_peft: {m.module!r}.shira_indices point outside the "
                         f"torch weight (out={n_out}, in={n_in})")
    seed = m.config.get("random_seed")
    adapter = _adapters.shira(r, random_seed=seed, param_dtype=m.dtype,
                              dimension_numbers=m.dimension_numbers)
    return (adapter, _adapters.SHiRAParams(jnp.asarray(values, m.dtype)),
            _adapters.SHiRAIndices(jnp.asarray(idx.astype(np.int32))))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    """The values and indices, and ``(r, random_seed)``."""
    hp = dict(m.adapter.hyperparameters)
    if "random_seed" not in hp or not isinstance(m.frozen, _adapters.SHiRAIndices):
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.shira adapter")
    r = hp["r"]
    values = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.values)))
    idx = np.ascontiguousarray(np.asarray(jax.device_get(m.frozen.indices)), np.int32)
    k = r * (m.dims.n_in + m.dims.n_out)
    if values.shape != (k,) or idx.shape != (2, k):
        raise ValueError(f"save_peft: {m.path!r} has SHiRA values {values.shape} and "
                         f"indices {idx.shape}; PEFT needs ({k},) and (2, {k}) for "
                         f"r={r}, in={m.dims.n_in}, out={m.dims.n_out}")
    return {"shira_weight": values, "shira_indices": idx}, (r, hp["random_seed"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    """One ``r`` and ``random_seed`` for the whole adapter (PEFT has no patterns)."""
    rs = {r for r, _ in infos.values()}
    seeds = {s for _, s in infos.values()}
    if len(rs) > 1 or len(seeds) > 1:
        raise ValueError("save_peft: one PEFT SHiRA adapter has one r and one "
                         f"random_seed (no rank_pattern); got r {sorted(rs)} and "
                         f"seeds {sorted(seeds, key=repr)}")
    return {"r": rs.pop(), "mask_type": "random", "random_seed": seeds.pop(),
            "fan_in_fan_out": False, "init_weights": True}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="SHIRA",
    params_types=(_adapters.SHiRAParams,),
    suffixes=("shira_weight", "shira_indices"),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "mask_type", "random_seed", "init_weights"}),
    defaults={"fan_in_fan_out": False},
    field_types={
        "r": (lambda v: _int(v) and v > 0, "a positive int"),
        "random_seed": (_int, "an int"),
        "mask_type": (lambda v: isinstance(v, str), "a string"),
    },
)
