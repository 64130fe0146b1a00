# SPDX-License-Identifier: Apache-2.0
"""Orthogonal LoRA initialisation: both factors non-zero, their product exactly zero.

PEFT 0.21.2 ``init_lora_weights="orthogonal"`` (``tuners/lora/layer.py::
orthogonal_init``, after https://datta0.github.io/posts/rethink-lora-init/
#orthogonal-initialisation; no paper). Torch layout, even rank ``r``:
``Q`` = the QR orthogonal factor of a Gaussian ``(r, r)`` matrix,
``Q_o = Q[0::2]``, ``Q_e = Q[1::2]`` (``r/2`` orthonormal rows each, mutually
orthogonal), ``A = (G₁ Q_o)ᵀ/10`` with ``G₁ ~ N(0, 1)^{in×r/2}`` and
``B = G₂ Q_e/10`` with ``G₂ ~ N(0, 1)^{out×r/2}``. Then
``B A = G₂ Q_e Q_oᵀ G₁ᵀ/100 = 0`` because ``Q_e Q_oᵀ = 0``: the model is
unchanged at init while both factors receive gradients. Flax kernel
``K = Wᵀ``: ``a = Aᵀ = G₁ Q_o/10`` ``(in, r)``, ``b = Bᵀ = (G₂ Q_e)ᵀ/10``
``(r, out)`` (↔ ``orthogonal``). The base is not modified; PEFT files with
``init_lora_weights="orthogonal"`` are plain LoRA.

Exports: ``orthogonal``.
"""

from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common


def orthogonal(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """Orthogonal init: ``a = G₁Q_o/10``, ``b = (G₂Q_e)ᵀ/10``, so ``a@b = 0``.

    The ``r`` coefficient directions of ``a`` (the rows of ``Q_o``) and of
    ``b`` (the rows of ``Q_e``) are complementary orthonormal halves of one
    random orthogonal ``r×r`` matrix: ``a`` and ``b`` each have rank ``r/2``
    and ``a@b`` vanishes exactly (to float rounding). The base is unchanged;
    the state is an ordinary ``adapters.lora`` state (``r·(in+out)``
    trainable per matrix), exported as is (``inits.to_lora`` passes it
    through). PEFT's torch generator is not reproduced: the draws differ,
    the construction and its invariants are the same.

    Args:
      rank: ``r``, even (PEFT raises for odd ranks too).
      alpha: ``lora_alpha``.
      scaling: ``adapters.Scaling`` member.
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.

    Returns:
      An ``Initializer`` producing ``adapters.lora`` state.

    Raises:
      ValueError: odd or non-positive rank; at init, rank larger than the matrix.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.ones((6, 5))}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.orthogonal(rank=4))])
      >>> t = inits.run(plan, jax.random.key(0), params).state.trainable["w"]
      >>> bool(jnp.abs(t.a @ t.b).max() < 1e-6), t.a.shape, t.b.shape
      (True, (6, 4), (4, 5))
    """
    rank = _adapters.check_rank(rank, "orthogonal")
    if rank % 2:
        raise ValueError(f"orthogonal: the rank must be even (PEFT's rule), got {rank}")
    param_dtype = jnp.dtype(param_dtype)
    _adapters.scaling_value(scaling, alpha, rank)  # validates alpha
    adapter = _adapters.lora(rank, alpha=alpha, scaling=scaling,
                             dimension_numbers=dimension_numbers, param_dtype=param_dtype)

    def init_matrix(key, w, stats):
        _common.check_fits(rank, w, "orthogonal")
        n_in, n_out = w.shape
        kq, k1, k2 = jax.random.split(key, 3)
        q, _ = jnp.linalg.qr(jax.random.normal(kq, (rank, rank), jnp.float32))
        g1 = jax.random.normal(k1, (n_in, rank // 2), jnp.float32)
        g2 = jax.random.normal(k2, (n_out, rank // 2), jnp.float32)
        a = (g1 @ q[0::2]) / 10.0
        b = ((g2 @ q[1::2]) / 10.0).T
        return w, _adapters.LoRAParams(a=a.astype(param_dtype), b=b.astype(param_dtype)), None

    return _base.Initializer(
        init=_base.lift("orthogonal", init_matrix, dimension_numbers, None),
        adapter=adapter, stats=None, modifies_base=False, rank=rank,
        alpha=float(alpha), scaling=scaling, dimension_numbers=dimension_numbers,
        param_dtype=param_dtype,
        name=f"orthogonal(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        relayout=lambda dims: orthogonal(rank, alpha=alpha, scaling=scaling,
                                         dimension_numbers=dims, param_dtype=param_dtype))
