# SPDX-License-Identifier: Apache-2.0
"""Rotary position embeddings (RoPE) with ``rope_theta`` and frequency scaling.

"RoFormer: Enhanced Transformer with Rotary Position Embedding", Su et al.,
2021, https://arxiv.org/abs/2104.09864. Uses the Hugging Face "rotate half"
convention (the two halves of a head are the two rotation coordinates), which
is the layout of HF checkpoints and of GGUF tensors once llama.cpp's row
permutation is undone.

Exports: ``inv_frequencies``, ``rope_angles``, ``apply_rope``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models.llama import _config


def inv_frequencies(cfg: _config.LlamaConfig) -> np.ndarray:
    """Returns the ``head_dim // 2`` inverse frequencies, scaling applied.

    Args:
      cfg: the model config (``head_dim``, ``rope_theta``, ``rope_scaling``).

    Returns:
      A float32 numpy array ``(head_dim // 2,)``.

    Example:
      >>> c = _config.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
      >>> inv_frequencies(c).tolist()
      [1.0, 0.009999999776482582]
    """
    dim = cfg.dim_head
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
        dim
    )
    inv = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = (inv / np.float32(rs.factor)).astype(np.float32)
    elif rs.rope_type == "llama3":
        old = float(rs.original_max_position_embeddings)
        low_wavelen = old / rs.low_freq_factor
        high_wavelen = old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv.astype(np.float64)
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_angles(
    positions: jax.Array, inv_freq: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """Returns ``cos`` and ``sin`` of the rotation angles, float32.

    Args:
      positions: integer positions ``(B, T)``.
      inv_freq: ``(D/2,)`` from :func:`inv_frequencies`.

    Returns:
      ``(cos, sin)``, each ``(B, T, D)`` (the half-width angles repeated twice).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> c, s = rope_angles(jnp.zeros((1, 2), jnp.int32), np.ones(2, np.float32))
      >>> c.shape
      (1, 2, 4)
    """
    freqs = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * freqs[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``(B, T, heads, D)`` by the angles ``(B, T, D)``.

    Args:
      x: queries or keys.
      cos: from :func:`rope_angles`.
      sin: from :func:`rope_angles`.

    Returns:
      The rotated array, same shape and dtype as ``x``.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> c, s = rope_angles(jnp.zeros((1, 1), jnp.int32), np.ones(1, np.float32))
      >>> apply_rope(jnp.ones((1, 1, 1, 2)), c, s).tolist()
      [[[[1.0, 1.0]]]]
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
