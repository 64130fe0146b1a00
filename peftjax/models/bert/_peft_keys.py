# SPDX-License-Identifier: Apache-2.0
"""The Hugging Face PEFT key map of the BERT family (declarative).

Module names are those of transformers' ``BertModel``
(``encoder.layer.{i}.attention.self.query``) or, for the classification
layout, of ``BertForSequenceClassification`` (``bert.`` prefix and a top-level
``classifier``), which is what PEFT adapter files name after
``base_model.model.``.

Exports: ``peft_key_map``.
"""

from peftjax import io as pio
from peftjax.models.bert import _config, _loader

_KERNEL = pio.TensorLayout.KERNEL
_EMBEDDING = pio.TensorLayout.EMBEDDING
_VECTOR = pio.TensorLayout.VECTOR


def _leaf(path_leaf: str, hf_tensor: str, transpose: bool) -> pio.TensorLayout:
    if transpose:
        return _KERNEL
    if path_leaf == "embedding":
        return _EMBEDDING
    return _VECTOR


def peft_key_map(cfg: _config.BertConfig, *, num_labels: int | None = None,
                 backbone_prefix: str | None = None) -> dict[str, pio.PeftKey]:
    """``{unrolled path: PeftKey}`` for ``peftjax.io.save_peft``/``load_peft``.

    Args:
      cfg: the config (number of layers).
      num_labels: the classification layout (adds ``classifier``); the torch
        model is then ``BertForSequenceClassification``.
      backbone_prefix: the backbone's module prefix; default ``""`` for
        ``BertModel`` and ``"bert."`` with ``num_labels`` (``"roberta."``
        for RoBERTa).

    Returns:
      The key map.

    Example:
      >>> c = _config.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, intermediate_size=8)
      >>> peft_key_map(c)["layers/0/attention/query/kernel"].module
      'encoder.layer.0.attention.self.query'
      >>> peft_key_map(c, num_labels=2)["classifier/kernel"].module
      'classifier'
    """
    if backbone_prefix is None:
        backbone_prefix = "" if num_labels is None else "bert."
    out: dict[str, pio.PeftKey] = {}
    for name, (path, transpose) in _loader._TOP.items():
        module, tensor = name.rsplit(".", 1)
        if path.startswith("classifier/"):
            if num_labels is None:
                continue
        else:
            module = backbone_prefix + module
        out[path] = pio.PeftKey(
            module, tensor, _leaf(path.rsplit("/", 1)[1], tensor, transpose))
    for i in range(cfg.num_hidden_layers):
        for hf_module, sub in _loader._LAYER.items():
            module = f"{backbone_prefix}encoder.layer.{i}.{hf_module}"
            norm = sub.endswith("norm")
            first = "scale" if norm else "kernel"
            out[f"layers/{i}/{sub}/{first}"] = pio.PeftKey(
                module, "weight", _VECTOR if norm else _KERNEL)
            out[f"layers/{i}/{sub}/bias"] = pio.PeftKey(module, "bias", _VECTOR)
    return out
