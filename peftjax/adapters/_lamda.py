# SPDX-License-Identifier: Apache-2.0
"""LaMDA: a frozen first projection, a trainable ``r×r`` core, a gradually frozen second one.

LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation. Azizi, Kundu & Pedram, Findings of EMNLP 2024.
https://arxiv.org/abs/2406.12832

The adaptation path is ``Y = X W + s · X A S B`` (the paper's LoRA path with
a low-dimensional adapter, LDA ``S``): the first projection matrix (PMA)
``A (in, r)`` is frozen from the start, the LDA ``S (r, r)`` trains
throughout, and the second projection matrix (PMB) ``B (r, out)`` trains at
first and is frozen gradually, one rank direction at a time, in the order
of the singular values (largest first), until only ``S`` trains.

Initialisation (``init``):

* ``"svd"`` (the paper's spectral initialisation, the default): with the
  Flax kernel ``W = U Σ Vᵀ``, ``A = U[:, :r]`` and ``B = V[:, :r]ᵀ``
  (orthonormal), ``S = 0`` so that ``W' = W`` at init. Row ``k`` of ``B``
  belongs to the ``k``-th singular value.
* ``"lora"`` (the authors' released code, ``lamda.py``: PEFT's LoRA layers
  plus an ``nn.Linear(r, r)`` ``sigma``): ``A`` kaiming-uniform
  ``U(±1/sqrt(in))``, ``B = 0``, ``S`` ``nn.Linear``'s default
  ``U(±1/sqrt(r))``; ``W' = W`` at init through ``B = 0``.

``s = alpha / r`` (PEFT's LoRA scaling, which the authors' code keeps).

Gradual freezing as a pure function of the step (``lamda_frozen_rows``,
``lamda_freeze``): the authors' trainer (``gradual_freeze_B``) freezes, at
update ``t = 1, 2, ...``, the first ``k(t) = floor(t / (eta · T))`` rank
directions of PMB (``T`` the total number of steps, ``eta = 0.3``), and all of
PMB once ``k(t) >= r``. They zero those gradient columns before the
optimizer (AdamW's momentum may still move them a little); ``lamda_freeze``
placed after the optimizer in an ``optax.chain`` zeroes the update itself,
so frozen rows stay exactly put (placed before it, it reproduces the
authors' gradient masking).

LaMDA++ (``lamda_plus_ranks``): ranks allocated per matrix from the
normalised spectrum of the pre-trained weights under a fixed total budget;
see that function for the score used.

Factored form: ``x W' = x W + s·((x A) S) B`` (``FactoredTerms.delta``),
``2·r·(in + out) + 2·r²`` FLOPs per row, never an ``(in, out)`` temporary.

Exports: ``LaMDAParams``, ``LaMDABasis``, ``LaMDAFreezeState``, ``lamda``,
``lamda_frozen_rows``, ``lamda_freeze``, ``lamda_plus_ranks``.
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol

_INITS = ("svd", "lora")


class LaMDAParams(NamedTuple):
    """Trainable LaMDA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      core: ``(r, r)``: the low-dimensional adapter ``S`` (the authors' ``sigma``).
      b: ``(r, out)``: PMB, the second projection (``lora_B.weight.T``); frozen
        row by row during training by ``lamda_freeze``.
    """

    core: jax.Array
    b: jax.Array


class LaMDABasis(NamedTuple):
    """Frozen LaMDA parameters.

    Attributes:
      a: ``(in, r)``: PMA, the first projection (``lora_A.weight.T``).
    """

    a: jax.Array


def lamda(
    rank: int = 64,
    *,
    alpha: float = 16.0,
    init: str = "svd",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """LaMDA: ``W' = W + s·A S B`` with ``A`` frozen, ``S`` and ``B`` trainable.

    Trainable ``r² + r·out`` per matrix (``r²`` once ``B`` is fully frozen by
    ``lamda_freeze``); frozen ``r·in``. ``W' = W`` at init with either
    ``init``. Exact ``unapply``; factored form ``s·((x A) S) B``.

    Args:
      rank: ``r`` (static; ``<= min(in, out)`` for ``"svd"``; the authors'
        default 64).
      alpha: ``lora_alpha``, ``s = alpha / r`` (the authors' default 16).
      init: ``"svd"`` (the paper's spectral init, ``S = 0``) or ``"lora"`` (the
        authors' released code: PEFT's LoRA init, ``S`` random).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a``, ``core`` and ``b``.
      dropout: adapter-input dropout (factored path only).

    Returns:
      An ``Adapter`` with trainable ``LaMDAParams(core, b)`` and frozen
      ``LaMDABasis(a)``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, an unknown ``init``; at init with
        ``"svd"``, ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lamda(2)
      >>> w = jnp.arange(20.0).reshape(5, 4) / 20
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.core.shape, t.b.shape, f.a.shape
      ((2, 2), (2, 4), (5, 2))
      >>> bool((ad.apply(w, t, f) == w).all())
      True

    References:
      Azizi et al., EMNLP 2024 Findings, https://arxiv.org/abs/2406.12832
    """
    rank = _lora.check_rank(rank, "lamda")
    if init not in _INITS:
        raise ValueError(f"lamda: init must be one of {_INITS}, got {init!r}")
    alpha = float(alpha)
    s = alpha / rank
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("lamda takes no stats")
        n_in, n_out = w.shape
        if init == "svd":
            _lora.check_rank_fits(rank, w, "lamda")
            u, _, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
            a, b = u[:, :rank], vt[:rank]
            core = jnp.zeros((rank, rank), jnp.float32)
        else:
            ka, ks = jax.random.split(key)
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(ka, (n_in, rank), jnp.float32, -bound, bound)
            b = jnp.zeros((rank, n_out), jnp.float32)
            bound = 1.0 / math.sqrt(rank)
            core = jax.random.uniform(ks, (rank, rank), jnp.float32, -bound, bound)
        return (LaMDAParams(core=core.astype(param_dtype), b=b.astype(param_dtype)),
                LaMDABasis(a=a.astype(param_dtype)))

    return _lift.lift_matrix(
        name=f"lamda(rank={rank}, alpha={alpha}, init={init})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("alpha", alpha), ("init", init)),
        **_lowrank.low_rank_forms(lambda t, f: _lowrank.LowRank(f.a, t.b, s, core=t.core)),
    )


def _freeze_steps(rank: int, total_steps: int, eta: float) -> np.ndarray:
    """``(r,)``: the first update (1-based) at which row ``k`` of PMB is frozen.

    Exactly the authors' ``int(t / (eta·T)) > k`` in float64, found on the host.
    """
    if total_steps <= 0 or eta <= 0:
        raise ValueError(f"lamda: total_steps and eta must be > 0, got "
                         f"total_steps={total_steps}, eta={eta}")
    period = eta * total_steps
    out = []
    for k in range(rank):
        t = max(math.ceil((k + 1) * period) - 2, 0)
        while int(t / period) < k + 1:
            t += 1
        out.append(t)
    return np.asarray(out, np.int64)


def lamda_frozen_rows(step: jax.typing.ArrayLike, rank: int, total_steps: int,
                      eta: float = 0.3) -> jax.Array:
    """Which rank directions (rows of PMB ``b``) are frozen at the ``step``-th update.

    The authors' ``gradual_freeze_B``: at update ``t = 1, 2, ...`` the first
    ``k = int(t / (eta · total_steps))`` rows are frozen (largest singular
    values first under the ``"svd"`` init), all ``r`` once ``k >= r``. Pure
    and jittable in ``step`` (the thresholds are computed on the host in
    float64, as the authors' Python does).

    Args:
      step: the update's number, counting from 1 (the authors' ``total_iter``
        with one micro-batch per update).
      rank: ``r``.
      total_steps: ``T``, the number of optimizer steps of the run.
      eta: the freezing period as a fraction of ``T`` (the authors' 0.3).

    Returns:
      ``(r,)`` bool, True where the row is frozen.

    Raises:
      ValueError: ``total_steps <= 0`` or ``eta <= 0``.

    Example:
      >>> lamda_frozen_rows(70, 4, total_steps=100, eta=0.3)
      Array([ True,  True, False, False], dtype=bool)
    """
    thresholds = jnp.asarray(_freeze_steps(rank, total_steps, eta), jnp.int32)
    return jnp.asarray(step, jnp.int32) >= thresholds


class LaMDAFreezeState(NamedTuple):
    """State of ``lamda_freeze``.

    Attributes:
      count: optimizer steps taken. # shape=(), dtype=jnp.int32
    """

    count: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED}


def lamda_freeze(total_steps: int, eta: float = 0.3) -> optax.GradientTransformation:
    """Zeroes the updates of PMB's frozen rows in every ``LaMDAParams`` of the tree.

    At the ``t``-th update the rows ``lamda_frozen_rows(t, r, total_steps, eta)`` of each
    ``LaMDAParams.b`` get a zero update (``core`` is untouched; other leaves
    pass through). Chain it after the optimizer so frozen rows stay exactly
    put: ``optax.chain(optax.adamw(lr), lamda_freeze(T))``; before it, it
    masks the gradients as the authors' trainer does.

    Args:
      total_steps: ``T``, the run's number of optimizer steps.
      eta: the freezing period as a fraction of ``T`` (the authors' 0.3).

    Returns:
      An ``optax.GradientTransformation`` with ``LaMDAFreezeState``.

    Raises:
      ValueError: ``total_steps <= 0`` or ``eta <= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> tr = {"q": LaMDAParams(jnp.ones((2, 2)), jnp.ones((2, 3)))}
      >>> tx = lamda_freeze(total_steps=10, eta=0.2)
      >>> state = tx.init(tr)
      >>> u, state = tx.update(tr, state)   # update 1: int(1/2) = 0 rows frozen
      >>> u, state = tx.update(tr, state)   # update 2: row 0 frozen
      >>> u["q"].b[:, 0], u["q"].core[0, 0]
      (Array([0., 1.], dtype=float32), Array(1., dtype=float32))
    """
    _freeze_steps(1, total_steps, eta)  # validates

    def is_lamda(x: Any) -> bool:
        return isinstance(x, LaMDAParams)

    def init_fn(params: Any) -> LaMDAFreezeState:
        del params
        return LaMDAFreezeState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates: Any, state: LaMDAFreezeState, params: Any = None):
        del params

        def mask(u: Any) -> Any:
            if not is_lamda(u):
                return u
            r = u.b.shape[-2]
            frozen = lamda_frozen_rows(state.count + 1, r, total_steps, eta)
            frozen = frozen.reshape((1,) * (u.b.ndim - 2) + (r, 1))
            return u._replace(b=jnp.where(frozen, jnp.zeros((), u.b.dtype), u.b))

        out = jax.tree.map(mask, updates, is_leaf=is_lamda)
        return out, LaMDAFreezeState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def lamda_plus_ranks(kernels: Mapping[str, Any], rank: int, *, min_rank: int = 1,
                     max_rank: int | None = None) -> dict[str, int]:
    """LaMDA++: per-matrix ranks from the normalised spectrum of the pre-trained weights.

    Each matrix ``W_l`` gets the score ``1 - E_l``, where ``E_l = Σ_{i<r}
    σ_i² / Σ_i σ_i²`` is the share of its normalised spectral energy in the
    top ``r`` singular values: a matrix whose spectrum is flat (a rank-``r``
    update reaches less of it) gets more rank, a matrix dominated by a few
    directions less. Of the total budget ``r · L`` (LaMDA's at uniform rank),
    each matrix gets ``min_rank`` and the rest is split proportionally to the
    scores (largest-remainder rounding, so the ranks sum to the budget unless
    a cap binds), each rank capped at ``min(max_rank, in, out)``. The paper specifies the
    normalised-spectrum criterion and the fixed budget; this energy score is
    peftjax's transcription of it (the authors publish no LaMDA++ code).

    Args:
      kernels: ``{path: (in, out) matrix}`` (any array-likes; a stacked leaf
        must be split by the caller, one entry per layer).
      rank: ``r``, the uniform rank that sets the budget.
      min_rank: the smallest rank given to any matrix.
      max_rank: the largest (None: ``min(in, out)`` only).

    Returns:
      ``{path: rank}``, to build one ``lamda(rank)`` per matrix.

    Raises:
      ValueError: an entry that is not 2-D (naming its path and shape), an
        empty ``kernels``, ``rank``/``min_rank`` <= 0.

    Example:
      >>> import numpy as np
      >>> flat = np.eye(8)                      # flat spectrum
      >>> peaked = np.diag([8.0] + [0.1] * 7)   # one dominant direction
      >>> lamda_plus_ranks({"flat": flat, "peaked": peaked}, 2)
      {'flat': 3, 'peaked': 1}
    """
    rank = _lora.check_rank(rank, "lamda_plus_ranks")
    min_rank = _lora.check_rank(min_rank, "lamda_plus_ranks")
    if not kernels:
        raise ValueError("lamda_plus_ranks: kernels is empty")
    paths = list(kernels)
    scores, caps = [], []
    for p in paths:
        w = np.asarray(kernels[p], np.float64)
        if w.ndim != 2:
            raise ValueError(f"lamda_plus_ranks: {p} must be a 2-D (in, out) matrix, "
                             f"got shape {w.shape}")
        sv = np.linalg.svd(w, compute_uv=False)
        energy = sv ** 2 / max(float(np.sum(sv ** 2)), np.finfo(np.float64).tiny)
        scores.append(1.0 - float(np.sum(energy[:rank])))
        caps.append(min(w.shape) if max_rank is None else min(min(w.shape), max_rank))
    budget = rank * len(paths)
    spare = max(budget - min_rank * len(paths), 0)  # min_rank each, the rest by score
    sc = np.asarray(scores)
    share = sc / sc.sum() * spare if sc.sum() > 0 else np.full(len(paths), spare / len(paths))
    extra = np.floor(share).astype(int)
    for i in np.argsort(-(share - extra), kind="stable")[:spare - int(extra.sum())]:
        extra[i] += 1
    return {p: int(min(min_rank + e, c)) for p, e, c in zip(paths, extra, caps, strict=True)}
