# SPDX-License-Identifier: Apache-2.0
"""GraLoRA: a ``k × k`` grid of independent low-rank blocks, as PEFT's ``GRALORA``.

GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning.
Jung, Ahn, Kim, Kim & Park, 2025. https://arxiv.org/abs/2505.20355

The paper splits the weight into a ``k × k`` grid of sub-blocks and gives each
its own rank-``r/k`` LoRA pair, so the update has rank up to ``k·r`` for the
``r·(in + out)`` parameters of a rank-``r`` LoRA. Hugging Face PEFT
(``tuners/gralora``, followed here for its files) stores the pairs packed:
``gralora_A (k, in/k, r)`` and ``gralora_B (k, r, out/k)``, where input block
``n`` has one rank-``r`` projection ``A[n]`` whose ``j``-th rank slice of
width ``r/k`` feeds output block ``j``, and ``B[j]``'s ``n``-th row slice
reads it back. On a Flax kernel ``(in, out)`` (PEFT's tensors already put the
input axis first, so they are used as stored), block ``(n, j)`` of the update
(rows ``n·in/k ...``, columns ``j·out/k ...``) is

    ``ΔW[n, j] = s · A[n][:, j·r/k : (j+1)·r/k] @ B[j][n·r/k : (n+1)·r/k, :]``

with ``s = alpha / (r + hybrid_r)``. Hybrid GraLoRA (``hybrid_r > 0``) adds a
plain LoRA pair over the whole matrix, ``s · a_hybrid @ b_hybrid`` with
``a_hybrid = gralora_A_general.weightᵀ (in, hybrid_r)`` and ``b_hybrid =
gralora_B_general.weightᵀ (hybrid_r, out)``, under the same ``s``.

Initialisation as PEFT's ``init_weights=True``: every ``A`` kaiming-uniform
with ``a=sqrt(5)`` (bound ``1/sqrt(fan_in)``, torch fan-in ``in/k`` for the
blocks and ``in`` for the hybrid pair), every ``B`` zero: the identity at
init. ``init_weights=False`` (PEFT's test setting) draws the ``B`` factors
kaiming-uniform too (bound ``1/sqrt(r)``, ``1/sqrt(hybrid_r)``).

Factored form: ``x`` is reshaped into ``k`` input blocks ``(..., k, in/k)``,
each projected by its ``A[n]`` to ``(..., k, r)``; the rank slices are
regrouped by output block (``(..., k_out, k_in·r/k)``) and each output block
is one product with ``B[j]``: ``r·(in + out)`` multiply-adds per row, the same
as LoRA, and no ``(in, out)`` matrix.

Exports: ``GraLoRAParams``, ``gralora``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class GraLoRAParams(NamedTuple):
    """Trainable GraLoRA factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(k, in/k, r)`` = PEFT ``gralora_A`` (as stored).
      b: ``(k, r, out/k)`` = PEFT ``gralora_B`` (as stored).
      a_hybrid: ``(in, hybrid_r)`` = PEFT ``gralora_A_general.weight.T``, or
        None when ``hybrid_r = 0``.
      b_hybrid: ``(hybrid_r, out)`` = PEFT ``gralora_B_general.weight.T``, or
        None.
    """

    a: jax.Array
    b: jax.Array
    a_hybrid: jax.Array | None = None
    b_hybrid: jax.Array | None = None


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"gralora: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _block_delta(a: jax.Array, b: jax.Array, k: int) -> jax.Array:
    """The block-grid product ``(in, out)`` (unscaled) from ``a``, ``b``."""
    _, in_k, r = a.shape
    out_k = b.shape[-1]
    rs = r // k
    a4 = a.reshape(k, in_k, k, rs)  # (n, i, j, t)
    b4 = b.reshape(k, k, rs, out_k)  # (j, n, t, o)
    d = jnp.einsum("nijt,jnto->nijo", a4, b4)
    return d.reshape(k * in_k, k * out_k)


def gralora(
    rank: int = 32,
    *,
    alpha: float = 64.0,
    gralora_k: int = 2,
    hybrid_r: int = 0,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """GraLoRA: ``W' = W + s·(block-grid update + a_hybrid@b_hybrid)``.

    ``k²`` rank-``r/k`` blocks (see the module docstring for the layout),
    plus an optional whole-matrix LoRA pair of rank ``hybrid_r``; ``s =
    alpha / (r + hybrid_r)``. Identity at init (PEFT's ``B = 0``).
    Trainable parameters: ``(r + hybrid_r)·(in + out)`` per matrix, PEFT's
    count. The factored path takes the block form ``x -> (k, in/k) @ A ->
    regroup -> @ B`` plus ``s·(x@a_hybrid)@b_hybrid`` (``O((r + hybrid_r)·(in
    + out))`` per row, no ``(in, out)`` matrix); ``apply`` forms the update
    and ``unapply`` subtracts it (exact up to rounding).

    Args:
      rank: ``r`` (static; PEFT's default 32), a multiple of ``gralora_k``.
      alpha: PEFT's ``alpha`` (default 64).
      gralora_k: ``k``, the grid size (PEFT's default 2); ``in`` and ``out``
        must be multiples of it.
      hybrid_r: rank of the hybrid whole-matrix LoRA pair (default 0: none).
      init_weights: True (PEFT's default): ``B`` factors zero; False: every
        factor kaiming-uniform (PEFT's ``init_weights=False``, not the
        identity).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the factors.
      dropout: PEFT's ``gralora_dropout`` on the adapter input (factored path
        only, as for ``lora``).

    Returns:
      An ``Adapter`` with trainable ``GraLoRAParams`` and frozen part None.

    Static arguments: all.

    Raises:
      ValueError: ``rank`` not a positive multiple of ``gralora_k``, a
        negative ``hybrid_r``, ``alpha <= 0``; at init, ``in`` or ``out`` not
        divisible by ``gralora_k`` (naming the matrix shape).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = gralora(4, alpha=8.0, gralora_k=2, hybrid_r=1)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 4)))
      >>> t.a.shape, t.b.shape, t.a_hybrid.shape, t.b_hybrid.shape, f
      ((2, 3, 4), (2, 4, 2), (6, 1), (1, 4), None)
      >>> bool((ad.apply(jnp.ones((6, 4)), t, f) == 1.0).all())
      True

    References:
      Jung et al., 2025, https://arxiv.org/abs/2505.20355
    """
    rank = _lora.check_rank(rank, "gralora")
    k = _check_int(gralora_k, "gralora_k", 1)
    hybrid_r = _check_int(hybrid_r, "hybrid_r", 0)
    if rank % k:
        raise ValueError(f"gralora: rank must be divisible by gralora_k, got "
                         f"rank={rank}, gralora_k={k}")
    s = _lora.check_alpha(alpha, "gralora") / (rank + hybrid_r)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("gralora takes no stats")
        n_in, n_out = w.shape
        if n_in % k or n_out % k:
            raise ValueError(
                f"gralora: the matrix view (in={n_in}, out={n_out}) of a leaf with "
                f"dtype {w.dtype} is not divisible into gralora_k={k} blocks on "
                "both sides (PEFT requires in % k == 0 and out % k == 0)")
        ka, kb, kha, khb = jax.random.split(key, 4)

        def uniform(key, shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(
                param_dtype)

        a = uniform(ka, (k, n_in // k, rank), n_in // k)
        b = (uniform(kb, (k, rank, n_out // k), rank) if not init_weights
             else jnp.zeros((k, rank, n_out // k), param_dtype))
        a_h = b_h = None
        if hybrid_r:
            a_h = uniform(kha, (n_in, hybrid_r), n_in)
            b_h = (uniform(khb, (hybrid_r, n_out), hybrid_r) if not init_weights
                   else jnp.zeros((hybrid_r, n_out), param_dtype))
        return GraLoRAParams(a, b, a_h, b_h), None

    def delta(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        d = _block_delta(t.a.astype(ct), t.b.astype(ct), k)
        if t.a_hybrid is not None:
            d = d + t.a_hybrid.astype(ct) @ t.b_hybrid.astype(ct)
        return ct, d * jnp.asarray(s, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        def run(x):
            ct = _lowrank.compute_dtype(x.dtype, t.a.dtype)
            _, in_k, r = t.a.shape
            out_k = t.b.shape[-1]
            lead = x.shape[:-1]
            xb = x.astype(ct).reshape(lead + (k, in_k))
            h = jnp.einsum("...ni,nir->...nr", xb, t.a.astype(ct))
            h = h.reshape(lead + (k, k, r // k)) * jnp.asarray(s, ct)
            b4 = t.b.astype(ct).reshape(k, k, r // k, out_k)
            y = jnp.einsum("...njt,jnto->...jo", h, b4).reshape(lead + (k * out_k,))
            if t.a_hybrid is not None:
                y = y + _lowrank.low_rank(x, t.a_hybrid, t.b_hybrid, s).astype(ct)
            return y

        return _protocol.FactoredTerms(delta=run)

    return _lift.lift_matrix(
        name=(f"gralora(rank={rank}, alpha={alpha}, gralora_k={k}, "
              f"hybrid_r={hybrid_r})"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("alpha", float(alpha)), ("gralora_k", k),
                         ("hybrid_r", hybrid_r), ("dropout", float(dropout))),
    )
