# SPDX-License-Identifier: Apache-2.0
"""LoRA-SB: a LoRA-XS adapter initialised from the approximated first full-FT update.

Initialization using Update Approximation is a Silver Bullet for Extreme
Efficient Low-Rank Fine-Tuning. Ponkshe, Singhal et al., 2024.
https://arxiv.org/abs/2411.19557

Torch layout (SB ``utils/initialization_utils.py::find_and_initialize_grad``,
docs/methods.md#lora-sb): ``G_sum`` = gradients summed over the init batches
(``inits.accumulate_gradients``), ``ΔW = −η_eff·sign(G_sum)`` with
``η_eff = lr/(warmup_ratio·total_steps)`` (the first warm-up step's learning
rate; ``lr`` when ``warmup_ratio = 0``) ↔ ``update_approximation``;
``ΔW ≈ U_r Σ_r V_rᵀ``; ``B = U_r``, ``A = V_rᵀ``, ``R = Σ_r/s`` (§3, Thm. 2 ↔
``lora_sb``). The base weight is **not** modified: the model starts at
``W + trunc_r(ΔW)``.

Flax layout (``adapters.lora_xs``: ``K' = K + s·a@core@b``): with
``ΔK = ΔWᵀ = U_K S V_Kᵀ``, ``a = U_K[:, :r] = A_torchᵀ``,
``core = diag(S_r)/s = R_torchᵀ`` (the core is transposed relative to the
torch reference; it is diagonal at init), ``b = V_K[:, :r]ᵀ = B_torchᵀ``.

Exports: ``lora_sb``, ``update_approximation``, ``lora_sb_num_trainable``.
"""

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common, _linalg


def update_approximation(grad_sum: jax.Array, lr_eff: float) -> jax.Array:
    """Returns ``ΔW = −lr_eff·sign(grad_sum)`` in float32 (``sign(0) = 0``).

    Args:
      grad_sum: accumulated gradient, any shape.
      lr_eff: the first step's learning rate.

    Returns:
      The approximated first Adam update.

    Example:
      >>> import jax.numpy as jnp
      >>> update_approximation(jnp.array([2.0, 0.0, -1.0]), 0.5).tolist()
      [-0.5, 0.0, 0.5]
    """
    d = -jnp.asarray(lr_eff, jnp.float32) * jnp.sign(grad_sum.astype(jnp.float32))
    return d + jnp.zeros((), jnp.float32)  # -0.0 -> 0.0


def lora_sb_num_trainable(rank: int, shapes: list[tuple[int, int]]) -> dict[str, int]:
    """Trainable-parameter counts of LoRA-SB (``r²``) and LoRA (``r·(in+out)``).

    Args:
      rank: ``r``.
      shapes: ``(in, out)`` of each adapted matrix.

    Returns:
      ``{"lora_sb": Σ r², "lora": Σ r·(in+out), "ratio": lora // lora_sb}``.

    Example:
      >>> lora_sb_num_trainable(24, [(1024, 1024)])["ratio"]
      85
    """
    sb = sum(rank * rank for _ in shapes)
    lo = sum(rank * (i + o) for i, o in shapes)
    return {"lora_sb": sb, "lora": lo, "ratio": lo // sb}


def lora_sb(
    rank: int,
    *,
    learning_rate: float,
    warmup_ratio: float = 0.0,
    total_steps: int = 1,
    alpha: float | None = None,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    niter: int | None = None,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """LoRA-SB: frozen ``a``, ``b`` and trainable ``core`` with ``s·a@core@b = trunc_r(ΔK)``.

    Needs ``stats={path: G_sum}``, the gradient of each target summed over the
    init batches (``inits.accumulate_gradients``; the reference uses 2-170
    examples; memory: one float32 leaf-sized sum per target). Produces an
    ``adapters.lora_xs`` state (no second adapter type). Only ``core (r, r)``
    is trainable: ``r²`` parameters per matrix (``lora_sb_num_trainable``).
    The base weight is not modified, and the model's output at init is not
    the base model's: it already includes ``trunc_r(ΔW)``.

    Args:
      rank: ``r`` (``<= min(in, out)``).
      learning_rate: the peak learning rate ``lr`` of the training run.
      warmup_ratio: linear warm-up fraction; ``η_eff = lr/(warmup_ratio·
        total_steps)`` as in the reference (``lr`` when 0).
      total_steps: number of training steps of the run.
      alpha: ``lora_alpha``; None gives ``alpha = r`` (``s = 1``, the
        reference's choice; the init is independent of ``s`` since the core
        absorbs ``1/s``).
      scaling: ``adapters.Scaling`` member.
      niter: None for the exact float32 SVD (default, docs/methods.md#lora-sb); an
        int for the reference's randomized SVD (``svd_lowrank(q=r, niter)``,
        the reference uses 10).
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of core and basis.

    Returns:
      An ``Initializer`` producing ``adapters.lora_xs`` state
      (``LoRAXSParams(core)`` trainable, ``LoRAXSBasis(a, b)`` frozen).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.zeros((4, 3))}
      >>> g = {"w": -jnp.ones((4, 3))}
      >>> rule = tree.Rule(where="w", then=inits.lora_sb(1, learning_rate=0.5))
      >>> plan = tree.assign(params, [rule])
      >>> res = inits.run(plan, jax.random.key(0), params, stats=g)
      >>> [round(x, 4) for x in res.state.trainable["w"].core.ravel().tolist()]
      [1.7321]

    References:
      Ponkshe et al., 2024, https://arxiv.org/abs/2411.19557
    """
    rank = _adapters.check_rank(rank, "lora_sb")
    if learning_rate <= 0:
        raise ValueError(f"lora_sb: learning_rate must be > 0, got {learning_rate}")
    if warmup_ratio < 0 or (isinstance(total_steps, bool)
                            or not isinstance(total_steps, numbers.Integral) or total_steps <= 0):
        raise ValueError(
            f"lora_sb: need warmup_ratio >= 0 and an int total_steps > 0, got "
            f"warmup_ratio={warmup_ratio}, total_steps={total_steps!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, numbers.Integral)
                              or niter < 0):
        raise ValueError(f"lora_sb: niter must be None or an int >= 0, got {niter!r}")
    lr_eff = learning_rate / (warmup_ratio * total_steps) if warmup_ratio > 0 else learning_rate
    alpha = float(rank) if alpha is None else float(alpha)
    s = _adapters.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    adapter = _adapters.lora_xs(rank, alpha=alpha, scaling=scaling,
                                dimension_numbers=dimension_numbers,
                                param_dtype=param_dtype)

    def init_matrix(key, w, g):
        _common.check_fits(rank, w, "lora_sb")
        dk = update_approximation(g, lr_eff)
        if niter is None:
            u, sv, vt = _linalg.svd(dk)
            u, sv, vt = u[:, :rank], sv[:rank], vt[:rank]
        else:
            u, sv, vt = _linalg.randomized_svd(key, dk, rank, niter)
        core = jnp.diag(sv / jnp.asarray(s, jnp.float32))
        return (w, _adapters.LoRAXSParams(core=core.astype(param_dtype)),
                _adapters.LoRAXSBasis(a=u.astype(param_dtype), b=vt.astype(param_dtype)))

    return _base.Initializer(
        init=_base.lift("lora_sb", init_matrix, dimension_numbers, _base.GRADIENT),
        adapter=adapter, stats=_base.GRADIENT, modifies_base=False, rank=rank,
        alpha=alpha, scaling=scaling, dimension_numbers=dimension_numbers,
        param_dtype=param_dtype,
        name=f"lora_sb(rank={rank}, lr_eff={lr_eff:g}, alpha={alpha}, scaling={scaling.value})",
        relayout=lambda dims: lora_sb(
            rank, learning_rate=learning_rate, warmup_ratio=warmup_ratio,
            total_steps=total_steps, alpha=alpha, scaling=scaling, niter=niter,
            dimension_numbers=dims, param_dtype=param_dtype))
