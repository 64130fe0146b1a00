# SPDX-License-Identifier: Apache-2.0
"""A tiny Llama configuration for smoke runs, benchmarks' smoke modes and tests.

One canonical size, so examples, benchmarks and tests build the same small
model; a caller needing another size overrides fields by name.

Exports: ``tiny_config``.
"""

from typing import Any

from peftjax.models.llama import _config

_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def tiny_config(**overrides: Any) -> _config.LlamaConfig:
    """A tiny random-initialisable Llama configuration (seconds to compile on a CPU).

    The canonical size: vocabulary 256 (one id per byte), hidden size 64,
    SwiGLU width 128, 2 layers, 4 attention heads over 2 key/value heads
    (grouped-query attention, head width 16), tied embedding and head, the
    ``LlamaConfig`` defaults elsewhere (RoPE base 10000, RMSNorm epsilon
    1e-5). 90,432 parameters.

    Args:
      **overrides: ``LlamaConfig`` fields replacing the canonical values,
        e.g. ``num_hidden_layers=4`` or ``tie_word_embeddings=False``.

    Returns:
      The configuration.

    Raises:
      TypeError: an override names no ``LlamaConfig`` field.

    Example:
      >>> c = tiny_config(num_hidden_layers=4)
      >>> c.vocab_size, c.hidden_size, c.num_hidden_layers, c.head_dim
      (256, 64, 4, 16)
    """
    fields = set(_config.LlamaConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"tiny_config: {unknown} are not LlamaConfig fields "
                        f"(fields: {sorted(fields)})")
    return _config.LlamaConfig(**{**_TINY, **overrides})
