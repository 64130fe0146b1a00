# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``VBLORA`` tensors and config, per module.

PEFT (``tuners/vblora``) stores per Linear module
``base_model.model.<module>.vblora_logits_A`` ``(r, in/b, h)`` and
``.vblora_logits_B`` ``(out/b, r, h)``, and ONE bank for the whole model,
``base_model.vblora_vector_bank`` ``(h, b)``. peftjax keeps the logits in
PEFT's axis order (``VBLoRAParams``) and the bank once, as the shared
trainable array ``AdapterState.trainable["@shared"]["vblora"]``.
With ``save_only_topk_weights`` PEFT stores ``vblora_logits_{A,B}_topk_indices``
and the first ``k - 1`` softmax weights ``..._topk_weights`` instead; they are
read back as PEFT does (logits ``log w`` at the top-k positions, ``-inf``
elsewhere: the same update, for inference; PEFT refuses to resume training
from them). Config: ``r``, ``num_vectors``, ``vector_length``, ``topk``,
``save_only_topk_weights``, and the inits (inert once trained) are honoured;
``vblora_dropout`` is the adapter's dropout; ``fan_in_fan_out`` and ``bias``
only at their defaults. ``save_peft`` writes the full logits.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

BANK = "base_model.vblora_vector_bank"
_FULL = ("vblora_logits_A", "vblora_logits_B")
_TOPK = tuple(f"{s}_topk_{x}" for s in _FULL for x in ("indices", "weights"))


def _logits(m: _peft_tuner.ModuleRead, name: str, num_vectors: int) -> np.ndarray:
    if name in m.tensors:
        return np.asarray(m.tensors[name], np.float32)
    idx = np.asarray(m.tensors[name + "_topk_indices"]).astype(np.int64)
    w = np.asarray(m.tensors[name + "_topk_weights"], np.float64)
    if idx.ndim != 3 or w.shape != idx.shape[:-1] + (idx.shape[-1] - 1,) or (
            idx.size and (idx.min() < 0 or idx.max() >= num_vectors)):
        raise ValueError(f"load_peft: {m.module!r} has {name}_topk_indices "
                         f"{idx.shape} and _topk_weights {w.shape}; expected (..., k) "
                         f"indices below num_vectors={num_vectors} and (..., k-1) weights")
    w = np.concatenate([w, 1.0 - w.sum(-1, keepdims=True)], axis=-1)
    out = np.full(idx.shape[:-1] + (num_vectors,), -np.inf, np.float32)
    with np.errstate(divide="ignore"):
        np.put_along_axis(out, idx, np.log(w).astype(np.float32), axis=-1)
    return out


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    r, h, b, k = (int(c.get("r", 4)), int(c.get("num_vectors", 256)),
                  int(c.get("vector_length", 256)), int(c.get("topk", 2)))
    la, lb = (_logits(m, n, h) for n in _FULL)
    n_in, n_out = m.dims.n_in, m.dims.n_out
    if n_in % b or n_out % b:
        raise ValueError(f"load_peft: {m.module!r} (in={n_in}, out={n_out}) is not a "
                         f"multiple of vector_length={b} in {m.source}")
    want_a, want_b = (r, n_in // b, h), (n_out // b, r, h)
    if la.shape != want_a or lb.shape != want_b:
        raise ValueError(f"load_peft: {m.module!r} has vblora_logits_A {la.shape} and "
                         f"vblora_logits_B {lb.shape}; r={r}, num_vectors={h}, "
                         f"vector_length={b} in {m.source} need {want_a} and {want_b}")
    bank = m.shared.get(BANK)
    if bank is None or tuple(bank.shape) != (h, b):
        got = None if bank is None else tuple(bank.shape)
        raise ValueError(f"load_peft: {BANK} is {got}; num_vectors={h}, "
                         f"vector_length={b} in {m.source} need ({h}, {b})")
    ad = _adapters.vblora(r, num_vectors=h, vector_length=b, topk=k,
                          init_vector_bank_bound=float(c.get("init_vector_bank_bound", 0.02)),
                          init_logits_std=float(c.get("init_logits_std", 0.1)),
                          dropout=float(c.get("vblora_dropout", 0.0)),
                          dimension_numbers=m.dimension_numbers, param_dtype=m.dtype)
    t = _adapters.VBLoRAParams(jnp.asarray(la, m.dtype), jnp.asarray(lb, m.dtype),
                               _adapters.Shared("vblora"))
    return ad, t, None


def _shared_trainable(shared: Mapping[str, np.ndarray], config: Mapping[str, Any],
                      dtype: Any) -> dict[str, Any]:
    del config
    return {_adapters.SHARED: {"vblora": jnp.asarray(shared[BANK], dtype)}}


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "num_vectors" not in hp:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.vblora adapter")
    bank = m.state.trainable.get(_adapters.SHARED, {}).get(hp["bank"])
    if bank is None:
        raise ValueError(f"save_peft: the state has no shared bank {hp['bank']!r} "
                         f"for {m.path!r} (trainable['@shared'])")
    t = m.trainable
    tensors = {name: np.ascontiguousarray(np.asarray(jax.device_get(x), np.float32))
               for name, x in zip(_FULL, (t.logits_a, t.logits_b), strict=True)}
    info = (hp["rank"], hp["num_vectors"], hp["vector_length"], hp["topk"],
            hp["init_vector_bank_bound"], hp["init_logits_std"], m.adapter.dropout,
            hp["bank"])
    return tensors, (info, bank)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    kinds = {i[0] for i in infos.values()}
    if len(kinds) != 1:
        raise ValueError("save_peft: PEFT's VBLORA has one r/num_vectors/vector_length/"
                         f"topk/bank for all modules; got {sorted(map(str, kinds))}")
    (r, h, b, k, bound, std, dropout, _), bank = next(iter(infos.values()))
    return ({"r": r, "num_vectors": h, "vector_length": b, "topk": k,
             "init_vector_bank_bound": bound, "init_logits_std": std,
             "vblora_dropout": dropout, "save_only_topk_weights": False},
            {BANK: np.ascontiguousarray(np.asarray(jax.device_get(bank), np.float32))})


def _required(found: set[str]) -> set[str]:
    return set(_TOPK) if found & set(_TOPK) else set(_FULL)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


TUNER = _peft_tuner.Tuner(
    peft_type="VBLORA",
    params_types=(_adapters.VBLoRAParams,),
    suffixes=_FULL + _TOPK,
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "num_vectors", "vector_length", "topk",
                        "save_only_topk_weights", "init_vector_bank_bound",
                        "init_logits_std", "vblora_dropout", "layers_to_transform",
                        "layers_pattern"}),
    defaults={"fan_in_fan_out": False, "bias": "none"},
    field_types={f: (_positive_int, "a positive int")
                 for f in ("r", "num_vectors", "vector_length", "topk")},
    required=_required,
    is_shared=lambda key: key == BANK,
    shared_trainable=_shared_trainable,
)
