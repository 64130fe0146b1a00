# SPDX-License-Identifier: Apache-2.0
"""Configuration of the Llama-family decoder, from HF ``config.json`` or GGUF.

Covers Llama 2/3, Mistral, Qwen2 and SmolLM2: grouped-query attention, RoPE
with ``rope_theta`` and optional scaling (``default``, ``linear``, ``llama3``),
RMSNorm, SwiGLU, tied or untied head, optional q/k/v bias (Qwen2) and
Mistral's sliding window.

Exports: ``LlamaConfig``, ``RopeScaling``.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling.

    Attributes:
      rope_type: ``"default"`` (none), ``"linear"`` (positions divided by
        ``factor``) or ``"llama3"`` (Llama 3.1's smooth wavelength-dependent
        scaling).
      factor: the scaling factor.
      low_freq_factor: llama3 only.
      high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3 only.

    Example:
      >>> RopeScaling(rope_type="llama3", factor=8.0).rope_type
      'llama3'
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"RopeScaling: unsupported rope_type {self.rope_type!r}; "
                f"supported: {_ROPE_TYPES}"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | None) -> "RopeScaling":
        """Builds from HF's ``rope_scaling`` / ``rope_parameters`` dict.

        Args:
          d: the dict (``None`` means no scaling).

        Returns:
          The scaling.

        Raises:
          ValueError: an unknown ``rope_type``.

        Example:
          >>> RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0}).factor
          2.0
        """
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"RopeScaling: unsupported rope_type {rope_type!r} in config "
                f"{dict(d)}; supported: {_ROPE_TYPES}"
            )
        kw: dict[str, Any] = {"rope_type": rope_type}
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if d.get(name) is not None:
                kw[name] = float(d[name])
        if d.get("original_max_position_embeddings") is not None:
            kw["original_max_position_embeddings"] = int(
                d["original_max_position_embeddings"]
            )
        return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family decoder.

    Attributes:
      vocab_size: V.
      hidden_size: d.
      intermediate_size: the SwiGLU width.
      num_hidden_layers: L.
      num_attention_heads: H.
      num_key_value_heads: KV heads (GQA); must divide H.
      head_dim: per-head width (default d // H).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_scaling: RoPE frequency scaling.
      tie_word_embeddings: the head reuses ``embed_tokens/embedding``.
      attention_bias: q/k/v projections have biases (Qwen2).
      sliding_window: attend only to the last ``sliding_window`` keys (Mistral);
        ``None`` for full causal attention.
      max_position_embeddings: informational (the context length).
      bos_token_id: beginning-of-sequence id, or ``None``.
      eos_token_id: end-of-sequence id(s).
      model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"``.

    Example:
      >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
      >>> c.head_dim
      4
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    model_type: str = "llama"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(
                    f"LlamaConfig: {name} must be a positive int, got {v!r}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_key_value_heads={self.num_key_value_heads} must "
                f"divide num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig: hidden_size={self.hidden_size} is not divisible "
                    f"by num_attention_heads={self.num_attention_heads}; give head_dim"
                )
            object.__setattr__(
                self, "head_dim", self.hidden_size // self.num_attention_heads
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even, got {self.head_dim}")

    @property
    def dim_head(self) -> int:
        """The per-head width as an int (``head_dim`` resolved)."""
        return int(self.head_dim)  # type: ignore[arg-type]

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """Builds a config from a Hugging Face ``config.json`` dict.

        Args:
          d: the parsed ``config.json``.

        Returns:
          The config.

        Raises:
          ValueError: an unsupported ``model_type`` or rope scaling type.

        Example:
          >>> c = LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 32,
          ...     "hidden_size": 16, "intermediate_size": 32,
          ...     "num_hidden_layers": 2, "num_attention_heads": 4})
          >>> c.num_key_value_heads, c.head_dim
          (4, 4)
        """
        model_type = d.get("model_type")
        if model_type not in _HF_MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig.from_hf: unsupported model_type {model_type!r} "
                f"(architectures={d.get('architectures')}); "
                f"supported: {_HF_MODEL_TYPES}"
            )
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        theta = d.get("rope_theta")
        if theta is None and isinstance(rope, Mapping):
            theta = rope.get("rope_theta")
        eos = d.get("eos_token_id")
        heads = int(d["num_attention_heads"])
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=None if d.get("head_dim") is None else int(d["head_dim"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=RopeScaling.from_hf(
                rope if isinstance(rope, Mapping) else None
            ),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (its config has no such field).
            attention_bias=model_type == "qwen2"
            or bool(d.get("attention_bias", False)),
            sliding_window=None if window is None else int(window),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """Returns the Hugging Face ``config.json`` dict of this config.

        Returns:
          A JSON-serialisable dict that :meth:`from_hf` maps back to ``self``.

        Example:
          >>> c = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
          ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
          >>> LlamaConfig.from_hf(c.to_hf()) == c
          True
        """
        rs = self.rope_scaling
        rope = None if rs.rope_type == "default" else dataclasses.asdict(rs)
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }[self.model_type]
        eos = (
            list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else (self.eos_token_id)
        )
        return {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window,
            "use_sliding_window": self.sliding_window is not None,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "hidden_act": "silu",
        }
