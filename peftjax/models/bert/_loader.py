# SPDX-License-Identifier: Apache-2.0
"""Loading BERT-family checkpoints from Hugging Face safetensors directories.

Torch ``(out, in)`` weights are transposed to Flax ``(in, out)``. A
``bert.``/``roberta.`` prefix (task checkpoints) is accepted; MLM/NSP heads and
the CLS pooler are ignored (peftjax pools by mean); ``classifier.*`` loads into
:class:`BertForSequenceClassification` when the shapes agree.

Exports: ``params_from_hf``, ``load_bert``.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax import io as pio
from peftjax import tree
from peftjax.models import _hub
from peftjax.models.bert import _config, _model

_TOP = {
    "embeddings.word_embeddings.weight": (
        "embeddings/word_embeddings/embedding",
        False,
    ),
    "embeddings.position_embeddings.weight": (
        "embeddings/position_embeddings/embedding",
        False,
    ),
    "embeddings.token_type_embeddings.weight": (
        "embeddings/token_type_embeddings/embedding",
        False,
    ),
    "embeddings.LayerNorm.weight": ("embeddings/layer_norm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/layer_norm/bias", False),
    "classifier.weight": ("classifier/kernel", True),
    "classifier.bias": ("classifier/bias", False),
}
_LAYER = {
    "attention.self.query": "attention/query",
    "attention.self.key": "attention/key",
    "attention.self.value": "attention/value",
    "attention.output.dense": "attention/output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_IGNORED = re.compile(r"(embeddings\.position_ids|pooler\..*|cls\..*|lm_head\..*)")


def _hf_to_path(name: str) -> tuple[str, bool] | None:
    for prefix in ("bert.", "roberta."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if _IGNORED.fullmatch(name):
        return None
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _LAYER:
        raise ValueError(f"bert params_from_hf: unexpected tensor {name!r}")
    sub, kind = _LAYER[m.group(2)], m.group(3)
    is_norm = sub.endswith("norm")
    leaf = ("scale" if is_norm else "kernel") if kind == "weight" else "bias"
    return f"layers/{int(m.group(1))}/{sub}/{leaf}", kind == "weight" and not is_norm


def params_from_hf(
    tensors: Mapping[str, np.ndarray],
    cfg: _config.BertConfig,
    *,
    num_labels: int | None = None,
    param_dtype: Any = jnp.float32,
) -> dict:
    """Converts HF BERT tensors to the pure parameter dict of the NNX model.

    Args:
      tensors: ``{"encoder.layer.0.attention.self.query.weight": (out, in), ...}``.
      cfg: the config the tensors must agree with.
      num_labels: build the classification layout; a checkpoint without
        ``classifier.*`` gets a zero-initialised head.
      param_dtype: dtype of the returned arrays.

    Returns:
      The pure parameter dict.

    Raises:
      ValueError: unexpected or missing tensors, or shapes that disagree with
        the config.

    Example:
      >>> from peftjax.io import read_safetensors
      >>> from peftjax.models import minilm_dir
      >>> cfg = _config.BertConfig(vocab_size=30522, hidden_size=384,
      ...     num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
      >>> p = params_from_hf(read_safetensors(minilm_dir() + "/model.safetensors")[0],
      ...                    cfg)  # doctest: +SKIP
    """
    if num_labels is None:
        abstract = nnx.eval_shape(
            lambda: _model.BertModel(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        )
    else:
        abstract = nnx.eval_shape(
            lambda: _model.BertForSequenceClassification(
                cfg, num_labels=num_labels, param_dtype=param_dtype, rngs=nnx.Rngs(0)
            )
        )
    expected = dict(tree.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))
    flat: dict[str, Any] = {}
    for name, arr in tensors.items():
        target = _hf_to_path(name)
        if target is None:
            continue
        path, transpose = target
        if path.startswith("classifier/") and num_labels is None:
            continue
        value = np.asarray(arr).T if transpose else np.asarray(arr)
        if path not in expected:
            raise ValueError(
                f"bert params_from_hf: tensor {name!r} maps to {path!r}, "
                f"which the config (num_hidden_layers="
                f"{cfg.num_hidden_layers}) does not have"
            )
        want = tuple(expected[path].shape)
        if value.shape != want:
            raise ValueError(
                f"bert params_from_hf: tensor {name!r} -> {path!r} has shape "
                f"{value.shape}, but the config implies {want}"
            )
        flat[path] = jnp.asarray(value, param_dtype)
    for path in ("classifier/kernel", "classifier/bias"):
        if path in expected and path not in flat:
            flat[path] = jnp.zeros(expected[path].shape, param_dtype)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(
            f"bert params_from_hf: checkpoint lacks parameters {missing[:6]}"
        )
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[parts[-1]] = v
    return out


def load_bert(
    path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> _model.BertModel:
    """Loads a BERT-family HF directory (or Hub id) into the NNX model.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a
        sharded index), or a Hub id when a network exists.
      num_labels: if given, a :class:`BertForSequenceClassification`.
      dtype: compute dtype.
      param_dtype: parameter dtype.

    Returns:
      The model with loaded parameters.

    Raises:
      ValueError: a missing file, an unsupported config, or shape mismatches.

    Example:
      >>> from peftjax.models import minilm_dir
      >>> model = load_bert(minilm_dir())  # doctest: +SKIP
    """
    directory = _hub.resolve_directory(path, what="load_bert")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"load_bert: {directory!r} has no config.json")
    hf = pio.read_json(config_path, "load_bert")
    try:
        cfg = _config.BertConfig.from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"load_bert: {config_path}: {e}") from e
    params = params_from_hf(
        _hub.read_hf_weights(directory, what="load_bert"),
        cfg,
        num_labels=num_labels,
        param_dtype=param_dtype,
    )
    if num_labels is None:
        abstract = nnx.eval_shape(
            lambda: _model.BertModel(
                cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)
            )
        )
    else:
        abstract = nnx.eval_shape(
            lambda: _model.BertForSequenceClassification(
                cfg,
                num_labels=num_labels,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(0),
            )
        )
    return nnx.merge(nnx.graphdef(abstract), params)
