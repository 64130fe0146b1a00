# SPDX-License-Identifier: Apache-2.0
"""Configuration of the BERT-family encoder (BERT, MiniLM, RoBERTa).

Exports: ``BertConfig``.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

_MODEL_TYPES = ("bert", "roberta")
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Hyperparameters of a BERT-family encoder.

    Attributes:
      vocab_size: V.
      hidden_size: d.
      num_hidden_layers: L.
      num_attention_heads: H (must divide d).
      intermediate_size: the feed-forward width.
      hidden_act: ``"gelu"`` (exact, erf), ``"gelu_new"`` /
        ``"gelu_pytorch_tanh"`` (tanh approximation) or ``"relu"``.
      layer_norm_eps: LayerNorm epsilon.
      max_position_embeddings: number of learned positions.
      type_vocab_size: number of token types (segments).
      pad_token_id: padding id (RoBERTa positions start after it).
      model_type: ``"bert"`` (positions ``0..T-1``) or ``"roberta"``
        (positions ``pad_token_id + 1 + index`` over non-padding tokens).

    Example:
      >>> BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
      ...     num_attention_heads=2, intermediate_size=16).model_type
      'bert'
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    model_type: str = "bert"

    def __post_init__(self):
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(
                f"BertConfig: unsupported model_type {self.model_type!r}; "
                f"supported: {_MODEL_TYPES}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig: unsupported hidden_act {self.hidden_act!r}; "
                f"supported: {_ACTIVATIONS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: num_attention_heads={self.num_attention_heads} "
                f"must divide hidden_size={self.hidden_size}"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "BertConfig":
        """Builds a config from a Hugging Face ``config.json`` dict.

        Args:
          d: the parsed ``config.json``.

        Returns:
          The config.

        Raises:
          ValueError: an unsupported ``model_type`` or activation, or a
          ``position_embedding_type`` other than ``"absolute"``.

        Example:
          >>> BertConfig.from_hf({"model_type": "bert", "vocab_size": 10,
          ...     "hidden_size": 8, "num_hidden_layers": 1,
          ...     "num_attention_heads": 2, "intermediate_size": 16}).hidden_act
          'gelu'
        """
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(
                f"BertConfig.from_hf: unsupported position_embedding_type "
                f"{pos!r}; only 'absolute' is supported"
            )
        if d.get("model_type") not in _MODEL_TYPES:
            raise ValueError(
                f"BertConfig.from_hf: unsupported model_type "
                f"{d.get('model_type')!r} (architectures="
                f"{d.get('architectures')}); supported: {_MODEL_TYPES}"
            )
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            hidden_act=str(d.get("hidden_act", "gelu")),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            pad_token_id=int(d.get("pad_token_id") or 0),
            model_type=str(d["model_type"]),
        )

    def to_hf(self) -> dict[str, Any]:
        """Returns the Hugging Face ``config.json`` dict of this config.

        Returns:
          A JSON-serialisable dict that :meth:`from_hf` maps back to ``self``.

        Example:
          >>> c = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
          ...     num_attention_heads=2, intermediate_size=16)
          >>> BertConfig.from_hf(c.to_hf()) == c
          True
        """
        d = dataclasses.asdict(self)
        d["architectures"] = [
            "RobertaModel" if self.model_type == "roberta" else "BertModel"
        ]
        d["position_embedding_type"] = "absolute"
        return d
