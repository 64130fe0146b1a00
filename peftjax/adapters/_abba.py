# SPDX-License-Identifier: Apache-2.0
"""ABBA: a Hadamard product of two trainable low-rank products.

ABBA: Highly Expressive Hadamard Product Adaptation for Large Language Models
(v4: "ABBA-Adapters: Efficient and Expressive Fine-Tuning of Foundation
Models"). Singhal, Ponkshe, Vartak & Vepakomma, 2025.
https://arxiv.org/abs/2505.14238

``ΔW = s·(B1 A1) ⊙ (B2 A2)`` (torch layout ``W (out, in)``), all four factors
trainable; the update has rank up to ``r1·r2`` for ``r1 + r2`` LoRA-sized
factor pairs. On a Flax kernel ``(in, out)``: ``a_k = A_kᵀ (in, r_k)``,
``b_k = B_kᵀ (r_k, out)`` and ``ΔK = s·(a1@b1) ⊙ (a2@b2)``.

Factored form (the paper's Khatri-Rao reconstruction): entry ``(i, j)`` of
``(a1@b1) ⊙ (a2@b2)`` is ``Σ_{p,q} (a1[i,p]·a2[i,q]) · (b1[p,j]·b2[q,j])``, so
``(a1@b1) ⊙ (a2@b2) = a_kr @ b_kr`` with the row-wise Khatri-Rao product
``a_kr = a1 ⊙_row a2 (in, r1·r2)`` (``a_kr[i, p·r2+q] = a1[i,p]·a2[i,q]``) and
the column-wise one ``b_kr = b1 ⊙_col b2 (r1·r2, out)``
(``b_kr[p·r2+q, j] = b1[p,j]·b2[q,j]``); ``x@ΔK = s·(x@a_kr)@b_kr`` never
forms an ``(in, out)`` matrix.

Paper Eq. (ΔW = s(B1A1)⊙(B2A2)) ↔ ``apply``; the Khatri-Rao rewrite ↔ the
factored form; the initialisation (first pair from the truncated SVD of
``W0``, ``A2`` kaiming-uniform, ``B2 = 0``) ↔ ``init``.

Conventions: the reference code scales pair ``k`` by ``sqrt(alpha_k)``, so
``s = sqrt(alpha1·alpha2)``, which is ``alpha`` with its ``alpha1 = alpha2 =
lora_alpha``; here ``s = alpha`` directly. The reference draws its second pair
with the first pair's shape (it requires ``r1 = r2``); here the ranks are
independent.

Exports: ``ABBAParams``, ``abba_khatri_rao``, ``abba``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class ABBAParams(NamedTuple):
    """Trainable ABBA factors (per matrix).

    Attributes:
      a1: ``(in, r1)``, init ``U_r1·sqrt(S_r1)`` from the SVD ``K = U S Vᵀ``.
      b1: ``(r1, out)``, init ``sqrt(S_r1)·V_r1ᵀ``.
      a2: ``(in, r2)``, init kaiming-uniform ``U(±sqrt(6/in))``.
      b2: ``(r2, out)``, init 0.
    """

    a1: jax.Array
    b1: jax.Array
    a2: jax.Array
    b2: jax.Array


def abba_khatri_rao(a1: jax.Array, b1: jax.Array, a2: jax.Array, b2: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Returns ``(a_kr, b_kr)`` with ``a_kr @ b_kr == (a1@b1) ⊙ (a2@b2)``.

    Args:
      a1: ``(in, r1)``.
      b1: ``(r1, out)``.
      a2: ``(in, r2)``.
      b2: ``(r2, out)``.

    Returns:
      ``a_kr (in, r1·r2)`` (row-wise Khatri-Rao product of ``a1``, ``a2``) and
      ``b_kr (r1·r2, out)`` (column-wise product of ``b1``, ``b2``).

    Example:
      >>> import jax.numpy as jnp
      >>> a1, b1 = jnp.ones((3, 2)), jnp.ones((2, 4))
      >>> a2, b2 = jnp.full((3, 1), 2.0), jnp.ones((1, 4))
      >>> a_kr, b_kr = abba_khatri_rao(a1, b1, a2, b2)
      >>> a_kr.shape, b_kr.shape, float((a_kr @ b_kr)[0, 0])
      ((3, 2), (2, 4), 4.0)
    """
    n_in, r1 = a1.shape
    r2 = a2.shape[1]
    a_kr = (a1[:, :, None] * a2[:, None, :]).reshape(n_in, r1 * r2)
    b_kr = (b1[:, None, :] * b2[None, :, :]).reshape(r1 * r2, b1.shape[1])
    return a_kr, b_kr


def hadamard_forms(scale: float) -> dict[str, Any]:
    """The matrix forms of ``ΔW = scale · (a1@b1) ⊙ (a2@b2)`` (ABBA, LoHa).

    Args:
      scale: the static factor in front of the Hadamard product.

    Returns:
      ``apply_matrix``, ``unapply_matrix`` and ``factored_matrix`` keyword
      arguments for ``lift_matrix`` over a trainable with fields ``a1, b1,
      a2, b2``: ``W ± ΔW`` in the wider dtype, and the Khatri-Rao factored
      form (``abba_khatri_rao``) that never forms an ``(in, out)`` matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> t = ABBAParams(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.ones((2, 1)),
      ...                2 * jnp.ones((1, 2)))
      >>> hadamard_forms(0.5)["apply_matrix"](jnp.zeros((2, 2)), t, None)
      Array([[1., 1.],
             [1., 1.]], dtype=float32)
    """

    def delta(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.a1.dtype)
        p1 = t.a1.astype(ct) @ t.b1.astype(ct)
        p2 = t.a2.astype(ct) @ t.b2.astype(ct)
        return ct, (p1 * p2) * jnp.asarray(scale, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        a_kr, b_kr = abba_khatri_rao(t.a1, t.b1, t.a2, t.b2)
        return _protocol.FactoredTerms(
            delta=lambda x: _lowrank.low_rank(x, a_kr, b_kr, scale))

    return {"apply_matrix": apply_matrix, "unapply_matrix": unapply_matrix,
            "factored_matrix": factored_matrix}


def abba(
    rank1: int,
    rank2: int,
    *,
    alpha: float = 8.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """ABBA: ``W' = W + s·(a1@b1) ⊙ (a2@b2)`` with all four factors trainable.

    Identity at init (``b2 = 0``); the first pair starts at the best rank-``r1``
    approximation of ``W`` split as ``U·sqrt(S)``, ``sqrt(S)·Vᵀ`` (exact SVD in
    float32, as the reference's ``init_weights_svd_mixed``). Trainable
    parameters: ``(r1 + r2)·(in + out)`` per matrix. The factored path uses the
    Khatri-Rao factors (``abba_khatri_rao``): ``s·(x@a_kr)@b_kr`` costs
    ``O(r1·r2·(in + out))`` per row of ``x`` and never forms an ``(in, out)``
    matrix; ``apply`` forms the two ``(in, out)`` products.

    Args:
      rank1: ``r1`` (static; ``<= min(in, out)``).
      rank2: ``r2`` (static; ``<= min(in, out)``).
      alpha: the scale ``s`` itself (no division by a rank; the reference's
        ``sqrt(alpha1)·sqrt(alpha2)``).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the factors.
      dropout: adapter-input dropout (factored path only, as for ``lora``).

    Returns:
      An ``Adapter`` with trainable ``ABBAParams(a1, b1, a2, b2)`` and frozen
      part None.

    Static arguments: all.

    Raises:
      ValueError: a non-positive rank or ``alpha``; at init, a rank larger than
        ``min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = abba(2, 3, alpha=4.0)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a1.shape, t.b1.shape, t.a2.shape, t.b2.shape, f
      ((6, 2), (2, 5), (6, 3), (3, 5), None)
      >>> bool((ad.apply(w, t, f) == w).all())
      True

    References:
      Singhal et al., 2025, https://arxiv.org/abs/2505.14238
    """
    rank1 = _lora.check_rank(rank1, "abba (rank1)")
    rank2 = _lora.check_rank(rank2, "abba (rank2)")
    s = _lora.check_alpha(alpha, "abba")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("abba takes no stats")
        _lora.check_rank_fits(rank1, w, "abba (rank1)")
        _lora.check_rank_fits(rank2, w, "abba (rank2)")
        n_in, n_out = w.shape
        u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(sv[:rank1])
        bound = math.sqrt(6.0 / n_in)
        t = ABBAParams(
            a1=(u[:, :rank1] * root[None, :]).astype(param_dtype),
            b1=(root[:, None] * vt[:rank1]).astype(param_dtype),
            a2=jax.random.uniform(key, (n_in, rank2), jnp.float32, -bound,
                                  bound).astype(param_dtype),
            b2=jnp.zeros((rank2, n_out), param_dtype),
        )
        return t, None

    return _lift.lift_matrix(
        name=f"abba(rank1={rank1}, rank2={rank2}, alpha={alpha})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        **hadamard_forms(s),
    )
