# SPDX-License-Identifier: Apache-2.0
"""SVFit: train only the top-``r`` singular values of each weight.

SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using
Singular Values. Sun et al., 2024. https://arxiv.org/abs/2409.05926

The paper splits ``W = W_r + W_e`` with the best rank-``r`` approximation
``W_r = U_r diag(σ) V_rᵀ`` (exact SVD of the pre-trained weight), freezes
``U_r``, ``V_r`` and the residual ``W_e``, and trains the ``r`` singular values
``σ`` (initialised at ``S_r``). Here the trainable leaf is the *offset*
``δ = σ - S_r`` (initialised at 0), so that

``W' = W + U_r diag(δ) V_rᵀ``

is an exact identity at init and never re-forms ``W_r + W_e`` (which would
differ from ``W`` by rounding). On a Flax kernel ``K (in, out) = U S Vᵀ``:
``u = U[:, :r] (in, r)``, ``vt = Vᵀ[:r] (r, out)``; the torch-layout
``W (out, in) = Kᵀ`` has the same singular values with ``U`` and ``V`` swapped,
so the two parametrisations train the same values.

Paper Eq. (W' = U_r diag(σ) V_rᵀ + W_e) ↔ ``apply`` (with ``σ = S_r + δ``);
the SVD initialisation ↔ ``init``.

Exports: ``SVFitParams``, ``SVFitBasis``, ``svfit``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class SVFitParams(NamedTuple):
    """Trainable singular-value offsets (per matrix).

    Attributes:
      delta_s: ``(r,)``, init 0; the trained top-``r`` singular values are
        ``basis.singular_values + delta_s``.
    """

    delta_s: jax.Array


class SVFitBasis(NamedTuple):
    """Frozen top-``r`` singular triplets of the base kernel (per matrix).

    Attributes:
      u: ``(in, r)``, orthonormal columns (left singular vectors).
      vt: ``(r, out)``, orthonormal rows (right singular vectors, transposed).
      singular_values: ``(r,)``, the base ``S_r`` (descending); not used by
        ``apply``, kept so the trained values ``S_r + δ`` can be read off.
    """

    u: jax.Array
    vt: jax.Array
    singular_values: jax.Array


def svfit(
    rank: int,
    *,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SVFit: ``W' = W + U_r diag(δ) V_rᵀ`` with only ``δ (r,)`` trainable.

    ``U_r``, ``V_r`` come from the exact SVD of the kernel's matrix view (in
    float32), so the top-``r`` singular values of ``W'`` are ``S_r + δ`` (while
    they stay non-negative) and every other singular value and vector of ``W``
    is unchanged. Identity at init. Trainable parameters: ``r`` per matrix
    (times the product of batch axes for stacked kernels); frozen:
    ``r·(in + out + 1)``. The factored path computes ``((x@U_r)·δ)@V_rᵀ``.

    Args:
      rank: ``r`` (static; ``<= min(in, out)``).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``δ`` and the frozen basis.

    Returns:
      An ``Adapter`` with trainable ``SVFitParams(delta_s)`` and frozen
      ``SVFitBasis(u, vt, singular_values)``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; at init, ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = svfit(rank=2)
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.delta_s.shape, f.u.shape, f.vt.shape, f.singular_values.tolist()
      ((2,), (3, 2), (2, 3), [3.0, 2.0])
      >>> w2 = ad.apply(w, t._replace(delta_s=jnp.array([1.0, 0.5])), f)
      >>> [round(x, 4) for x in jnp.linalg.svd(w2, compute_uv=False).tolist()]
      [4.0, 2.5, 1.0]

    References:
      Sun et al., 2024, https://arxiv.org/abs/2409.05926
    """
    rank = _lora.check_rank(rank, "svfit")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        del key  # deterministic: the basis is the weight's own SVD
        if stats is not None:
            raise ValueError("svfit takes no stats")
        _lora.check_rank_fits(rank, w, "svfit")
        u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
        basis = SVFitBasis(u=u[:, :rank].astype(param_dtype),
                           vt=vt[:rank].astype(param_dtype),
                           singular_values=sv[:rank].astype(param_dtype))
        return SVFitParams(delta_s=jnp.zeros((rank,), param_dtype)), basis

    def factors(t, f):
        # U_r diag(δ) V_rᵀ = (U_r · δ) @ V_rᵀ: δ scales the left factor's columns.
        return _lowrank.LowRank(left=f.u * t.delta_s.astype(f.u.dtype)[None, :],
                             right=f.vt)

    return _lift.lift_matrix(
        name=f"svfit(rank={rank})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        **_lowrank.low_rank_forms(factors),
    )
