# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``SUPERTUNING`` tensors and config, per module.

PEFT (``tuners/supertuning``) stores per Linear module
``supertuning_values`` ``(k,)`` (trainable, float32), ``supertuning_indices``
``(k,)`` int32 (flat positions ``row·in + col`` of the torch weight ``(out,
in)``, from ``torch.topk`` of ``|W|``; saved while
``save_precomputed_indices`` is True, PEFT's default) and, in Supra mode
(``r`` set), ``supertuning_lora_A.weight`` ``(r, in)`` and
``supertuning_lora_B.weight`` ``(out, r)`` scaled by ``lora_alpha / r``.
peftjax's ``SuperTuningParams(values, a = A.T, b = B.T)`` and
``SuperTuningIndices`` hold them (indices as stored, so the support is
PEFT's even where ``topk`` ties would break differently). Config:
``sparsity`` (checked against ``k``), ``select_top``, ``r``, ``lora_alpha``
and ``init_weights`` (inert once trained) are honoured; ``lora_dropout`` and
``save_precomputed_indices`` only at their defaults (without saved indices
PEFT re-ranks the base weight at load time, which this reader never sees).

Exports: ``TUNER``.
"""

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_A, _B = "supertuning_lora_A.weight", "supertuning_lora_B.weight"


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _needs(found: set[str]) -> set[str]:
    base = {"supertuning_values", "supertuning_indices"}
    return base | {_A, _B} if found & {_A, _B} else base


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    """``(adapter, SuperTuningParams, SuperTuningIndices)`` of one module."""
    values, idx = m.tensors["supertuning_values"], m.tensors["supertuning_indices"]
    sparsity = float(m.config.get("sparsity", 0.99))
    r, alpha = m.config.get("r"), m.config.get("lora_alpha")
    n_in, n_out = m.dims.n_in, m.dims.n_out
    k = int(n_in * n_out * (1 - sparsity))
    if values.shape != (k,):
        raise ValueError(f"load_peft: {m.module!r}.supertuning_values has shape "
                         f"{values.shape} but sparsity={sparsity} in {m.source} gives "
                         f"int(in*out*(1-sparsity))=({k},) for in={n_in}, out={n_out}")
    if idx.shape != (k,) or not np.all(np.round(idx) == idx):
        raise ValueError(f"load_peft: {m.module!r}.supertuning_indices has shape "
                         f"{idx.shape}, dtype {idx.dtype}; expected ({k},) integers")
    idx = idx.astype(np.int64)
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= n_in * n_out:
        raise ValueError(f"load_peft: {m.module!r}.supertuning_indices point outside the "
                         f"torch weight (out={n_out}, in={n_in})")
    if (r is None) != (_A not in m.tensors):
        raise ValueError(f"load_peft: {m.module!r} has r={r!r} in {m.source} but "
                         f"{'no' if r is not None else ''} supertuning_lora_A/B tensors")
    adapter = _adapters.supertuning(
        sparsity, select_top=bool(m.config.get("select_top", True)), r=r,
        lora_alpha=alpha, param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)
    a = b = None
    if r is not None:
        a_t, b_t = m.tensors[_A], m.tensors[_B]
        if a_t.shape != (r, n_in) or b_t.shape != (n_out, r):
            raise ValueError(f"load_peft: {m.module!r} has supertuning_lora_A {a_t.shape} "
                             f"and _B {b_t.shape}; r={r} in {m.source} needs ({r}, {n_in}) "
                             f"and ({n_out}, {r})")
        a, b = jnp.asarray(a_t.T, m.dtype), jnp.asarray(b_t.T, m.dtype)
    return (adapter,
            _adapters.SuperTuningParams(jnp.asarray(values, m.dtype), a, b),
            _adapters.SuperTuningIndices(jnp.asarray(idx.astype(np.int32))))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    """The values, indices (and Supra's A, B), and the config fields."""
    hp = dict(m.adapter.hyperparameters)
    if "sparsity" not in hp or not isinstance(m.frozen, _adapters.SuperTuningIndices):
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.supertuning adapter")
    k = int(m.dims.n_in * m.dims.n_out * (1 - hp["sparsity"]))
    values = np.ascontiguousarray(np.asarray(jax.device_get(m.trainable.values)))
    idx = np.ascontiguousarray(np.asarray(jax.device_get(m.frozen.indices)), np.int32)
    if values.shape != (k,) or idx.shape != (k,):
        raise ValueError(f"save_peft: {m.path!r} has Super-Tuning values {values.shape} and "
                         f"indices {idx.shape}; PEFT needs ({k},) for "
                         f"sparsity={hp['sparsity']}, in={m.dims.n_in}, out={m.dims.n_out}")
    out = {"supertuning_values": values, "supertuning_indices": idx}
    if hp["r"] is not None:
        out[_A] = _peft_tuner.transposed(m.trainable.a)
        out[_B] = _peft_tuner.transposed(m.trainable.b)
    return out, (hp["sparsity"], hp["select_top"], hp["r"], hp["lora_alpha"])


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    """One ``sparsity``, ``select_top``, ``r`` and ``lora_alpha`` (PEFT has no patterns)."""
    seen = set(infos.values())
    if len(seen) > 1:
        raise ValueError("save_peft: one PEFT Super-Tuning adapter has one (sparsity, "
                         f"select_top, r, lora_alpha); got {sorted(seen, key=repr)}")
    sparsity, select_top, r, alpha = seen.pop()
    return {"sparsity": sparsity, "select_top": select_top, "r": r, "lora_alpha": alpha,
            "lora_dropout": 0.0, "init_weights": True,
            "save_precomputed_indices": True}, {}


TUNER = _peft_tuner.Tuner(
    peft_type="SUPERTUNING",
    params_types=(_adapters.SuperTuningParams,),
    suffixes=("supertuning_values", "supertuning_indices", _A, _B),
    build=_build,
    write=_write,
    config=_config,
    required=_needs,
    honoured=frozenset({"sparsity", "select_top", "r", "lora_alpha", "init_weights"}),
    defaults={"lora_dropout": 0.0, "save_precomputed_indices": True},
    field_types={
        "sparsity": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "select_top": (lambda v: isinstance(v, bool), "a bool"),
        "r": (lambda v: _int(v) and v > 0, "a positive int"),
        "lora_alpha": (_num, "a number"),
    },
)
