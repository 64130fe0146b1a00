# SPDX-License-Identifier: Apache-2.0
"""RoseLoRA: LoRA whose ``A`` rows and ``B`` columns are kept sparse, so ``BA`` is sparse.

RoseLoRA: Row and Column-wise Sparse Low-rank Adaptation of Pre-trained
Language Model for Knowledge Editing and Fine-tuning. Wang, Liu, Li, Cheng,
Zhao & Gao, EMNLP 2024. https://arxiv.org/abs/2406.10777

The paper wants a sparse update ``ΔW = BA`` (torch layout, ``B (out, r)``,
``A (r, in)``). A constraint on ``‖BA‖₀`` is intractable, so it constrains
each row ``A_i`` of ``A`` and each column ``B^i`` of ``B`` instead,
``‖A_i‖₀ <= τ·in`` and ``‖B^i‖₀ <= τ·out`` (§3); its analysis bounds the
sparsity of ``BA`` from below by that of the factors. The constraint is kept
by a hard-thresholding (proximal) step after every optimizer update: in each
row of ``A`` and each column of ``B`` only the entries with the largest
sensitivity-based importance survive, ``I(θ) = |θ·∇_θ L|`` smoothed by an
exponential moving average (``Ī_t = β·Ī_{t-1} + (1-β)·I_t``), and the kept
fraction ``τ_t`` falls from 1 to the target ``τ`` on a cubic schedule after
``t_i`` warm-up steps and stays at ``τ`` for the last ``t_f`` steps (the
AdaLoRA-style budget schedule).

Here (Flax layout ``a = Aᵀ (in, r)``, ``b = Bᵀ (r, out)``): ``roselora`` is
LoRA with its own parameter type ``RoseLoRAParams`` (so that the sparsifier
finds its leaves); ``roselora_project`` is the pure thresholding step (keep
the top ``ceil(τ·in)`` scores of each column of ``a`` and the top
``ceil(τ·out)`` of each row of ``b``), ``roselora_keep`` the cubic schedule,
and ``roselora_sparsify`` wraps any optax optimizer so that each step runs
the inner update, refreshes the importance EMA from the raw gradients and
projects the new parameters: ``optax.chain``-free, one
``GradientTransformation``. The stored factors stay dense ``(in, r)``/``(r,
out)`` arrays (zeros where pruned), so shapes never change: the trainable
count is LoRA's ``r·(in + out)``, of which about ``τ·r·(in + out)`` are
non-zero after the schedule.

Weight-space and factored forms are LoRA's (``W0 + s·a@b``; factored
``2·r·(in + out)`` FLOPs per row); the sparsity lives in the optimizer.

Exports: ``RoseLoRAParams``, ``roselora``, ``roselora_keep``,
``roselora_project``, ``roselora_sparsify``, ``RoseLoRAState``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class RoseLoRAParams(NamedTuple):
    """Trainable RoseLoRA factors (dense storage, sparse contents).

    Attributes:
      a: ``(in, r)`` = ``Aᵀ``; each column (a row of ``A``) is kept sparse.
      b: ``(r, out)`` = ``Bᵀ``; each row (a column of ``B``) is kept sparse.
    """

    a: jax.Array
    b: jax.Array


def roselora(
    rank: int,
    *,
    alpha: float = 8.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """RoseLoRA's parametrisation: ``W' = W0 + (alpha/r)·a@b`` with sparse factors.

    LoRA's init (``a`` kaiming-uniform, ``b = 0``: identity at init) and
    forms; train it with ``roselora_sparsify(optimizer, ...)`` (or call
    ``roselora_project`` after each update) to keep ``a``'s columns and
    ``b``'s rows sparse. Trainable per matrix: ``r·(in + out)`` (stored
    dense).

    Args:
      rank: ``r`` (static; ``<= min(in, out)``).
      alpha: ``s = alpha / r``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a`` and ``b``.

    Returns:
      An ``Adapter`` with trainable ``RoseLoRAParams(a, b)`` and no frozen part.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``; at init ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = roselora(2)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 5)))
      >>> t.a.shape, t.b.shape, f
      ((6, 2), (2, 5), None)

    References:
      Wang et al., EMNLP 2024, https://arxiv.org/abs/2406.10777
    """
    rank = _lora.check_rank(rank, "roselora")
    s = _lora.scaling_value(_lora.Scaling.ALPHA_OVER_RANK, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("roselora takes no stats")
        _lora.check_rank_fits(rank, w, "roselora")
        n_in, n_out = w.shape
        return RoseLoRAParams(a=_lora.kaiming_uniform_a(key, n_in, rank, param_dtype),
                              b=jnp.zeros((rank, n_out), param_dtype)), None

    return _lift.lift_matrix(
        name=f"roselora(rank={rank}, alpha={alpha})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("alpha", alpha)),
        **_lowrank.low_rank_forms(lambda t, f: _lowrank.LowRank(t.a, t.b, s)),
    )


def roselora_keep(step: Any, *, density: float, total_steps: int,
                  warmup_steps: int = 0, final_steps: int = 0) -> jax.Array:
    """The kept fraction ``τ_t``: 1, then a cubic fall to ``density``, then ``density``.

    ``τ_t = 1`` for ``t <= t_i``; ``τ + (1 - τ)·(1 - (t - t_i)/(T - t_i - t_f))³``
    for ``t_i < t <= T - t_f``; ``τ`` afterwards.

    Args:
      step: the step ``t`` (int or traced scalar).
      density: the target ``τ`` in ``(0, 1]``.
      total_steps: ``T``.
      warmup_steps: ``t_i`` (no pruning before it).
      final_steps: ``t_f`` (the last steps at ``τ``).

    Returns:
      A float32 scalar in ``[τ, 1]``.

    Example:
      >>> [round(float(roselora_keep(t, density=0.2, total_steps=10, warmup_steps=2,
      ...                             final_steps=2)), 3) for t in (0, 2, 4, 8, 10)]
      [1.0, 1.0, 0.437, 0.2, 0.2]
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"roselora_keep: density must be in (0, 1], got {density}")
    span = total_steps - warmup_steps - final_steps
    if span <= 0:
        raise ValueError(f"roselora_keep: total_steps={total_steps} must exceed "
                         f"warmup_steps + final_steps = {warmup_steps + final_steps}")
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((t - warmup_steps) / span, 0.0, 1.0)
    return jnp.float32(density) + (1.0 - jnp.float32(density)) * (1.0 - frac) ** 3


def _threshold(x: jax.Array, score: jax.Array, keep: jax.Array, axis: int) -> jax.Array:
    """Zeros all but the ``ceil(keep·n)`` largest ``score`` along ``axis`` (ties: earlier kept)."""
    n = x.shape[axis]
    k = jnp.clip(jnp.ceil(keep * n - 1e-6), 1, n).astype(jnp.int32)
    order = jnp.argsort(-score, axis=axis, stable=True)
    ranks = jnp.argsort(order, axis=axis, stable=True)
    return jnp.where(ranks < k, x, jnp.zeros((), x.dtype))


def _is_rose(x: Any) -> bool:
    return isinstance(x, RoseLoRAParams)


def roselora_project(trainable: Any, keep: Any, scores: Any = None) -> Any:
    """Keeps the top ``ceil(keep·n)`` of each ``a`` column and each ``b`` row (n: its length).

    The paper's thresholding step ``T(·, τ)`` on every ``RoseLoRAParams`` in
    ``trainable`` (other leaves pass through); stacked leaves are handled
    (the last two axes are the matrix). Jittable; ``keep`` may be traced.

    Args:
      trainable: a pytree holding ``RoseLoRAParams``.
      keep: the kept fraction ``τ_t`` in ``(0, 1]`` (``roselora_keep``).
      scores: the importance of each entry, the same structure as
        ``trainable`` (e.g. the sensitivity EMA); None: ``|θ|``.

    Returns:
      ``trainable`` with the pruned entries set to 0.

    Example:
      >>> import jax.numpy as jnp
      >>> t = RoseLoRAParams(a=jnp.array([[1.0], [-3.0], [2.0]]), b=jnp.array([[4.0, -1.0]]))
      >>> p = roselora_project({"q": t}, 0.5)["q"]
      >>> p.a.ravel().tolist(), p.b.ravel().tolist()
      ([0.0, -3.0, 2.0], [4.0, 0.0])
    """
    if scores is None:
        scores = jax.tree.map(jnp.abs, trainable)
    keep = jnp.asarray(keep, jnp.float32)

    def one(t, sc):
        if not _is_rose(t):
            return t
        return RoseLoRAParams(a=_threshold(t.a, sc.a, keep, t.a.ndim - 2),
                              b=_threshold(t.b, sc.b, keep, t.b.ndim - 1))

    return jax.tree.map(one, trainable, scores, is_leaf=_is_rose)


class RoseLoRAState(NamedTuple):
    """State of ``roselora_sparsify``.

    Attributes:
      count: int32 step counter (the step of the next update).
      importance: the sensitivity EMA ``Ī``, the params' structure.
      inner: the wrapped optimizer's state.
    """

    count: jax.Array
    importance: Any
    inner: Any

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "importance": tree.StateRole.LIKE_PARAMS,
                   "inner": tree.StateRole.LIKE_PARAMS}


def roselora_sparsify(inner: optax.GradientTransformation, *, density: float,
                      total_steps: int, warmup_steps: int = 0, final_steps: int = 0,
                      beta: float = 0.85) -> optax.GradientTransformation:
    """Wraps an optimizer so every step ends with RoseLoRA's thresholding.

    Per step: ``Ī ← β·Ī + (1-β)·|θ·g|`` from the raw gradients ``g``; the
    inner optimizer's update ``u``; then ``θ' = roselora_project(θ + u,
    roselora_keep(t), Ī)`` and the returned update is ``θ' - θ`` (so
    ``optax.apply_updates`` lands on the projected parameters). Leaves that
    are not ``RoseLoRAParams`` get the inner update unchanged. Needs
    ``params`` in ``update``.

    Args:
      inner: the optimizer (e.g. ``optax.adamw(lr)``).
      density: the final kept fraction ``τ`` per row of ``A``/column of ``B``.
      total_steps: ``T`` of the schedule.
      warmup_steps: ``t_i``.
      final_steps: ``t_f``.
      beta: EMA factor of the importance (AdaLoRA's 0.85).

    Returns:
      An ``optax.GradientTransformation`` with state ``RoseLoRAState``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"q": RoseLoRAParams(a=jnp.ones((4, 1)), b=jnp.ones((1, 4)))}
      >>> opt = roselora_sparsify(optax.sgd(0.1), density=0.5, total_steps=1)
      >>> s = opt.init(p)
      >>> g = {"q": RoseLoRAParams(a=jnp.arange(4.0)[:, None], b=jnp.ones((1, 4)))}
      >>> u, s = opt.update(g, s, p)
      >>> int((optax.apply_updates(p, u)["q"].a != 0).sum())
      2
    """
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"roselora_sparsify: beta must be in [0, 1), got {beta}")
    roselora_keep(0, density=density, total_steps=total_steps,
                  warmup_steps=warmup_steps, final_steps=final_steps)  # validates

    def init(params):
        return RoseLoRAState(count=jnp.zeros((), jnp.int32),
                             importance=jax.tree.map(jnp.zeros_like, params),
                             inner=inner.init(params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("roselora_sparsify needs params in update()")
        imp = jax.tree.map(
            lambda i, p, g: beta * i + (1.0 - beta) * jnp.abs(p * g).astype(i.dtype),
            state.importance, params, updates)
        u, inner_state = inner.update(updates, state.inner, params)
        new = optax.apply_updates(params, u)
        keep = roselora_keep(state.count + 1, density=density, total_steps=total_steps,
                             warmup_steps=warmup_steps, final_steps=final_steps)
        projected = roselora_project(new, keep, imp)
        out = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), projected, params)
        return out, RoseLoRAState(count=state.count + 1, importance=imp,
                                  inner=inner_state)

    return optax.GradientTransformation(init, update)

