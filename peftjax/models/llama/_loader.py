# SPDX-License-Identifier: Apache-2.0
"""Loading Llama-family checkpoints: Hugging Face safetensors and GGUF files.

Hugging Face tensors are torch layout ``(out, in)``; they are transposed to
Flax ``(in, out)``. GGUF tensors (read with ``peftjax.io.read_gguf``, already
``(out, in)``) additionally have llama.cpp's RoPE row permutation undone on
``attn_q`` (with ``n_head``) and ``attn_k`` (with ``n_kv_head``) for the
``llama`` architecture (Llama, Mistral, SmolLM2 in GGUF); ``qwen2`` GGUFs are
stored unpermuted. A GGUF without ``output.weight`` has a tied head.

``keep_quantized=True`` keeps a GGUF's Q8_0 / Q4_1 tensors as
``peftjax.quant.QuantizedArray`` (the file's blocks, bit for bit): the
transpose to Flax layout and the Q/K row permutation only relabel and reorder
whole rows of blocks, so nothing is requantised. Such a tree runs through
``peftjax.factored`` (``factored.transform``; ``train.trainer`` trains through it),
not through the NNX model directly.

Exports: ``config_from_gguf``, ``params_from_hf``, ``params_from_gguf``,
``load_llama``, ``load_llama_params``.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax import io as pio
from peftjax import quant, tree
from peftjax.models import _hub
from peftjax.models.llama import _config, _model

_GGUF_ARCHS = ("llama", "qwen2")

# HF name (after ``model.`` / layer prefix) -> (peftjax sub-path, transpose).
_HF_LAYER = {
    "input_layernorm.weight": ("input_layernorm/scale", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm/scale", False),
    "self_attn.q_proj.weight": ("self_attn/q_proj/kernel", True),
    "self_attn.k_proj.weight": ("self_attn/k_proj/kernel", True),
    "self_attn.v_proj.weight": ("self_attn/v_proj/kernel", True),
    "self_attn.o_proj.weight": ("self_attn/o_proj/kernel", True),
    "self_attn.q_proj.bias": ("self_attn/q_proj/bias", False),
    "self_attn.k_proj.bias": ("self_attn/k_proj/bias", False),
    "self_attn.v_proj.bias": ("self_attn/v_proj/bias", False),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", True),
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _abstract(cfg: _config.LlamaConfig, param_dtype: Any) -> dict[str, Any]:
    model = nnx.eval_shape(
        lambda: _model.LlamaForCausalLM(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    return dict(tree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[parts[-1]] = v
    return out


def _convert(
    named: Mapping[str, np.ndarray],
    cfg: _config.LlamaConfig,
    *,
    param_dtype: Any,
    source: str,
) -> dict:
    """HF-named torch-layout arrays -> the unrolled pure parameter dict."""
    expected = _abstract(cfg, param_dtype)
    flat: dict[str, np.ndarray] = {}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)")
    for name, arr in named.items():
        if name == "model.embed_tokens.weight":
            path, transpose = "embed_tokens/embedding", False
        elif name == "model.norm.weight":
            path, transpose = "norm/scale", False
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue  # some tied checkpoints also store the head; it is unused
            path, transpose = "lm_head/kernel", True
        elif (m := layer_re.fullmatch(name)) and m.group(2) in _HF_LAYER:
            sub, transpose = _HF_LAYER[m.group(2)]
            path = f"layers/{int(m.group(1))}/{sub}"
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise ValueError(
                f"{source}: unexpected tensor {name!r} with shape {arr.shape}"
            )
        value = _transposed(arr) if transpose else arr
        if not quant.is_quantized(value):
            value = np.asarray(value)
        if path not in expected:
            raise ValueError(
                f"{source}: tensor {name!r} maps to {path!r}, which the config "
                f"(num_hidden_layers={cfg.num_hidden_layers}, attention_bias="
                f"{cfg.attention_bias}, tie_word_embeddings={cfg.tie_word_embeddings}) "
                "does not have"
            )
        want = tuple(expected[path].shape)
        if value.shape != want:
            raise ValueError(
                f"{source}: tensor {name!r} -> {path!r} has shape {value.shape} "
                f"(after transpose={transpose}), but the config implies {want}"
            )
        flat[path] = _to_device(value, param_dtype)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(
            f"{source}: checkpoint lacks parameters {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}"
        )
    return _nest(flat)


def _transposed(arr: Any) -> Any:
    """``arr.T``; a 2-D QuantizedArray is relabelled (its blocks stay as they are)."""
    if not quant.is_quantized(arr):
        return np.asarray(arr).T
    if arr.ndim != 2:
        raise ValueError(f"cannot transpose a quantised tensor of shape {arr.shape}")
    fmt = arr.format._replace(axis=-1 - (arr.format.axis + 2))
    return quant.QuantizedArray(arr.blocks, fmt, arr.dtype)


def _to_device(value: Any, param_dtype: Any) -> Any:
    if quant.is_quantized(value):
        return quant.QuantizedArray(jax.tree.map(jnp.asarray, value.blocks),
                                    value.format, param_dtype)
    return jnp.asarray(value, dtype=param_dtype)


def params_from_hf(
    tensors: Mapping[str, np.ndarray],
    cfg: _config.LlamaConfig,
    *,
    param_dtype: Any = jnp.float32,
) -> dict:
    """Converts HF ``LlamaForCausalLM``-style tensors to the unrolled param dict.

    Args:
      tensors: ``{"model.layers.0.self_attn.q_proj.weight": (out, in), ...}``.
      cfg: the config the tensors must agree with.
      param_dtype: dtype of the returned arrays.

    Returns:
      The pure parameter dict (unrolled layout, int layer keys).

    Raises:
      ValueError: an unexpected or missing tensor, or a shape that disagrees
        with the config (naming the tensor, the path and both shapes).

    Example:
      >>> import numpy as np
      >>> cfg = _config.LlamaConfig(vocab_size=4, hidden_size=2, intermediate_size=2,
      ...     num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
      >>> t = {"model.embed_tokens.weight": np.zeros((4, 2)),
      ...      "model.norm.weight": np.ones(2), "lm_head.weight": np.zeros((4, 2))}
      >>> for n, s in [("input_layernorm", (2,)), ("post_attention_layernorm", (2,)),
      ...              ("self_attn.q_proj", (2, 2)), ("self_attn.k_proj", (2, 2)),
      ...              ("self_attn.v_proj", (2, 2)), ("self_attn.o_proj", (2, 2)),
      ...              ("mlp.gate_proj", (2, 2)), ("mlp.up_proj", (2, 2)),
      ...              ("mlp.down_proj", (2, 2))]:
      ...     t[f"model.layers.0.{n}.weight"] = np.ones(s)
      >>> params_from_hf(t, cfg)["lm_head"]["kernel"].shape
      (2, 4)
    """
    return _convert(tensors, cfg, param_dtype=param_dtype, source="params_from_hf")


def _unpermute(w: Any, n_head: int) -> Any:
    """Inverts llama.cpp's ``permute`` of Q/K rows: (out, in) -> HF row order."""
    if quant.is_quantized(w):  # rows are whole rows of blocks: reorder them
        if w.axis != w.ndim - 1:
            raise ValueError(
                f"cannot reorder rows of {w!r} blocked along axis {w.axis}")
        blocks = jax.tree.map(lambda b: _unpermute(np.asarray(b), n_head), w.blocks)
        return quant.QuantizedArray(blocks, w.format, w.dtype)
    out = w.shape[0]
    rest = w.shape[1:]
    return (
        w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    )


def config_from_gguf(
    metadata: Mapping[str, Any], *, has_output: bool, vocab_size: int | None = None
) -> _config.LlamaConfig:
    """Builds a :class:`LlamaConfig` from GGUF metadata.

    Args:
      metadata: from ``peftjax.io.read_gguf_metadata``.
      has_output: the file has ``output.weight`` (else the head is tied).
      vocab_size: fallback if the metadata has no ``{arch}.vocab_size``.

    Returns:
      The config.

    Raises:
      ValueError: an unsupported architecture or rope scaling type.

    Example:
      >>> meta = {"general.architecture": "llama", "llama.block_count": 30,
      ...     "llama.embedding_length": 576, "llama.feed_forward_length": 1536,
      ...     "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
      ...     "llama.vocab_size": 49152, "llama.rope.freq_base": 1e5}
      >>> config_from_gguf(meta, has_output=False).tie_word_embeddings
      True
    """
    arch = metadata.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"config_from_gguf: unsupported general.architecture "
            f"{arch!r}; supported: {_GGUF_ARCHS}"
        )

    def get(key, default=None):
        return metadata.get(f"{arch}.{key}", default)

    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(
            f"config_from_gguf: unsupported {arch}.rope.scaling.type "
            f"{scaling_type!r}; supported: 'none', 'linear'"
        )
    rope = (
        _config.RopeScaling()
        if scaling_type == "none"
        else _config.RopeScaling(
            rope_type="linear", factor=float(get("rope.scaling.factor"))
        )
    )
    heads = int(get("attention.head_count"))
    d = int(get("embedding_length"))
    vocab = get("vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else vocab_size
    key_len = get("attention.key_length")
    return _config.LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=None if key_len is None else int(key_len),
        rms_norm_eps=float(np.float32(get("attention.layer_norm_rms_epsilon", 1e-5))),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope,
        tie_word_embeddings=not has_output,
        attention_bias=arch == "qwen2",
        max_position_embeddings=int(get("context_length", 2048)),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        model_type="qwen2" if arch == "qwen2" else "llama",
    )


def params_from_gguf(
    gguf_file: pio.GGUFFile, *, param_dtype: Any = jnp.float32
) -> tuple[_config.LlamaConfig, dict]:
    """Converts a read GGUF file to ``(config, unrolled pure param dict)``.

    Args:
      gguf_file: from ``peftjax.io.read_gguf`` (float arrays ``(out, in)``, or
        ``QuantizedArray`` blocks with ``keep_quantized=True``, kept as such).
      param_dtype: dtype of the returned arrays (logical dtype of quantised ones).

    Returns:
      ``(config, params)``.

    Raises:
      ValueError: unsupported architecture or rope scaling (e.g. a
        ``rope_freqs.weight`` tensor), unexpected tensors, or shapes that
        disagree with the metadata.

    Example:
      >>> from peftjax.models import smollm2_gguf
      >>> from peftjax.io import read_gguf
      >>> cfg, params = params_from_gguf(read_gguf(smollm2_gguf()))  # doctest: +SKIP
    """
    meta, tensors = gguf_file.metadata, gguf_file.tensors
    if "rope_freqs.weight" in tensors:
        raise ValueError(
            "params_from_gguf: per-frequency RoPE factors "
            "('rope_freqs.weight', llama3 scaling in GGUF) are unsupported"
        )
    cfg = config_from_gguf(
        meta,
        has_output="output.weight" in tensors,
        vocab_size=tensors["token_embd.weight"].shape[0]
        if "token_embd.weight" in tensors
        else None,
    )
    permuted = meta.get("general.architecture") == "llama"
    named: dict[str, np.ndarray] = {}
    layer_re = re.compile(r"blk\.(\d+)\.(.+)")
    for name, arr in tensors.items():
        if name in _GGUF_TOP:
            named[_GGUF_TOP[name]] = arr
            continue
        m = layer_re.fullmatch(name)
        if m is None or m.group(2) not in _GGUF_LAYER:
            raise ValueError(
                f"params_from_gguf: unexpected tensor {name!r} "
                f"with shape {arr.shape}"
            )
        kind = m.group(2)
        if permuted and kind.startswith("attn_q."):
            arr = _unpermute(arr, cfg.num_attention_heads)
        elif permuted and kind.startswith("attn_k."):
            arr = _unpermute(arr, cfg.num_key_value_heads)
        named[f"model.layers.{m.group(1)}.{_GGUF_LAYER[kind]}"] = arr
    return cfg, _convert(named, cfg, param_dtype=param_dtype, source="params_from_gguf")


def load_llama_params(
    path: str | os.PathLike,
    *,
    param_dtype: Any = jnp.float32,
    keep_quantized: bool = False,
) -> tuple[_config.LlamaConfig, dict]:
    """Reads a checkpoint into ``(config, unrolled pure param dict)``.

    Args:
      path: a ``.gguf`` file, a Hugging Face directory (``config.json`` plus
        ``model.safetensors`` or ``model.safetensors.index.json``), or a Hub id
        (``"org/name"``, downloaded through ``huggingface_hub`` when a network
        exists).
      param_dtype: dtype of the returned arrays.
      keep_quantized: GGUF only: keep Q8_0 / Q4_1 tensors as
        ``peftjax.quant.QuantizedArray`` (the file's blocks; run the tree
        through ``peftjax.factored``). A float checkpoint is quantised with
        ``peftjax.quant.quantize_params`` instead.

    Returns:
      ``(config, params)``.

    Raises:
      ValueError: a missing file, an unsupported architecture, quantisation
        type or rope scaling, a shape that disagrees with the config, or
        ``keep_quantized`` with a non-GGUF checkpoint.

    Example:
      >>> from peftjax.models import smollm2_gguf
      >>> cfg, params = load_llama_params(smollm2_gguf())  # doctest: +SKIP
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        return params_from_gguf(pio.read_gguf(path, keep_quantized=keep_quantized),
                                param_dtype=param_dtype)
    if keep_quantized:
        raise ValueError(
            f"load_llama_params: keep_quantized=True applies to GGUF files; {path!r} "
            "is a float checkpoint: quantise it with peftjax.quant.quantize_params")
    directory = _hub.resolve_directory(path, what="load_llama")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"load_llama: {directory!r} has no config.json")
    hf = pio.read_json(config_path, "load_llama")
    try:
        cfg = _config.LlamaConfig.from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"load_llama: {config_path}: {e}") from e
    tensors = _hub.read_hf_weights(directory, what="load_llama")
    return cfg, params_from_hf(tensors, cfg, param_dtype=param_dtype)


def load_llama(
    path: str | os.PathLike,
    *,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> _model.LlamaForCausalLM:
    """Loads a Llama-family checkpoint into a :class:`LlamaForCausalLM`.

    Args:
      path: see :func:`load_llama_params`.
      scan_layers: build the scanned layout (stacked layer parameters).
      remat: recompute layer activations in the backward pass.
      dtype: compute dtype (``None``: ``param_dtype``).
      param_dtype: parameter dtype.

    Returns:
      The model, parameters loaded.

    Raises:
      ValueError: as :func:`load_llama_params`.

    Example:
      >>> from peftjax.models import smollm2_gguf
      >>> model = load_llama(smollm2_gguf(), scan_layers=True)  # doctest: +SKIP
    """

    cfg, params = load_llama_params(path, param_dtype=param_dtype)
    model = nnx.eval_shape(
        lambda: _model.LlamaForCausalLM(
            cfg,
            scan_layers=scan_layers,
            remat=remat,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    if scan_layers:
        params = tree.stack_layers(params)
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, params)
