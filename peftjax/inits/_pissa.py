# SPDX-License-Identifier: Apache-2.0
"""PiSSA: principal singular values and vectors into the adapter, the rest into the base.

PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models. Meng, Wang & Zhang, 2024. https://arxiv.org/abs/2404.02948

Torch layout ``W (out, in) = U S Vᵀ``: ``A = diag(√(S_r/s))·V_rᵀ``,
``B = U_r·diag(√(S_r/s))``, ``W_res = W − s·B A`` (Eq. 2-4 ↔ ``pissa``; the
fast variant, §4 "fast SVD", ↔ ``niter``, PEFT's ``pissa_niter_K``). On the
Flax kernel ``K = Wᵀ = U_K S V_Kᵀ`` (so ``U_K = V``): ``a = U_K[:, :r]·√(S_r/s)``
and ``b = √(S_r/s)·V_K[:, :r]ᵀ``, i.e. ``a = A_torchᵀ``, ``b = B_torchᵀ``
(PEFT ``tuners/lora/layer.py::pissa_init``; docs/methods.md#pissa).

Exports: ``pissa``.
"""

import numbers
from typing import Any

import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common, _linalg


def pissa(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    niter: int | None = None,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """PiSSA: ``s·a@b = trunc_r(W)`` trains, the residual ``W − trunc_r(W)`` is frozen.

    The model output is unchanged at init. Trainable parameters: ``r·(in+out)``
    per matrix (a plain LoRA). No statistics. Export to the unmodified base
    with ``inits.to_lora`` (rank ``2r``).

    Args:
      rank: ``r`` (``<= min(in, out)``).
      alpha: ``lora_alpha`` (PEFT default 8).
      scaling: ``adapters.Scaling`` member; ``s`` is absorbed into the factors.
      niter: None for the exact float32 SVD (PEFT ``"pissa"``); an int for the
        randomized SVD with ``niter`` subspace iterations
        (``"pissa_niter_K"``).
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.

    Returns:
      An ``Initializer`` producing ``adapters.lora`` state.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.pissa(rank=1, alpha=1.0))])
      >>> res = inits.run(plan, jax.random.key(0), params)
      >>> res.params["w"].diagonal().tolist()
      [0.0, 2.0, 1.0]

    References:
      Meng et al., 2024, https://arxiv.org/abs/2404.02948
    """
    rank = _adapters.check_rank(rank, "pissa")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, numbers.Integral)
                              or niter < 0):
        raise ValueError(f"pissa: niter must be None or an int >= 0, got {niter!r}")

    def factors(key, w, stats, s):
        if niter is None:
            u, sv, vt = _linalg.svd(w)
            u, sv, vt = u[:, :rank], sv[:rank], vt[:rank]
        else:
            u, sv, vt = _linalg.randomized_svd(key, w, rank, niter)
        root = jnp.sqrt(sv / jnp.asarray(s, jnp.float32))
        return u * root[None, :], root[:, None] * vt

    label = "pissa" if niter is None else f"pissa_niter_{niter}"
    return _common.lora_initializer(
        name=label, rank=rank, alpha=alpha, scaling=scaling, factors=factors,
        stats=None, dimension_numbers=dimension_numbers, param_dtype=param_dtype)
