# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``TINYLORA`` tensors and config, per module.

PEFT (``tuners/tinylora``) stores per module the frozen SVD factors
``tinylora_A`` ``(r, in)`` and ``tinylora_B`` ``(out, r)`` and, with
``save_projection=True`` (its default), the projections ``tinylora_P`` ``(u,
r, r)``; the trainable vectors live outside the modules as
``base_model.tinylora_v.<i>`` ``(u,)``, where ``i`` is the module's position
among the adapted modules in torch's module order (``named_modules()``),
grouped by ``weight_tying``. peftjax takes every frozen tensor from the file
(JAX's SVD may pick other signs than torch's, and PEFT's ``P`` comes from a
torch generator peftjax does not reproduce), so files without ``tinylora_P``
(``save_projection=False``) are refused.

Layouts: a torch ``nn.Linear`` (``ΔW = B (Σ v_i P_i) A``, ``(out, in)``) maps
to the Flax kernel's ``a = Aᵀ``, ``b = Bᵀ``, ``P_flax[i] = P[i]ᵀ``; an
embedding table ``(num, dim)``, which PEFT decomposes untransposed, maps to
``a = B``, ``b = A``, ``P_flax = P``.

Module order: PEFT numbers the modules in torch's registration order, which
the file does not record; ``torch_order`` knows the module names of the
Llama family and BERT (and errors on others). Config: ``r`` and ``u``
(checked against the tensors), ``projection_seed``, ``init_weights`` and
``init_v_bound`` (inert once the tensors are saved) are honoured;
``weight_tying`` only at 0, ``save_projection`` only True,
``tinylora_dropout``, ``fan_in_fan_out`` and ``bias`` only at their defaults.

Exports: ``TUNER``, ``torch_order``.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_keys, _peft_tuner

_V = "base_model.tinylora_v."
# Child names in the order torch registers them, for the model families
# peftjax ships key maps for (Llama/Mistral/Qwen2, BERT/RoBERTa).
_ORDER = {name: i for i, name in enumerate((
    "model", "bert", "roberta", "embed_tokens", "embeddings", "word_embeddings",
    "position_embeddings", "token_type_embeddings", "layers", "encoder", "layer",
    "self_attn", "attention", "self", "query", "key", "value", "q_proj", "k_proj",
    "v_proj", "o_proj", "mlp", "gate_proj", "up_proj", "down_proj", "intermediate",
    "output", "dense", "input_layernorm", "post_attention_layernorm", "LayerNorm",
    "norm", "pooler", "lm_head", "classifier"))}


def torch_order(modules: Iterable[str]) -> list[str]:
    """Module names sorted as torch's ``named_modules()`` visits them.

    Args:
      modules: PEFT module names (``model.layers.0.self_attn.q_proj``).

    Returns:
      The names in torch's registration order.

    Raises:
      ValueError: a name part outside the Llama/BERT module names.

    Example:
      >>> torch_order(["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj",
      ...              "model.embed_tokens"])[0]
      'model.embed_tokens'
    """
    def key(name: str) -> tuple:
        out = []
        for part in name.split("."):
            if part.isdigit():
                out.append((0, int(part)))
            elif part in _ORDER:
                out.append((1, _ORDER[part]))
            else:
                raise ValueError(
                    f"TINYLORA: PEFT numbers tinylora_v by torch's module order, which "
                    f"peftjax knows for Llama and BERT module names only; {name!r} "
                    f"has the unknown part {part!r}")
        return tuple(out)

    return sorted(modules, key=key)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    """``(adapter, TinyLoRAParams, TinyLoRABasis)`` of one module."""
    a_t, b_t, p_t = (m.tensors[k] for k in ("tinylora_A", "tinylora_B", "tinylora_P"))
    r_cfg, u = int(m.config.get("r", 2)), int(m.config.get("u", 64))
    emb = m.key.layout is _peft_keys.TensorLayout.EMBEDDING
    # torch's (rows, columns) of the adapted weight: Linear (out, in), table (num, dim)
    rows, cols = (m.dims.n_in, m.dims.n_out) if emb else (m.dims.n_out, m.dims.n_in)
    r = min(r_cfg, rows, cols)
    want = {"tinylora_A": (r, cols), "tinylora_B": (rows, r), "tinylora_P": (u, r, r)}
    for name, x in (("tinylora_A", a_t), ("tinylora_B", b_t), ("tinylora_P", p_t)):
        if tuple(x.shape) != want[name]:
            raise ValueError(f"load_peft: {m.module!r}.{name} has shape {x.shape} but "
                             f"r={r_cfg}, u={u} in {m.source} give {want[name]}")
    order = torch_order(m.modules)
    v_keys = sorted(k for k in m.shared if k.startswith(_V))
    if len(v_keys) != len(order):
        raise ValueError(f"load_peft: {len(v_keys)} tinylora_v vectors for "
                         f"{len(order)} adapted modules; with weight_tying=0 PEFT "
                         "saves one per module")
    v = m.shared.get(f"{_V}{order.index(m.module)}")
    if v is None or v.shape != (u,):
        raise ValueError(f"load_peft: {_V}{order.index(m.module)} (module "
                         f"{m.module!r}) is missing or not of shape ({u},)")
    if emb:
        a, b, proj = b_t, a_t, p_t
    else:
        a, b, proj = a_t.T, b_t.T, p_t.transpose(0, 2, 1)
    adapter = _adapters.tinylora(r_cfg, u, param_dtype=m.dtype,
                                 dimension_numbers=m.dimension_numbers)
    return (adapter, _adapters.TinyLoRAParams(jnp.asarray(v, m.dtype)),
            _adapters.TinyLoRABasis(*(jnp.asarray(x, m.dtype) for x in (a, b, proj))))


def _np(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    """``tinylora_A``/``_B``/``_P``, and ``(r, u, v)`` (``v`` goes out by ``_config``)."""
    hp = dict(m.adapter.hyperparameters)
    if "u" not in hp or not isinstance(m.frozen, _adapters.TinyLoRABasis):
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.tinylora adapter")
    if hp["dropout"] != 0.0:
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} has dropout "
                         f"{hp['dropout']}; peftjax writes tinylora_dropout=0 only")
    a, b, proj = (_np(x) for x in m.frozen)
    if m.key is not None and m.key.layout is _peft_keys.TensorLayout.EMBEDDING:
        tensors = {"tinylora_A": b, "tinylora_B": a, "tinylora_P": proj}
    else:
        tensors = {"tinylora_A": _np(a.T), "tinylora_B": _np(b.T),
                   "tinylora_P": _np(proj.transpose(0, 2, 1))}
    return tensors, (hp["r"], hp["u"], _np(m.trainable.v))


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    """One ``r`` and ``u``; ``tinylora_v.<i>`` numbered in torch's module order."""
    rs = {r for r, _, _ in infos.values()}
    us = {u for _, u, _ in infos.values()}
    if len(rs) > 1 or len(us) > 1:
        raise ValueError("save_peft: one PEFT TinyLoRA adapter has one r and one u "
                         f"(no patterns); got r {sorted(rs)} and u {sorted(us)}")
    shared = {f"{_V}{i}": infos[name][2]
              for i, name in enumerate(torch_order(infos))}
    return {"r": rs.pop(), "u": us.pop(), "weight_tying": 0.0,
            "save_projection": True, "projection_seed": 42, "init_v_bound": 0.02,
            "init_weights": True, "tinylora_dropout": 0.0, "fan_in_fan_out": False,
            "bias": "none"}, shared


def _check(config: Mapping[str, Any], source: str) -> list[str]:
    bad = []
    if config.get("save_projection", True) is False:
        bad.append("save_projection=False (PEFT regenerates tinylora_P from a torch "
                   "generator peftjax does not reproduce; save the projections)")
    tying = config.get("weight_tying", 0.0)
    if isinstance(tying, (int, float)) and not isinstance(tying, bool) and tying != 0:
        bad.append(f"weight_tying={tying!r} (modules sharing one tinylora_v are not "
                   "supported yet; peftjax reads weight_tying=0, PEFT's default)")
    return bad


TUNER = _peft_tuner.Tuner(
    peft_type="TINYLORA",
    params_types=(_adapters.TinyLoRAParams,),
    suffixes=("tinylora_A", "tinylora_B", "tinylora_P"),
    build=_build,
    write=_write,
    config=_config,
    honoured=frozenset({"r", "u", "projection_seed", "init_weights", "init_v_bound",
                        "weight_tying", "save_projection", "layers_to_transform",
                        "layers_pattern"}),
    defaults={"tinylora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none"},
    field_types={
        "r": (lambda v: _int(v) and v > 0, "a positive int"),
        "u": (lambda v: _int(v) and v > 0, "a positive int"),
        "weight_tying": (lambda v: isinstance(v, (int, float))
                         and not isinstance(v, bool) and 0 <= v <= 1,
                         "a number in [0, 1]"),
        "projection_seed": (_int, "an int"),
        "save_projection": (lambda v: isinstance(v, bool), "a bool"),
        "init_v_bound": (lambda v: isinstance(v, (int, float))
                         and not isinstance(v, bool), "a number"),
    },
    is_shared=lambda key: re.fullmatch(re.escape(_V) + r"\d+", key) is not None,
    embeddings=True,
    check=_check,
)
