# SPDX-License-Identifier: Apache-2.0
"""PEFT prompt-learning files: soft prompts, prefixes, P-tuning, MPT, CPT, cartridges.

Hugging Face PEFT saves a prompt-learning adapter as ``adapter_config.json``
and one ``prompt_embeddings`` tensor (``PeftModel.get_prompt_embedding_to_save``
and ``get_peft_model_state_dict``): the prompt ``(P, d)`` for PROMPT_TUNING,
P_TUNING (the encoder's output; the encoder is not saved) and CPT (context
embeddings plus the projected delta), and the flattened past key values
``(P, L·2·token_dim)`` for PREFIX_TUNING (the projection's output when
``prefix_projection``) and CARTRIDGE, laid out ``(P, L, 2, KV, D)`` with
``token_dim = KV·D`` and ``num_attention_heads = KV`` (PEFT's GQA
handling). MULTITASK_PROMPT_TUNING adds ``prefix_task_cols (T, P, r)`` and
``prefix_task_rows (T, r, d)`` next to the shared ``prompt_embeddings``.

``load_peft_prompt`` returns the parameters peftjax's prompt functions and
models take; ``save_peft_prompt`` writes files PEFT's
``PeftModel.from_pretrained`` loads. Config fields peftjax does not know, a
tensor the method does not have, or a value it cannot honour (two
transformer submodules: encoder-decoder models; ``modules_to_save``) are
errors naming them. Nothing here knows peftjax's models: the models'
geometry comes from the config or the parameters.

Exports: ``PeftPrompt``, ``load_peft_prompt``, ``save_peft_prompt``.
"""

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _json, _safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_COMMON = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
           "auto_mapping", "modules_to_save", "num_virtual_tokens", "token_dim",
           "num_transformer_submodules", "num_attention_heads", "num_layers", "peft_version"}
_PROMPT_INIT = {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                "tokenizer_kwargs"}
_FIELDS = {
    "PROMPT_TUNING": _COMMON | _PROMPT_INIT,
    "MULTITASK_PROMPT_TUNING": _COMMON | _PROMPT_INIT | {
        "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task", "num_ranks",
        "num_tasks"},
    "P_TUNING": _COMMON | {"encoder_reparameterization_type", "encoder_hidden_size",
                           "encoder_num_layers", "encoder_dropout"},
    "PREFIX_TUNING": _COMMON | {"encoder_hidden_size", "prefix_projection", "init_weights"},
    "CPT": _COMMON | {"cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask",
                      "opt_weighted_loss_type", "opt_loss_decay_factor",
                      "opt_projection_epsilon", "opt_projection_format_epsilon",
                      "tokenizer_name_or_path"},
    "CARTRIDGE": _COMMON | {"num_frozen_tokens"},
}
_TENSORS = {"MULTITASK_PROMPT_TUNING": {"prompt_embeddings", "prefix_task_cols",
                                        "prefix_task_rows"}}


class PeftPrompt(NamedTuple):
    """A PEFT prompt-learning adapter read by ``load_peft_prompt``.

    Attributes:
      peft_type: ``"PROMPT_TUNING"``, ``"P_TUNING"``, ``"CPT"``,
        ``"MULTITASK_PROMPT_TUNING"``, ``"PREFIX_TUNING"`` or ``"CARTRIDGE"``.
      params: ``PromptParams`` (prompt tuning, P-tuning), ``CPTParams``
        (CPT: ``embeddings`` = the saved prompt, ``delta`` zeros, as PEFT
        loads it), ``MultitaskPromptParams``, ``PrefixParams`` (prefix
        tuning) or ``CartridgeParams``.
      config: the ``adapter_config.json`` dict (CPT's token ids and type
        mask, the inits' fields, ...).
    """

    peft_type: str
    params: Any
    config: dict


def _fail(msg: str):
    raise ValueError(f"load_peft_prompt: {msg}")


def _int(config: Mapping, name: str, path: str) -> int:
    v = config.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        _fail(f"{path}: {name} must be a positive int, got {v!r}")
    return v


def load_peft_prompt(directory: str | os.PathLike, *,
                     param_dtype: Any = jnp.float32) -> PeftPrompt:
    """Reads a PEFT prompt-learning adapter directory.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      param_dtype: dtype of the returned arrays.

    Returns:
      ``PeftPrompt``: pass ``params`` to the prompt functions / models
      (``prompt_embeddings=params.embeddings``; MPT through
      ``adapters.multitask_prompt``; CPT through ``adapters.cpt_prompt``;
      ``prefix=params`` or ``adapters.cartridge_kv(params)``).

    Raises:
      ValueError: a missing file, a non-prompt-learning or unknown
        ``peft_type``, config fields or tensors peftjax does not know (named),
        values it cannot honour, or shapes that contradict the config.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from peftjax import adapters
      >>> d = tempfile.mkdtemp()
      >>> _ = save_peft_prompt(d, adapters.PromptParams(jnp.ones((3, 8))))
      >>> p = load_peft_prompt(d)
      >>> p.peft_type, p.params.embeddings.shape
      ('PROMPT_TUNING', (3, 8))
    """
    path = pathlib.Path(directory)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        _fail(f"no {CONFIG_NAME} in {str(path)!r}")
    config = _json.read_json(cfg_path, "load_peft_prompt")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        _fail(f"no {WEIGHTS_NAME} in {str(path)!r} (pickled .bin files are never loaded)")
    tensors, _ = _safetensors.read_safetensors(weights)
    ptype = config.get("peft_type")
    if ptype not in _FIELDS:
        _fail(f"{str(path)!r} has peft_type {ptype!r}; prompt-learning types are "
              f"{sorted(_FIELDS)} (load other adapters with load_peft)")
    unknown = sorted(set(config) - _FIELDS[ptype])
    if unknown:
        _fail(f"{str(path)!r}: {ptype} config fields {unknown} are unknown to peftjax")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        _fail(f"{str(path)!r}: num_transformer_submodules="
              f"{config['num_transformer_submodules']} (encoder-decoder prompts) is "
              f"not supported")
    if config.get("modules_to_save"):
        _fail(f"{str(path)!r}: modules_to_save={config['modules_to_save']} is not supported "
              f"with prompt learning")
    want = _TENSORS.get(ptype, {"prompt_embeddings"})
    extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
    if extra or missing:
        _fail(f"{str(path)!r}: {ptype} tensors {extra} are unknown, {missing} missing")
    emb = np.asarray(tensors["prompt_embeddings"])
    p = _int(config, "num_virtual_tokens", str(path))
    if emb.ndim != 2 or emb.shape[0] != p:
        _fail(f"{str(path)!r}: prompt_embeddings has shape {emb.shape}; expected "
              f"({p}, ...) for num_virtual_tokens={p}")

    def arr(x):
        return jnp.asarray(x, param_dtype)

    if ptype in ("PREFIX_TUNING", "CARTRIDGE"):
        n_l = _int(config, "num_layers", str(path))
        kv = _int(config, "num_attention_heads", str(path))
        td = _int(config, "token_dim", str(path))
        if td % kv or emb.shape[1] != n_l * 2 * td:
            _fail(f"{str(path)!r}: prompt_embeddings has shape {emb.shape}; expected "
                  f"({p}, num_layers*2*token_dim = {n_l * 2 * td}) with token_dim={td} "
                  f"divisible by num_attention_heads={kv}")
        x = emb.reshape(p, n_l, 2, kv, td // kv).transpose(1, 2, 0, 3, 4)
        prefix = _adapters.PrefixParams(arr(x[:, 0]), arr(x[:, 1]))
        if ptype == "PREFIX_TUNING":
            return PeftPrompt(ptype, prefix, config)
        f = config.get("num_frozen_tokens", 1)
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= p:
            _fail(f"{str(path)!r}: num_frozen_tokens={f!r} outside [0, {p}]")
        params = _adapters.CartridgeParams(
            _adapters.PrefixParams(prefix.keys[:, :f], prefix.values[:, :f]),
            _adapters.PrefixParams(prefix.keys[:, f:], prefix.values[:, f:]))
        return PeftPrompt(ptype, params, config)
    td = config.get("token_dim")
    if td is not None and emb.shape[1] != td:
        _fail(f"{str(path)!r}: prompt_embeddings has width {emb.shape[1]}; token_dim={td}")
    if ptype == "MULTITASK_PROMPT_TUNING":
        cols = np.asarray(tensors["prefix_task_cols"])
        rows = np.asarray(tensors["prefix_task_rows"])
        t, r = config.get("num_tasks"), config.get("num_ranks")
        if cols.shape != (t, p, r) or rows.shape != (t, r, emb.shape[1]):
            _fail(f"{str(path)!r}: prefix_task_cols/rows have shapes {cols.shape}/"
                  f"{rows.shape}; expected ({t}, {p}, {r})/({t}, {r}, {emb.shape[1]}) "
                  f"from num_tasks/num_ranks")
        return PeftPrompt(ptype, _adapters.MultitaskPromptParams(arr(emb), arr(cols), arr(rows)),
                          config)
    if ptype == "CPT":
        for name in ("cpt_token_ids", "cpt_tokens_type_mask"):
            v = config.get(name)
            if not isinstance(v, list) or len(v) != p:
                _fail(f"{str(path)!r}: {name} must be a list of {p} ints, got {v!r}")
        e = arr(emb)
        return PeftPrompt(ptype, _adapters.CPTParams(e, jnp.zeros_like(e)), config)
    return PeftPrompt(ptype, _adapters.PromptParams(arr(emb)), config)


def _prefix_fields(keys_shape) -> dict:
    n_l, p, kv, d = keys_shape
    return {"num_virtual_tokens": p, "num_layers": n_l, "num_attention_heads": kv,
            "token_dim": kv * d}


def _flat_prefix(kv: Any) -> np.ndarray:
    k = np.asarray(kv.keys, np.float32)
    v = np.asarray(kv.values, np.float32)
    x = np.stack([k, v], axis=1)  # (L, 2, P, KV, D)
    return x.transpose(2, 0, 1, 3, 4).reshape(k.shape[1], -1)


def save_peft_prompt(directory: str | os.PathLike, params: Any, *,
                     peft_type: str | None = None, fields: Mapping[str, Any] | None = None,
                     base_model_name_or_path: str | None = None,
                     task_type: str | None = "CAUSAL_LM") -> pathlib.Path:
    """Writes a prompt-learning adapter PEFT's ``from_pretrained`` loads.

    The ``peft_type`` follows from ``params``: ``PromptParams`` →
    PROMPT_TUNING (or ``peft_type="P_TUNING"``), ``PTuningMLP``/``PTuningLSTM``
    → P_TUNING (the encoder's output is saved, as PEFT does),
    ``MultitaskPromptParams`` → MULTITASK_PROMPT_TUNING, ``CPTParams`` → CPT
    (``fields`` must hold ``cpt_token_ids`` and ``cpt_tokens_type_mask``; the
    saved prompt is ``cpt_prompt`` with the config's epsilons),
    ``PrefixParams``/``PrefixProjection`` → PREFIX_TUNING (a projection needs
    ``fields={"num_layers":, "num_attention_heads":, "token_dim":}``),
    ``CartridgeParams`` → CARTRIDGE.

    Args:
      directory: created if missing.
      params: one of the above.
      peft_type: overrides the type (only ``"P_TUNING"`` or ``"CPT"`` for a
        ``PromptParams``).
      fields: extra PEFT config fields of the type (checked against the
        type's known fields; e.g. ``num_layers`` and ``num_attention_heads``,
        which PEFT otherwise fills from the model).
      base_model_name_or_path: recorded in the config.
      task_type: PEFT's ``task_type``.

    Returns:
      The directory.

    Raises:
      ValueError: unknown params, type or fields, or missing CPT fields.

    Example:
      >>> import tempfile, jax, json, pathlib
      >>> from peftjax import adapters
      >>> c = adapters.cartridge(jax.random.key(0), 3, num_layers=2, num_kv_heads=1,
      ...                        head_dim=4)
      >>> d = save_peft_prompt(tempfile.mkdtemp(), c)
      >>> json.loads((d / "adapter_config.json").read_text())["token_dim"]
      4
    """
    fields = dict(fields or {})
    arrays: dict[str, np.ndarray] = {}
    cfg: dict[str, Any] = {}
    if isinstance(params, (_adapters.PTuningMLP, _adapters.PTuningLSTM)):
        ptype = "P_TUNING"
        emb = np.asarray(_adapters.p_tuning_prompt(params), np.float32)
        lstm = isinstance(params, _adapters.PTuningLSTM)
        hidden = params.forward[0].w_hh.shape[0] if lstm else params.w1.shape[1]
        cfg.update(encoder_reparameterization_type="LSTM" if lstm else "MLP",
                   encoder_hidden_size=int(hidden),
                   encoder_num_layers=len(params.forward) if lstm else 2,
                   encoder_dropout=0.0)
        arrays["prompt_embeddings"] = emb
    elif isinstance(params, _adapters.PromptParams):
        ptype = peft_type or "PROMPT_TUNING"
        if ptype not in ("PROMPT_TUNING", "P_TUNING", "CPT"):
            raise ValueError(f"save_peft_prompt: peft_type {ptype!r} does not take a "
                             f"PromptParams")
        emb = np.asarray(params.embeddings, np.float32)
        arrays["prompt_embeddings"] = emb
    elif isinstance(params, _adapters.MultitaskPromptParams):
        ptype = "MULTITASK_PROMPT_TUNING"
        emb = np.asarray(params.embeddings, np.float32)
        arrays.update(prompt_embeddings=emb,
                      prefix_task_cols=np.asarray(params.task_cols, np.float32),
                      prefix_task_rows=np.asarray(params.task_rows, np.float32))
        cfg.update(num_tasks=int(params.task_cols.shape[0]),
                   num_ranks=int(params.task_cols.shape[2]), prompt_tuning_init="RANDOM")
    elif isinstance(params, _adapters.CPTParams):
        ptype = "CPT"
        emb = None
    elif isinstance(params, (_adapters.PrefixParams, _adapters.CartridgeParams)):
        is_cart = isinstance(params, _adapters.CartridgeParams)
        ptype = "CARTRIDGE" if is_cart else "PREFIX_TUNING"
        kv = _adapters.cartridge_kv(params) if is_cart else params
        arrays["prompt_embeddings"] = _flat_prefix(kv)
        cfg.update(_prefix_fields(kv.keys.shape))
        if is_cart:
            cfg["num_frozen_tokens"] = int(params.frozen.keys.shape[1])
        else:
            cfg.update(prefix_projection=False, encoder_hidden_size=cfg["token_dim"])
        emb = None
    elif isinstance(params, _adapters.PrefixProjection):
        ptype = "PREFIX_TUNING"
        need = ("num_layers", "num_attention_heads", "token_dim")
        if any(k not in fields for k in need):
            raise ValueError(f"save_peft_prompt: a PrefixProjection needs fields {need}")
        n_l, kv_h, td = (int(fields[k]) for k in need)
        kv = _adapters.prefix_kv(params, num_layers=n_l, num_kv_heads=kv_h,
                                 head_dim=td // kv_h)
        arrays["prompt_embeddings"] = _flat_prefix(kv)
        cfg.update(_prefix_fields(kv.keys.shape), prefix_projection=True,
                   encoder_hidden_size=int(params.w1.shape[1]))
        emb = None
    else:
        raise ValueError(f"save_peft_prompt: params of type {type(params).__name__} are not "
                         f"a prompt-learning parameter set")
    if peft_type is not None and peft_type != ptype:
        raise ValueError(f"save_peft_prompt: params make a {ptype}, not {peft_type!r}")
    unknown = sorted(set(fields) - _FIELDS[ptype])
    if unknown:
        raise ValueError(f"save_peft_prompt: {ptype} config fields {unknown} are unknown")
    if ptype == "CPT":
        for name in ("cpt_token_ids", "cpt_tokens_type_mask"):
            if name not in fields:
                raise ValueError(f"save_peft_prompt: CPT needs fields[{name!r}]")
        types = list(fields["cpt_tokens_type_mask"])
        eps = dict(epsilon=float(fields.get("opt_projection_epsilon", 0.1)),
                   format_epsilon=float(fields.get("opt_projection_format_epsilon", 0.1)))
        prompt = (_adapters.cpt_prompt(params, types, **eps)
                  if isinstance(params, _adapters.CPTParams) else params.embeddings)
        emb = np.asarray(prompt, np.float32)
        arrays["prompt_embeddings"] = emb
        cfg.update(cpt_mask=[1] * emb.shape[0], opt_weighted_loss_type="none",
                   opt_loss_decay_factor=1.0, opt_projection_epsilon=eps["epsilon"],
                   opt_projection_format_epsilon=eps["format_epsilon"])
    if emb is not None:
        cfg.update(num_virtual_tokens=int(emb.shape[0]), token_dim=int(emb.shape[1]))
    if ptype in ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING") and "prompt_tuning_init" not in cfg:
        cfg["prompt_tuning_init"] = "RANDOM"
    config = {"peft_type": ptype, "task_type": task_type, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path,
              "num_transformer_submodules": 1, "num_layers": None,
              "num_attention_heads": None, **cfg, **fields}
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    _safetensors.write_safetensors(out / WEIGHTS_NAME, arrays)
    return out
