# SPDX-License-Identifier: Apache-2.0
"""Export of Llama-family parameters to Hugging Face names and safetensors.

The inverse of the loader: Flax ``(in, out)`` kernels become torch
``(out, in)`` weights under HF tensor names, so merged weights (e.g. after
``peftjax.adapters.fold``) can be saved as a standard HF checkpoint, and
``hf_key_map`` gives the module names that PEFT adapter files use.

Exports: ``hf_key_map``, ``params_to_hf``, ``save_hf``.
"""

import json
import os
import pathlib
from typing import Any

import numpy as np

from peftjax import io as pio
from peftjax import tree
from peftjax.models.llama import _config, _loader

# peftjax sub-path of a layer module -> HF module suffix.
_LAYER_MODULES = {
    sub.rsplit("/", 1)[0]: hf.rsplit(".", 1)[0]
    for hf, (sub, _) in _loader._HF_LAYER.items()
}
_TOP_MODULES = {
    "embed_tokens": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
}
_WEIGHT_LEAVES = ("kernel", "embedding", "scale")


def _module_of(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "layers":
        return f"model.layers.{parts[1]}.{_LAYER_MODULES['/'.join(parts[2:-1])]}"
    return _TOP_MODULES[parts[0]]


def hf_key_map(cfg: _config.LlamaConfig) -> dict[str, str]:
    """Maps each unrolled parameter path to its Hugging Face module name.

    Args:
      cfg: the config (layers, biases, tied head decide which paths exist).

    Returns:
      ``{"layers/0/self_attn/q_proj/kernel": "model.layers.0.self_attn.q_proj",
      ...}``, the names PEFT adapter files use (after ``base_model.model.``).

    Example:
      >>> c = _config.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
      ...     tie_word_embeddings=True)
      >>> hf_key_map(c)["layers/0/mlp/down_proj/kernel"]
      'model.layers.0.mlp.down_proj'
    """
    abstract = _loader._abstract(cfg, np.float32)
    return {path: _module_of(path) for path in abstract}


def params_to_hf(params: dict, cfg: _config.LlamaConfig) -> dict[str, np.ndarray]:
    """Converts a pure parameter dict (unrolled or scanned) to HF tensors.

    Args:
      params: from ``peftjax.models.split_params`` (either layout).
      cfg: its config.

    Returns:
      ``{HF tensor name: numpy array}`` in torch layout; a tied model has no
      ``lm_head.weight``.

    Raises:
      ValueError: a path that the config does not have, or a wrong shape.

    Example:
      >>> import jax.numpy as jnp
      >>> c = _config.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
      >>> p = {"lm_head": {"kernel": jnp.zeros((8, 8))}}
      >>> params_to_hf(p, c)  # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
      ValueError: params_to_hf: missing parameters ...
    """
    layers = params.get("layers") if isinstance(params, dict) else None
    if (
        isinstance(layers, dict)
        and layers
        and not all(isinstance(k, int) for k in layers)
    ):
        params = tree.unstack_layers(params)
    expected = _loader._abstract(cfg, np.float32)
    flat = dict(tree.flatten(params))
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"params_to_hf: missing parameters {missing[:6]}")
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        if path not in expected:
            raise ValueError(
                f"params_to_hf: {path!r} is not a parameter of this config"
            )
        if tuple(value.shape) != tuple(expected[path].shape):
            raise ValueError(
                f"params_to_hf: {path!r} has shape {tuple(value.shape)}, "
                f"the config implies {tuple(expected[path].shape)}"
            )
        leaf = path.rsplit("/", 1)[1]
        arr = np.asarray(value)
        name = _module_of(path) + (".weight" if leaf in _WEIGHT_LEAVES else ".bias")
        out[name] = np.ascontiguousarray(arr.T) if leaf == "kernel" else arr
    return out


def save_hf(
    directory: str | os.PathLike,
    params: dict,
    cfg: _config.LlamaConfig,
    *,
    metadata: dict[str, str] | None = None,
) -> pathlib.Path:
    """Writes ``config.json`` and ``model.safetensors`` (HF layout) to ``directory``.

    Args:
      directory: created if missing.
      params: the pure parameter dict (either layout), e.g. merged weights.
      cfg: its config.
      metadata: extra safetensors header metadata (``{"format": "pt"}`` is set).

    Returns:
      The directory as a ``pathlib.Path``.

    Raises:
      ValueError: as :func:`params_to_hf`.

    Example:
      >>> import tempfile
      >>> from flax import nnx
      >>> from peftjax.models import split_params
      >>> from peftjax.models.llama import _model
      >>> c = _config.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
      >>> _, p = split_params(_model.LlamaForCausalLM(c, rngs=nnx.Rngs(0)))
      >>> d = save_hf(tempfile.mkdtemp(), p, c)
      >>> sorted(f.name for f in d.iterdir())
      ['config.json', 'model.safetensors']
    """
    tensors = params_to_hf(params, cfg)
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(cfg.to_hf(), indent=1), encoding="utf-8"
    )
    meta: dict[str, Any] = {"format": "pt", **(metadata or {})}
    pio.write_safetensors(out / "model.safetensors", tensors, metadata=meta)
    return out
