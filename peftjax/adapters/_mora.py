# SPDX-License-Identifier: Apache-2.0
"""MoRA: one square trainable matrix between non-parametric compress/decompress maps.

MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning. Jiang, Huang,
Luo, Zhang, Wang, Deng, Sun, Zhang, Wang & Zhuang, 2024.
https://arxiv.org/abs/2405.12130

The paper (Sec. 3) replaces LoRA's ``B A`` by one square ``M (r̂, r̂)``:
``h = W0 x + f_decomp(M f_comp(x))``, with non-parametric ``f_comp:
R^in -> R^r̂`` and ``f_decomp: R^r̂ -> R^out``, and ``r̂`` chosen so that
``r̂² = r·(in + out)``, LoRA's count at rank ``r``. ``ΔW = f_decomp ∘ M ∘
f_comp`` is linear, hence mergeable. The authors' code (``peft-mora``,
``LoraLayer._apply_mora`` and ``get_delta_weight``, followed here also where
it is more specific than the paper) sets ``r̂ = int(sqrt((in + out)·r) +
0.5)`` (rounded down to even for type 6), ``M = 0`` at init (the identity),
no scaling, and has these ``mora_type`` variants:

* 1 (Eq. 6, sharing): ``f_comp`` sums the input in ``r̂``-chunks
  (``x`` padded by wrapping its first features around, ``x_i -> h_{i mod
  r̂}``); ``f_decomp`` tiles the ``r̂`` outputs (``y_o = u_{o mod r̂}``).
* 2 (grouping on both sides): ``f_comp`` sums ``r̂`` contiguous groups
  of sizes ``⌈in/r̂⌉`` then ``⌊in/r̂⌋``; ``f_decomp`` repeats each of the
  ``r̂`` outputs over contiguous groups of ``out`` likewise
  (``repeat_interleave``).
* 3: type 2's grouped ``f_comp`` with type 1's tiled ``f_decomp``.
* 4: type 1's wrapped chunk sum with type 2's grouped ``f_decomp``.
* 5: the authors' legacy merge branch (``get_delta_weight``'s ``else``; its
  forward raises in the authors' code): chunk sum without wrap-around
  (zero padding) and ``f_decomp`` = each output repeated ``⌊out/r̂⌋`` times,
  then the ``r̂`` outputs once more, truncated to ``out``. peftjax defines its
  forward as that merged weight.
* 6 (Eq. 9, reshape + RoPE rotation, the paper's choice for small ranks):
  the wrapped input is reshaped to ``G = ⌈in/r̂⌉`` chunks ``x_b (r̂,)``, each
  rotated by RoPE at position ``b`` (``θ_j = 10000^(-2j/r̂)``, rotate-half
  pairing ``(j, j + r̂/2)``), ``M`` is applied to every chunk (no sum:
  ``ΔW`` is block-diagonal with blocks ``M R_b``), and the concatenated
  ``G·r̂`` outputs are truncated to ``out`` (tiled when shorter).

Layout: ``m = lora_A.weight.T`` of the authors' code (Flax rows: ``u = h @
m``). On a Flax kernel ``W0 (in, out)``, ``W' = W0 + ΔW`` with ``ΔW[i, o] =
Σ C[i, j] m[j, d(o)]`` for types 1-5 (``C`` the 0/1 compression, ``d`` the
decompression index) built by gathers, never by an ``(in, in)`` matrix.

Factored form: ``x W' = x W0 + f_decomp(f_comp(x) @ m)`` as a
``FactoredTerms.delta``: per row ``~in`` adds, ``2·r̂²`` FLOPs and an
``out``-gather for types 1-5 (``2·r̂² = 2·r·(in + out)``, LoRA's), and
``2·G·r̂² ≈ 2·in·r̂`` plus ``~3·in`` for the rotations for type 6. No
``(in, out)`` temporary.

Exports: ``MoRAParams``, ``mora``, ``mora_rank``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol

MORA_TYPES = (1, 2, 3, 4, 5, 6)


class MoRAParams(NamedTuple):
    """Trainable MoRA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      m: ``(r̂, r̂)`` square matrix, the authors' ``lora_A.weight`` transposed.
    """

    m: jax.Array


def _check_type(mora_type: Any) -> int:
    if isinstance(mora_type, bool) or not isinstance(mora_type, (int, np.integer)) or (
            int(mora_type) not in MORA_TYPES):
        raise ValueError(f"mora: mora_type must be one of {MORA_TYPES}, got {mora_type!r}")
    return int(mora_type)


def mora_rank(n_in: int, n_out: int, rank: int, mora_type: int = 1) -> int:
    """``r̂`` for an ``(in, out)`` matrix at LoRA rank ``r``, as the authors compute it.

    ``r̂ = int(sqrt((in + out)·r) + 0.5)``, rounded down to even for type 6
    (RoPE pairs); ``r̂² ≈ r·(in + out)``, LoRA's trainable count.

    Args:
      n_in: input features.
      n_out: output features.
      rank: the LoRA-equivalent rank ``r``.
      mora_type: the variant (1-6).

    Returns:
      ``r̂`` (a Python int).

    Raises:
      ValueError: ``r̂ < 1`` (``< 2`` for type 6) or a bad ``mora_type``.

    Example:
      >>> mora_rank(576, 576, 8), mora_rank(576, 192, 8), mora_rank(576, 193, 8, 6)
      (96, 78, 78)
    """
    mora_type = _check_type(mora_type)
    r_hat = int(math.sqrt((n_in + n_out) * rank) + 0.5)
    if mora_type == 6:
        r_hat = r_hat // 2 * 2
    if r_hat < (2 if mora_type == 6 else 1):
        raise ValueError(f"mora: r_hat={r_hat} is too small for a matrix view of shape "
                         f"({n_in}, {n_out}) at rank {rank} (mora_type={mora_type})")
    return r_hat


def _groups(n: int, r: int) -> np.ndarray:
    """Group index of each of ``n`` positions split into ``r`` contiguous groups.

    The authors' types 2-4: ``m = n - r·⌊n/r⌋`` groups of ``⌊n/r⌋ + 1``, then
    ``r - m`` groups of ``⌊n/r⌋`` (empty when ``n < r``).
    """
    mr, nr = n // r + 1, n // r
    m = n - r * nr
    idx = np.arange(n)
    head = m * mr
    return np.where(idx < head, idx // mr, m + (idx - head) // max(nr, 1)).astype(np.int32)


def _decompress_index(n_out: int, r: int, mora_type: int, n_comp: int) -> np.ndarray:
    """``d(o)``: which compressed output feeds output ``o``."""
    o = np.arange(n_out)
    if mora_type in (1, 3):
        return (o % r).astype(np.int32)
    if mora_type in (2, 4):
        return _groups(n_out, r)
    if mora_type == 5:
        k = n_out // r
        return np.where(o < k * r, o // max(k, 1), o - k * r).astype(np.int32)
    return (o % n_comp).astype(np.int32)  # type 6: tile the G·r̂ outputs


def _rope(n_blocks: int, r: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``cos, sin (G, r̂)`` of the authors' RoPE at positions ``0..G-1``."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, r, 2, dtype=np.float64) / r))
    freqs = np.outer(np.arange(n_blocks, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(emb), dtype), jnp.asarray(np.sin(emb), dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _compress(x: jax.Array, r: int, mora_type: int) -> jax.Array:
    """``f_comp``: ``(..., in) -> (..., r̂)`` (types 1-5) or ``(..., G, r̂)`` (type 6)."""
    n_in = x.shape[-1]
    lead = x.shape[:-1]
    g = -(-n_in // r)
    if mora_type in (1, 4, 6):  # pad by wrapping the first features around
        xp = jnp.take(x, jnp.asarray(np.arange(g * r) % n_in), axis=-1)
        xp = xp.reshape(lead + (g, r))
        if mora_type == 6:
            cos, sin = _rope(g, r, x.dtype)
            cos, sin = (c.reshape((1,) * len(lead) + c.shape) for c in (cos, sin))
            return xp * cos + _rotate_half(xp) * sin
        return xp.sum(axis=-2)
    if mora_type == 5:  # zero padding
        xp = jnp.concatenate([x, jnp.zeros(lead + (g * r - n_in,), x.dtype)], axis=-1)
        return xp.reshape(lead + (g, r)).sum(axis=-2)
    mr, nr = n_in // r + 1, n_in // r  # types 2, 3: contiguous groups
    m = n_in - r * nr
    head = m * mr
    parts = []
    if m:
        parts.append(x[..., :head].reshape(lead + (m, mr)).sum(axis=-1))
    if nr:
        parts.append(x[..., head:].reshape(lead + (r - m, nr)).sum(axis=-1))
    else:
        parts.append(jnp.zeros(lead + (r - m,), x.dtype))
    return jnp.concatenate(parts, axis=-1)


# Jitted (shapes and variant static) so that eager use compiles one program
# instead of one per primitive; inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _delta_rows(x: jax.Array, m: jax.Array, n_out: int, mora_type: int) -> jax.Array:
    """``f_decomp(f_comp(x) @ m)`` for rows ``x (..., in)``."""
    r = m.shape[0]
    h = _compress(x, r, mora_type) @ m
    if mora_type == 6:
        h = h.reshape(h.shape[:-2] + (-1,))
    d = _decompress_index(n_out, r, mora_type, h.shape[-1])
    return jnp.take(h, jnp.asarray(d), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _delta_weight(n_in: int, n_out: int, m: jax.Array, mora_type: int) -> jax.Array:
    """``ΔW (in, out)`` by gathers (no ``(in, in)`` or identity temporary)."""
    r = m.shape[0]
    g = -(-n_in // r)
    if mora_type == 6:
        cos, sin = _rope(g, r, m.dtype)
        half = r // 2
        m_rot = jnp.concatenate([m[half:], -m[:half]], axis=0)
        # Block b: rows x_b ↦ x_b Q_b m with Q_b the RoPE rotation, i.e. K_b.
        blocks = cos[:, :, None] * m[None] + sin[:, :, None] * m_rot[None]  # (G, r, r)
        d = _decompress_index(n_out, r, mora_type, g * r)
        p = np.arange(g * r)
        same = (p[:, None] // r) == (d[None, :] // r)
        full = blocks[p[:, None] // r, p[:, None] % r, d[None, :] % r]
        padded = jnp.where(jnp.asarray(same), full, jnp.zeros((), m.dtype))
        return jnp.zeros((n_in, n_out), m.dtype).at[jnp.asarray(p % n_in)].add(padded)
    y = jnp.take(m, jnp.asarray(_decompress_index(n_out, r, mora_type, r)), axis=1)
    if mora_type in (2, 3):
        return jnp.take(y, jnp.asarray(_groups(n_in, r)), axis=0)
    rows = np.arange(n_in)
    out = jnp.take(y, jnp.asarray(rows % r), axis=0)
    if mora_type in (1, 4) and g * r > n_in:  # the wrapped-around features
        p = np.arange(n_in, g * r)
        out = out.at[jnp.asarray(p % n_in)].add(jnp.take(y, jnp.asarray(p % r), axis=0))
    return out


def mora(
    rank: int = 8,
    *,
    mora_type: int = 1,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """MoRA: ``W' = W0 + f_decomp ∘ M ∘ f_comp`` with one trainable ``M (r̂, r̂)``.

    ``r̂ = mora_rank(in, out, rank, mora_type)`` per matrix, so the trainable
    count ``r̂² ≈ rank·(in + out)`` matches LoRA at ``rank``; nothing is
    frozen. ``M = 0`` at init (the identity, as the authors' code). Mergeable
    (``unapply`` subtracts the same ``ΔW``). The factored path computes
    ``f_decomp(f_comp(x) @ M)`` on the activations (see the module docstring
    for the variants and the per-row FLOPs).

    Args:
      rank: the LoRA-equivalent rank ``r`` (the authors' ``r``; default 8).
      mora_type: 1-6, the compress/decompress variant (the authors'
        ``mora_type``; 1, Eq. 6, is their config default; 6, the RoPE-rotated
        reshape of Eq. 9, is what they use for small ranks).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``m``.
      dropout: adapter-input dropout (factored path only; the authors apply
        it to the input of ``f_comp``).

    Returns:
      An ``Adapter`` with trainable ``MoRAParams(m)`` and frozen None.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``mora_type`` not in 1-6; at init, ``r̂``
        too small for the matrix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = mora(8, mora_type=6)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((40, 24)))
      >>> t.m.shape, f  # r̂ = int(sqrt(64·8) + 0.5) = 23, even for type 6
      ((22, 22), None)
      >>> float(abs(t.m).max())  # M = 0: W' = W at init
      0.0

    References:
      Jiang et al., 2024, https://arxiv.org/abs/2405.12130
    """
    rank = _lora.check_rank(rank, "mora")
    mora_type = _check_type(mora_type)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("mora takes no stats")
        r_hat = mora_rank(w.shape[0], w.shape[1], rank, mora_type)
        return MoRAParams(m=jnp.zeros((r_hat, r_hat), param_dtype)), None

    def delta(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.m.dtype)
        return ct, _delta_weight(w.shape[0], w.shape[1], t.m.astype(ct), mora_type)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        n_out = w.shape[1]

        def run(x):
            ct = _lowrank.compute_dtype(x.dtype, t.m.dtype)
            return _delta_rows(x.astype(ct), t.m.astype(ct), n_out, mora_type)

        return _protocol.FactoredTerms(delta=run)

    return _lift.lift_matrix(
        name=f"mora(rank={rank}, mora_type={mora_type})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("mora_type", mora_type)),
    )
