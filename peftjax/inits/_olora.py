# SPDX-License-Identifier: Apache-2.0
"""OLoRA: orthonormal (QR) initialisation of the LoRA factors.

OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models. Büyükakyüz,
2024. https://arxiv.org/abs/2406.01775

Torch layout, following PEFT 0.21.2 ``tuners/lora/layer.py::olora_init``
(the paper's Algorithm 1): ``W (out, in) = Q R`` (reduced QR in float32),
``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]`` and
``W_res = W − s·B A``; the scaling ``s`` is *not* absorbed into the factors,
so ``s·B A = s·Q_r Q_rᵀ W`` (the projection of ``W`` onto the span of its
first ``r`` columns' QR basis, times ``s``). Flax kernel ``K = Wᵀ``:
``a = A_torchᵀ = R[:r]ᵀ`` and ``b = B_torchᵀ = Q[:, :r]ᵀ`` from the QR of
``Kᵀ`` (Algorithm 1 ↔ ``olora``).

Exports: ``olora``.
"""

from typing import Any

import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common


def olora(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """OLoRA: ``b`` = first ``r`` QR basis vectors of ``W``, ``a`` = their ``R`` rows.

    The model output is unchanged at init (the base becomes
    ``K − s·a@b``). Trainable parameters: ``r·(in+out)`` per matrix. No
    statistics. Export with ``inits.to_lora`` (rank ``2r``).

    Args:
      rank: ``r`` (``<= min(in, out)``).
      alpha: ``lora_alpha``.
      scaling: ``adapters.Scaling`` member.
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.

    Returns:
      An ``Initializer`` producing ``adapters.lora`` state.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]])}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.olora(rank=1, alpha=1.0))])
      >>> b = inits.run(plan, jax.random.key(0), params).state.trainable["w"].b
      >>> round(float(jnp.sum(b ** 2)), 5)   # orthonormal rows (torch columns)
      1.0

    References:
      Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775
    """
    rank = _adapters.check_rank(rank, "olora")

    def factors(key, w, stats, s):
        q, r = jnp.linalg.qr(w.T)  # torch layout W = Kᵀ (out, in)
        return r[:rank].T, q[:, :rank].T

    return _common.lora_initializer(
        name="olora", rank=rank, alpha=alpha, scaling=scaling, factors=factors,
        stats=None, dimension_numbers=dimension_numbers, param_dtype=param_dtype)
