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
(``save_projection=False``) are refused. With ``weight_tying > 0`` the file
holds one vector per group (``adapters.tinylora_groups`` of the modules in
torch's order); peftjax reads them into the shared table
``trainable["@shared"]["tinylora"]`` and gives each module its group id, and
writes a tied state only when its groups are PEFT's for torch's order.

Layouts: a torch ``nn.Linear`` (``ΔW = B (Σ v_i P_i) A``, ``(out, in)``) maps
to the Flax kernel's ``a = Aᵀ``, ``b = Bᵀ``, ``P_flax[i] = P[i]ᵀ``; an
embedding table ``(num, dim)``, which PEFT decomposes untransposed, maps to
``a = B``, ``b = A``, ``P_flax = P``.

Module order: PEFT numbers the modules in torch's registration order, which
the file does not record; ``torch_order`` knows the module names of the
Llama family and BERT (and errors on others). Config: ``r`` and ``u``
(checked against the tensors), ``projection_seed``, ``init_weights`` and
``init_v_bound`` (inert once the tensors are saved) and ``weight_tying`` are
honoured; ``save_projection`` only True, ``tinylora_dropout``,
``fan_in_fan_out`` and ``bias`` only at their defaults.

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
_TABLE = "tinylora"  # the shared table's name (tinylora's default ``table``)
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
                    f"PEFT numbers TINYLORA's tinylora_v and assigns UNILORA's indices "
                    f"by torch's module order, which "
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
    tying = float(m.config.get("weight_tying", 0.0))
    ids = _adapters.tinylora_groups(len(order), tying)
    group = int(ids[order.index(m.module)])
    v_keys = sorted(k for k in m.shared if k.startswith(_V))
    if len(v_keys) != int(ids.max()) + 1:
        raise ValueError(f"load_peft: {len(v_keys)} tinylora_v vectors for "
                         f"{len(order)} adapted modules; with weight_tying={tying} "
                         f"PEFT saves {int(ids.max()) + 1}")
    v = m.shared.get(f"{_V}{group}")
    if v is None or v.shape != (u,):
        raise ValueError(f"load_peft: {_V}{group} (module {m.module!r}) is missing "
                         f"or not of shape ({u},)")
    if emb:
        a, b, proj = b_t, a_t, p_t
    else:
        a, b, proj = a_t.T, b_t.T, p_t.transpose(0, 2, 1)
    adapter = _adapters.tinylora(r_cfg, u, weight_tying=tying, param_dtype=m.dtype,
                                 dimension_numbers=m.dimension_numbers)
    basis = _adapters.TinyLoRABasis(*(jnp.asarray(x, m.dtype) for x in (a, b, proj)))
    if tying > 0:
        return (adapter, _adapters.TinyLoRAParams(_adapters.Shared(_TABLE)),
                basis._replace(group=jnp.asarray(group, jnp.int32)))
    return adapter, _adapters.TinyLoRAParams(jnp.asarray(v, m.dtype)), basis


def _shared_trainable(shared: Mapping[str, np.ndarray], config: Mapping[str, Any],
                      dtype: Any) -> dict[str, Any]:
    """With weight tying, ``tinylora_v.<g>`` stacked into the table ``(G, u)``."""
    if float(config.get("weight_tying", 0.0)) == 0:
        return {}
    rows = [shared[f"{_V}{g}"] for g in range(len(shared))]
    return {_adapters.SHARED: {_TABLE: jnp.asarray(np.stack(rows), dtype)}}


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
    a, b, proj = (_np(x) for x in m.frozen[:3])
    if m.key is not None and m.key.layout is _peft_keys.TensorLayout.EMBEDDING:
        tensors = {"tinylora_A": b, "tinylora_B": a, "tinylora_P": proj}
    else:
        tensors = {"tinylora_A": _np(a.T), "tinylora_B": _np(b.T),
                   "tinylora_P": _np(proj.transpose(0, 2, 1))}
    tying = hp["weight_tying"]
    if tying > 0:
        table = m.state.trainable.get(_adapters.SHARED, {}).get(hp["table"])
        if table is None:
            raise ValueError(f"save_peft: the state has no shared table "
                             f"{hp['table']!r} for {m.path!r}")
        return tensors, (hp["r"], hp["u"], tying, int(m.frozen.group), _np(table))
    return tensors, (hp["r"], hp["u"], tying, None, _np(m.trainable.v))


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    """One ``r`` and ``u``; ``tinylora_v.<i>`` numbered in torch's module order."""
    rs = {i[0] for i in infos.values()}
    us = {i[1] for i in infos.values()}
    tyings = {i[2] for i in infos.values()}
    if len(rs) > 1 or len(us) > 1 or len(tyings) > 1:
        raise ValueError("save_peft: one PEFT TinyLoRA adapter has one r, one u and one "
                         f"weight_tying (no patterns); got r {sorted(rs)}, u "
                         f"{sorted(us)}, weight_tying {sorted(tyings)}")
    order = torch_order(infos)
    tying = tyings.pop()
    if tying == 0:
        shared = {f"{_V}{i}": infos[name][4] for i, name in enumerate(order)}
    else:
        ids = _adapters.tinylora_groups(len(order), tying)
        got = [infos[name][3] for name in order]
        if got != ids.tolist():
            raise ValueError(
                f"save_peft: the TinyLoRA groups {dict(zip(order, got, strict=True))} "
                f"are not PEFT's for weight_tying={tying} over torch's module order "
                f"({ids.tolist()}); PEFT would tie other modules together")
        table = infos[order[0]][4]
        if (any(not np.array_equal(infos[name][4], table) for name in order)
                or table.shape[0] != int(ids.max()) + 1):
            raise ValueError(f"save_peft: weight_tying={tying} over {len(order)} "
                             f"modules needs one table of {int(ids.max()) + 1} rows")
        shared = {f"{_V}{g}": np.ascontiguousarray(table[g])
                  for g in range(table.shape[0])}
    return {"r": rs.pop(), "u": us.pop(), "weight_tying": tying,
            "save_projection": True, "projection_seed": 42, "init_v_bound": 0.02,
            "init_weights": True, "tinylora_dropout": 0.0, "fan_in_fan_out": False,
            "bias": "none"}, shared


def _check(config: Mapping[str, Any], source: str) -> list[str]:
    del source
    if config.get("save_projection", True) is False:
        return ["save_projection=False (PEFT regenerates tinylora_P from a torch "
                "generator peftjax does not reproduce; save the projections)"]
    return []


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
    shared_trainable=_shared_trainable,
    is_shared=lambda key: re.fullmatch(re.escape(_V) + r"\d+", key) is not None,
    embeddings=True,
    check=_check,
)
