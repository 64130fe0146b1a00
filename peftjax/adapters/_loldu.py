# SPDX-License-Identifier: Apache-2.0
"""LoLDU: train only the diagonal of the weight's LDU decomposition.

LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning. Shi, Ye, Li, Wang & Yang, 2024.
https://arxiv.org/abs/2410.13618

The torch-layout weight ``W (out, in)`` is factored by LU with partial
pivoting, ``W = P L D U`` (``L`` unit lower-triangular ``(out, m)``, ``D``
diagonal, ``U`` unit upper-triangular ``(m, in)``, ``m = min(out, in)``; the
paper's LDU decomposition). The leading ``r`` columns of ``L`` and rows of
``U`` are frozen and the diagonal ``z (r,)``, initialised to ``D_r``, trains;
a scaling factor ``σ = alpha / r`` multiplies the term. The authors' code
(``minloldu/loldu.py``, followed here) subtracts the term at init and adds
it back in the forward pass, ``W' = (W - σ P L_r diag(D_r) U_r) + σ P L_r
diag(z) U_r``; peftjax applies the same update without re-forming the
residual:

``W' = W + σ · P L_r diag(z - D_r) U_r``

which is exactly ``W`` at init (``z = D_r``). The code's ``scaling_factor`` is
a parameter left out of its optimizer (only ``vector_z`` trains), so it is a
constant here; its default ``alpha = 1`` gives ``σ = 1/r``. A zero pivot
(a rank-deficient ``W``) leaves that row of ``U`` unnormalised instead of
dividing by zero.

On a Flax kernel ``K (in, out) = Wᵀ`` the LU is taken of ``Kᵀ`` (the
torch weight, as the authors do) and stored transposed: ``u = U_rᵀ (in, r)``,
``lower = (P L_r)ᵀ (r, out)``, so ``ΔK = σ · u diag(z - D_r) lower``.

Factored form: ``Δy = σ·((x u) ⊙ (z - D_r)) lower``: ``2·r·(in + out)`` FLOPs
per row, no ``(in, out)`` temporary.

Exports: ``LoLDUParams``, ``LoLDUFactors``, ``loldu``, ``ldu``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class LoLDUParams(NamedTuple):
    """Trainable LoLDU diagonal (per matrix).

    Attributes:
      z: ``(r,)`` the code's ``vector_z``, initialised to ``D_r``.
    """

    z: jax.Array


class LoLDUFactors(NamedTuple):
    """Frozen LDU factors of the torch-layout weight (per matrix).

    Attributes:
      u: ``(in, r)``: ``U_rᵀ``, the leading rows of the unit upper factor.
      lower: ``(r, out)``: ``(P L_r)ᵀ``, the leading columns of the
        row-permuted unit lower factor.
      d: ``(r,)`` the initial diagonal ``D_r`` (the update uses ``z - d``).
    """

    u: jax.Array
    lower: jax.Array
    d: jax.Array


def ldu(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """LU with partial pivoting, split as ``w = p @ l @ diag(d) @ u``.

    Args:
      w: ``(m, n)`` floating matrix (torch layout ``(out, in)`` in LoLDU).

    Returns:
      ``p (m, m)`` permutation, ``l (m, k)`` unit lower-triangular, ``d (k,)``
      the pivots, ``u (k, n)`` unit upper-triangular, ``k = min(m, n)``. A
      zero pivot leaves its row of ``u`` as is.

    Example:
      >>> import jax.numpy as jnp
      >>> p, l, d, u = ldu(jnp.array([[1.0, 2.0], [4.0, 2.0]]))
      >>> d.tolist(), u.tolist()
      ([4.0, 1.5], [[1.0, 0.5], [0.0, 1.0]])
    """
    p, lower, upper = jax.scipy.linalg.lu(w)
    d = jnp.diagonal(upper)
    safe = jnp.where(d == 0, jnp.ones_like(d), d)
    return p, lower, d, upper / safe[:, None]


def loldu(
    rank: int | None = None,
    *,
    alpha: float = 1.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """LoLDU: ``W' = W + (alpha/r) · P L_r diag(z - D_r) U_r``, only ``z`` trains.

    ``P, L, D, U`` come from the LU of the torch-layout weight (``ldu``, in
    float32 or the kernel's wider dtype, at init); identity at init
    (``z = D_r``). Trainable: ``r`` per matrix; frozen: ``r·(in + out + 1)``.
    The factored path computes the rank-``r`` term without forming it.

    Args:
      rank: ``r``, the leading LDU components; None (the authors' default
        configuration: the layer's full width): ``min(in, out)`` of each
        matrix.
      alpha: the code's ``lora_alpha`` (default 1): ``σ = alpha / r``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``z`` and the frozen factors.

    Returns:
      An ``Adapter`` with trainable ``LoLDUParams(z)`` and frozen
      ``LoLDUFactors(u, lower, d)``.

    Static arguments: all.

    Raises:
      ValueError: ``rank`` not a positive int; ``alpha`` not finite; at init,
        ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = loldu(2)
      >>> w = jnp.array([[2.0, 1.0], [1.0, 3.0], [0.5, 1.0]])  # (in, out)
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.z.tolist(), f.u.shape, f.lower.shape
      ([2.0, 2.5], (3, 2), (2, 2))
      >>> bool(jnp.array_equal(ad.apply(w, t, f), w))
      True

    References:
      Shi et al., 2024, https://arxiv.org/abs/2410.13618
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(
            rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"loldu: rank must be a positive int or None, got {rank!r}")
    rank = None if rank is None else int(rank)
    if not np.isfinite(alpha):
        raise ValueError(f"loldu: alpha must be finite, got {alpha!r}")
    alpha = float(alpha)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        del key  # deterministic: the factors are the weight's own LU
        if stats is not None:
            raise ValueError("loldu takes no stats")
        full = min(w.shape)
        r = full if rank is None else rank
        if r > full:
            raise ValueError(f"loldu: rank={r} exceeds min(in, out)={full} of the matrix "
                             f"view of shape {tuple(w.shape)}")
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        p, low, d, up = ldu(w.astype(ct).T)  # torch layout (out, in)
        factors = LoLDUFactors(u=up[:r].T.astype(param_dtype),
                               lower=(p @ low[:, :r]).T.astype(param_dtype),
                               d=d[:r].astype(param_dtype))
        return LoLDUParams(z=d[:r].astype(param_dtype)), factors

    def factors(t, f):
        # σ · u diag(z - d) lower: the diagonal scales u's columns.
        c = _lowrank.compute_dtype(jnp.float32, t.z.dtype, f.u.dtype)
        step = t.z.astype(c) - f.d.astype(c)
        return _lowrank.LowRank(left=f.u.astype(c) * step[None, :], right=f.lower,
                                scale=alpha / f.d.shape[-1])

    return _lift.lift_matrix(
        name=f"loldu(rank={rank}, alpha={alpha})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("alpha", alpha)),
        **_lowrank.low_rank_forms(factors),
    )
