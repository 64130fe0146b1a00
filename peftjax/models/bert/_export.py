# SPDX-License-Identifier: Apache-2.0
"""Export of BERT-family parameters to Hugging Face names and safetensors.

The inverse of ``params_from_hf``: Flax ``(in, out)`` kernels become torch
``(out, in)`` weights under transformers' ``BertModel`` / ``RobertaModel``
tensor names (``encoder.layer.{i}.attention.self.query.weight``, no
``bert.`` prefix), so merged weights (e.g. after ``peftjax.adapters.fold``)
are saved as a standard HF checkpoint that transformers loads.

What transformers sees: the encoder, bit for bit. peftjax's models have no
[CLS] pooler (they mean-pool), so transformers' ``pooler.dense`` is absent
from the file: load with ``BertModel.from_pretrained(d,
add_pooling_layer=False)`` (else transformers initialises a random pooler and
says so; ``last_hidden_state`` is unaffected). A classification model's
``classifier/{kernel,bias}`` is written as ``classifier.weight``/``.bias``
for ``load_bert(d, num_labels=...)``; transformers'
``BertForSequenceClassification`` would put it on its pooler's output rather
than on mean-pooled states, so its logits are not peftjax's.

Exports: ``params_to_hf``, ``save_hf``.
"""

import json
import os
import pathlib
from typing import Any

import numpy as np
from flax import nnx

from peftjax import io as pio
from peftjax import tree
from peftjax.models.bert import _config, _loader, _model

# peftjax path -> (HF tensor name, transposed), top-level leaves.
_TOP = {path: (name, transpose) for name, (path, transpose) in _loader._TOP.items()}
# peftjax layer sub-module -> HF module suffix.
_LAYER = {sub: hf for hf, sub in _loader._LAYER.items()}


def _hf_name(path: str) -> tuple[str, bool]:
    """``(HF tensor name, transpose)`` of one unrolled parameter path."""
    if path in _TOP:
        return _TOP[path]
    parts = path.split("/")
    sub, leaf = "/".join(parts[2:-1]), parts[-1]
    tensor = "bias" if leaf == "bias" else "weight"
    return f"encoder.layer.{parts[1]}.{_LAYER[sub]}.{tensor}", leaf == "kernel"


def _expected(cfg: _config.BertConfig, classifier: Any) -> dict[str, Any]:
    if classifier is None:
        abstract = nnx.eval_shape(lambda: _model.BertModel(cfg, rngs=nnx.Rngs(0)))
    else:
        n = int(np.shape(classifier["bias"])[0])
        abstract = nnx.eval_shape(
            lambda: _model.BertForSequenceClassification(
                cfg, num_labels=n, rngs=nnx.Rngs(0)
            )
        )
    return dict(tree.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))


def params_to_hf(params: dict, cfg: _config.BertConfig) -> dict[str, np.ndarray]:
    """Converts a pure BERT parameter dict to Hugging Face tensors.

    Args:
      params: from ``peftjax.models.split_params`` of a ``BertModel`` or
        ``BertForSequenceClassification`` (e.g. merged weights).
      cfg: its config.

    Returns:
      ``{HF tensor name: numpy array}`` in torch layout ``(out, in)``, in the
      parameters' dtype; ``classifier.weight``/``.bias`` when ``params`` has a
      classifier.

    Raises:
      ValueError: a missing parameter, a path the config does not have, or a
        shape that disagrees with the config (each named).

    Example:
      >>> import jax.numpy as jnp
      >>> c = _config.BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1,
      ...     num_attention_heads=2, intermediate_size=8)
      >>> params_to_hf({"embeddings": {}}, c)  # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
      ValueError: bert params_to_hf: missing parameters ...
    """
    if not isinstance(params, dict):
        raise TypeError(
            f"bert params_to_hf: params must be the pure dict of "
            f"split_params, got {type(params).__name__}"
        )
    expected = _expected(cfg, params.get("classifier"))
    flat = dict(tree.flatten(params))
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"bert params_to_hf: missing parameters {missing[:6]}")
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        if path not in expected:
            raise ValueError(
                f"bert params_to_hf: {path!r} (shape {tuple(np.shape(value))}) is not "
                f"a parameter of this config (num_hidden_layers="
                f"{cfg.num_hidden_layers})"
            )
        want = tuple(expected[path].shape)
        if tuple(np.shape(value)) != want:
            raise ValueError(
                f"bert params_to_hf: {path!r} has shape {tuple(np.shape(value))} "
                f"(dtype {value.dtype}), the config implies {want}"
            )
        name, transpose = _hf_name(path)
        arr = np.asarray(value)
        out[name] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def save_hf(
    directory: str | os.PathLike,
    params: dict,
    cfg: _config.BertConfig,
    *,
    metadata: dict[str, str] | None = None,
) -> pathlib.Path:
    """Writes ``config.json`` and ``model.safetensors`` (HF ``BertModel`` layout).

    Args:
      directory: created if missing.
      params: the pure parameter dict, e.g. ``adapters.fold(...)`` output.
      cfg: its config (``model_type`` ``"roberta"`` writes a ``RobertaModel``
        config).
      metadata: extra safetensors header metadata (``{"format": "pt"}`` is set).

    Returns:
      The directory as a ``pathlib.Path``; ``load_bert`` reads it back to the
      same parameters, and transformers' ``BertModel.from_pretrained(directory,
      add_pooling_layer=False)`` gives peftjax's last hidden states.

    Raises:
      ValueError: as :func:`params_to_hf`.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from peftjax.models import split_params
      >>> c = _config.BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1,
      ...     num_attention_heads=2, intermediate_size=8)
      >>> _, shapes = split_params(nnx.eval_shape(
      ...     lambda: _model.BertModel(c, rngs=nnx.Rngs(0))))
      >>> p = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      >>> d = save_hf(tempfile.mkdtemp(), p, c)
      >>> sorted(f.name for f in d.iterdir())
      ['config.json', 'model.safetensors']
    """
    tensors = params_to_hf(params, cfg)
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(cfg.to_hf(), indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    meta: dict[str, Any] = {"format": "pt", **(metadata or {})}
    pio.write_safetensors(out / "model.safetensors", tensors, metadata=meta)
    return out
