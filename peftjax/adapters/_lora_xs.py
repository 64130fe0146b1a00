# SPDX-License-Identifier: Apache-2.0
"""LoRA-XS: a frozen low-rank basis with a trainable ``r×r`` core.

LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters.
Bałazy et al., 2024. https://arxiv.org/abs/2405.17604

``W' = W + s·A@R@B`` with frozen ``A (in, r)``, ``B (r, out)`` and trainable
``R (r, r)``. LoRA-SB (Ponkshe et al., 2024) uses the same layout with a
gradient-based initialisation (``peftjax.inits``).

Layout versus the torch reference (``W (out, in) + s·B_t R_t A_t``): here
``a = A_t.T``, ``core = R_t.T``, ``b = B_t.T``. The LoRA-XS initialisation
takes the truncated SVD of the pretrained weight, ``B_t = U_r Σ_r`` and
``A_t = V_rᵀ`` (torch layout); for the Flax kernel ``K = Wᵀ = U_K S V_Kᵀ``
that is ``a = U_K[:, :r]`` and ``b = Σ_r V_K[:, :r]ᵀ``. ``R`` starts at
``N(0, core_init_std²)`` (1e-5 in the reference; 0 gives an exact identity).

Exports: ``LoRAXSParams``, ``LoRAXSBasis``, ``lora_xs``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class LoRAXSParams(NamedTuple):
    """Trainable core.

    Attributes:
      core: ``(r, r)``.
    """

    core: jax.Array


class LoRAXSBasis(NamedTuple):
    """Frozen basis.

    Attributes:
      a: ``(in, r)`` (orthonormal columns for the SVD init).
      b: ``(r, out)``.
    """

    a: jax.Array
    b: jax.Array


def lora_xs(
    rank: int,
    *,
    alpha: float | None = None,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    core_init_std: float = 1e-5,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """LoRA-XS: ``W' = W + s·A@R@B`` with only ``R (r, r)`` trainable.

    The basis comes from the exact SVD of the weight (in float32). Trainable
    parameters: ``r²`` per matrix; frozen: ``r·(in + out)``.

    Args:
      rank: ``r`` (static; ``<= min(in, out)``).
      alpha: ``lora_alpha``; None means ``alpha = r`` so that ``s = 1`` as the
        reference does.
      scaling: a ``Scaling`` member.
      core_init_std: standard deviation of the initial core (reference 1e-5;
        0.0 makes the adapter an exact identity at init).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of core and basis.
      dropout: adapter-input dropout (factored path only).

    Returns:
      An ``Adapter`` with trainable ``LoRAXSParams(core)`` and frozen
      ``LoRAXSBasis(a, b)``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lora_xs(rank=2, core_init_std=0.0)
      >>> t, f = ad.init(jax.random.key(0), jnp.eye(4))
      >>> t.core.shape, f.a.shape, f.b.shape
      ((2, 2), (4, 2), (2, 4))

    References:
      Bałazy et al., 2024, https://arxiv.org/abs/2405.17604
    """
    rank = _lora.check_rank(rank, "lora_xs")
    alpha = float(rank) if alpha is None else float(alpha)
    s = _lora.scaling_value(scaling, alpha, rank)
    if core_init_std < 0:
        raise ValueError(f"lora_xs: core_init_std must be >= 0, got {core_init_std}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("lora_xs takes no stats; LoRA-SB lives in peftjax.inits")
        _lora.check_rank_fits(rank, w, "lora_xs")
        u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
        a = u[:, :rank]
        b = sv[:rank, None] * vt[:rank]
        core = jax.random.normal(key, (rank, rank), jnp.float32) * core_init_std
        return (
            LoRAXSParams(core=core.astype(param_dtype)),
            LoRAXSBasis(a=a.astype(param_dtype), b=b.astype(param_dtype)),
        )

    return _lift.lift_matrix(
        name=f"lora_xs(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        **_lowrank.low_rank_forms(lambda t, f: _lowrank.LowRank(f.a, f.b, s, core=t.core)),
    )
