# SPDX-License-Identifier: Apache-2.0
"""CorDA: context-oriented decomposition of the weight by the input covariance.

CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning. Yang et al., 2024.
https://arxiv.org/abs/2406.05223

Torch layout ``W (out, in)``, covariance ``C (in, in)`` of the layer inputs
(``inits.collect_covariances``, Eq. 1 ↔ ``_stats.collect_covariances``):

1. damping (PEFT ``collect_eigens_for_layer``): ``C_d = C + d·mean(diag C)·I``,
   ``d = 0.01`` doubled until ``‖C_d C_d⁻¹ − I‖_F < 0.05`` (↔ ``_damped``);
2. ``W C_d = U S Vhᵀ`` and ``V = (Vh C_d⁻¹)ᵀ``, so ``W = U S Vᵀ`` exactly
   (Eq. 2-3 ↔ ``_decompose``);
3. IPM (instruction-previewed, §3.2) keeps the ``r`` largest triplets; KPM
   (knowledge-preserved, §3.3) the ``r`` smallest;
4. ``A = diag(√(S_r/s))·V_rᵀ``, ``B = U_r·diag(√(S_r/s))``,
   ``W_res = W − s·B A`` (Eq. 4 ↔ ``corda``); the output is unchanged at init.

Flax kernel ``K = Wᵀ``: ``a = A_torchᵀ = V_r·√(S_r/s)``, ``b = B_torchᵀ``
(PEFT ``tuners/lora/corda.py``, ``layer.py::corda_init``; docs/methods.md#corda).

Exports: ``corda``.
"""

from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common, _linalg

_MAX_DAMP_DOUBLINGS = 60


def _damped(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(C_d, C_d⁻¹)`` with PEFT's doubling damping loop."""
    n = c.shape[0]
    eye = jnp.eye(n, dtype=jnp.float32)
    mean_diag = jnp.mean(jnp.diagonal(c))

    def attempt(d):
        cd = c + eye * (mean_diag * d)
        inv = jnp.linalg.inv(cd)
        err = jnp.linalg.norm(cd @ inv - eye)
        return cd, inv, err

    def cond(carry):
        d, i = carry
        return (attempt(d)[2] >= 0.05) & (i < _MAX_DAMP_DOUBLINGS)

    d, _ = jax.lax.while_loop(cond, lambda cr: (cr[0] * 2.0, cr[1] + 1),
                              (jnp.asarray(0.01, jnp.float32), jnp.asarray(0)))
    cd, inv, _ = attempt(d)
    return cd, inv


def _decompose(w_t: jax.Array, c: jax.Array):
    """``W (out, in) = U S Vᵀ`` with ``V = (Vh C_d⁻¹)ᵀ`` (not orthonormal)."""
    cd, inv = _damped(c)
    u, sv, vh = _linalg.svd(w_t @ cd)
    return u, sv, (vh @ inv).T


def corda(
    rank: int,
    *,
    mode: str = "ipm",
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """CorDA: the adapter takes ``r`` covariance-oriented components of ``W``.

    Needs ``stats={path: C}``, the ``(batch..., in, in)`` input covariance of
    each target (``inits.collect_covariances``; PEFT's guidance: about 256
    samples; memory ``4·in²`` bytes per matrix). IPM (default, PEFT's default)
    puts the largest components in the adapter; KPM the smallest, keeping the
    largest (the knowledge of the covariance's data) frozen. The base becomes
    ``K − s·a@b``. Trainable parameters: ``r·(in+out)`` per matrix. Export with
    ``inits.to_lora`` (rank ``2r``).

    Args:
      rank: ``r`` (``<= min(in, out)``).
      mode: ``"ipm"`` or ``"kpm"``.
      alpha: ``lora_alpha``.
      scaling: ``adapters.Scaling`` member.
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.

    Returns:
      An ``Initializer`` producing ``adapters.lora`` state.

    Raises:
      ValueError: unknown mode; at init, covariance missing, of the wrong
        shape or non-finite; rank too large.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
      >>> cov = {"w": jnp.eye(3)}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.corda(1, alpha=1.0))])
      >>> res = inits.run(plan, jax.random.key(0), params, stats=cov)
      >>> [round(x, 4) for x in res.params["w"].diagonal().tolist()]
      [0.0, 2.0, 1.0]

    References:
      Yang et al., 2024, https://arxiv.org/abs/2406.05223
    """
    rank = _adapters.check_rank(rank, "corda")
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"corda: mode must be 'ipm' or 'kpm', got {mode!r}")

    def factors(key, w, c, s):
        u, sv, v = _decompose(w.T, c.astype(jnp.float32))
        sl = slice(0, rank) if mode == "ipm" else slice(sv.shape[0] - rank, sv.shape[0])
        root = jnp.sqrt(sv[sl] / jnp.asarray(s, jnp.float32))
        return v[:, sl] * root[None, :], root[:, None] * u[:, sl].T

    return _common.lora_initializer(
        name=f"corda[{mode}]", rank=rank, alpha=alpha, scaling=scaling,
        factors=factors, stats=_base.COVARIANCE,
        dimension_numbers=dimension_numbers, param_dtype=param_dtype)
