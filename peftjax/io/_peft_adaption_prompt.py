# SPDX-License-Identifier: Apache-2.0
"""PEFT ``ADAPTION_PROMPT`` (LLaMA-Adapter) files, both ways.

PEFT stores, per adapted attention module (the top ``adapter_layers``
layers), ``base_model.model.<prefix>.<i>.<target>.adaption_prompt``
``(1, adapter_len, d)`` and ``.adaption_gate`` ``(1,)``, with the config
fields ``adapter_len``, ``adapter_layers`` and ``target_modules`` (the
attention module's name, ``"self_attn"`` for Llama and Mistral). They map to
``adapters.AdaptionPromptParams`` stacked bottom to top; the hook is
``adapters.AdaptionPromptHook``. The adapter is no weight reparametrisation,
so it has a reader and a writer of its own rather than ``load_peft`` /
``save_peft``'s assignment and state.

Exports: ``load_peft_adaption_prompt``, ``save_peft_adaption_prompt``.
"""

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_read, _peft_write, _safetensors

_FIELDS = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version",
                     "base_model_name_or_path", "revision", "inference_mode",
                     "target_modules", "adapter_len", "adapter_layers"})


def _key(prefix: str, layer: int, target: str, what: str) -> str:
    return f"base_model.model.{prefix}.{layer}.{target}.adaption_{what}"


def load_peft_adaption_prompt(
    directory: str | os.PathLike,
    *,
    num_layers: int,
    hidden_size: int,
    layers_module: str = "model.layers",
    param_dtype: Any = jnp.float32,
) -> tuple[_adapters.AdaptionPromptParams, dict[str, Any]]:
    """Reads a PEFT adaption-prompt adapter (``peft_type: ADAPTION_PROMPT``).

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      num_layers: the model's number of layers.
      hidden_size: the model's hidden size ``d``.
      layers_module: PEFT's name of the layer list (``"model.layers"`` for
        Llama and Mistral).
      param_dtype: dtype of the returned parameters.

    Returns:
      ``(params, config)``: ``AdaptionPromptParams`` of the top
      ``adapter_layers`` layers (for ``AdaptionPromptHook(params, num_layers)``)
      and the parsed config.

    Raises:
      ValueError: another ``peft_type``, a config field peftjax does not
        know, ``adapter_layers > num_layers``, missing or extra tensors, or
        shapes that disagree with the config (each named).

    Example:
      >>> import jax, tempfile
      >>> from peftjax import adapters
      >>> p = adapters.adaption_prompt(jax.random.key(0), hidden_size=8,
      ...                              adapter_len=3, adapter_layers=1)
      >>> d = save_peft_adaption_prompt(tempfile.mkdtemp(), p, num_layers=2)
      >>> back, cfg = load_peft_adaption_prompt(d, num_layers=2, hidden_size=8)
      >>> back.prompt.shape, cfg["adapter_layers"], cfg["peft_type"]
      ((1, 3, 8), 1, 'ADAPTION_PROMPT')
    """
    directory = pathlib.Path(directory)
    config, tensors = _peft_read._read_dir(directory)
    source = str(directory / _peft_write.CONFIG_NAME)
    if str(config.get("peft_type", "")).upper() != "ADAPTION_PROMPT":
        raise ValueError(f"{source}: peft_type={config.get('peft_type')!r}; "
                         "load_peft_adaption_prompt reads ADAPTION_PROMPT")
    unknown = sorted(f for f in config if f not in _FIELDS and config[f] is not None)
    if unknown:
        raise ValueError(f"{source}: ADAPTION_PROMPT config fields peftjax does not "
                         f"know: {unknown}")
    n, k = config.get("adapter_layers"), config.get("adapter_len")
    target = config.get("target_modules") or "self_attn"
    for name, v in (("adapter_layers", n), ("adapter_len", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{source}: {name}={v!r} must be a positive int")
    if not isinstance(target, str):
        raise ValueError(f"{source}: target_modules={target!r} must be a str (the "
                         "attention module's name)")
    if n > num_layers:
        raise ValueError(f"{source}: adapter_layers={n} > the model's num_layers="
                         f"{num_layers} (PEFT raises too)")
    layers = range(num_layers - n, num_layers)
    want = {_key(layers_module, i, target, w): s for i in layers
            for w, s in (("prompt", (1, k, hidden_size)), ("gate", (1,)))}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"{source}: ADAPTION_PROMPT tensors missing {missing}, "
                         f"unexpected {extra} (adapter_layers={n}, top layers "
                         f"{list(layers)})")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}; "
                             f"expected {shape}")
    prompt = np.stack([tensors[_key(layers_module, i, target, "prompt")][0]
                       for i in layers])
    gate = np.concatenate([tensors[_key(layers_module, i, target, "gate")]
                           for i in layers])
    params = _adapters.AdaptionPromptParams(jnp.asarray(prompt, param_dtype),
                                            jnp.asarray(gate, param_dtype))
    return params, config


def save_peft_adaption_prompt(
    directory: str | os.PathLike,
    params: _adapters.AdaptionPromptParams,
    *,
    num_layers: int,
    layers_module: str = "model.layers",
    target_modules: str = "self_attn",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> pathlib.Path:
    """Writes ``params`` as a PEFT adaption-prompt adapter.

    Args:
      directory: created if missing.
      params: ``AdaptionPromptParams`` of the top ``n`` layers.
      num_layers: the model's number of layers.
      layers_module: PEFT's name of the layer list.
      target_modules: the attention module's name.
      base_model_name_or_path: recorded in the config.
      task_type: PEFT's ``task_type``.

    Returns:
      The directory.

    Raises:
      ValueError: shapes that are not ``(n, K, d)`` / ``(n,)`` or
        ``n > num_layers``.

    Example:
      >>> import jax, tempfile, json
      >>> from peftjax import adapters
      >>> p = adapters.adaption_prompt(jax.random.key(0), hidden_size=8,
      ...                              adapter_len=3, adapter_layers=2)
      >>> d = save_peft_adaption_prompt(tempfile.mkdtemp(), p, num_layers=4)
      >>> json.loads((d / "adapter_config.json").read_text())["adapter_layers"]
      2
    """
    prompt = np.asarray(jax.device_get(params.prompt))
    gate = np.asarray(jax.device_get(params.gate))
    if prompt.ndim != 3 or gate.shape != prompt.shape[:1]:
        raise ValueError(f"save_peft_adaption_prompt: prompt {prompt.shape} / gate "
                         f"{gate.shape} must be (n, adapter_len, d) / (n,)")
    n = prompt.shape[0]
    if n > num_layers:
        raise ValueError(f"save_peft_adaption_prompt: {n} adapted layers > "
                         f"num_layers={num_layers}")
    tensors = {}
    for j, i in enumerate(range(num_layers - n, num_layers)):
        tensors[_key(layers_module, i, target_modules, "prompt")] = prompt[j][None]
        tensors[_key(layers_module, i, target_modules, "gate")] = gate[j:j + 1]
    config = {"peft_type": "ADAPTION_PROMPT", "task_type": task_type,
              "base_model_name_or_path": base_model_name_or_path,
              "inference_mode": True, "target_modules": target_modules,
              "adapter_len": int(prompt.shape[1]), "adapter_layers": int(n)}
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / _peft_write.CONFIG_NAME).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _safetensors.write_safetensors(out / _peft_write.WEIGHTS_NAME, tensors,
                                   metadata={"format": "pt"})
    return out
