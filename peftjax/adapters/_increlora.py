# SPDX-License-Identifier: Apache-2.0
"""IncreLoRA: ranks that grow during training, towards the most important modules.

IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning. Zhang, Li, Chen, Jiang, Wang & Qian, 2023.
https://arxiv.org/abs/2308.12043 (code: FeiyuZhang98/IncreLoRA, followed here
where the paper leaves details open).

The update is AdaLoRA's SVD-like form, ``ΔW = P Λ Q · α/(r_k + 1e-5)``
(torch layout: ``P = B (out, R)``, ``Λ = diag(E)``, ``Q = A (R, in)``; ``r_k``
the module's current rank), but ranks are *added*, never pruned: every module
starts at a small rank; every ``incre_interval`` steps after ``init_warmup``
the ``top_h`` modules with the highest importance get ``rank_step`` more
components, until the total rank reaches the target.

* Importance of a module (the authors' backward hook on ``ΔW``):
  ``S = Σ |ΔW ⊙ ∂L/∂ΔW| / sqrt(numel ΔW)``, smoothed as in AdaLoRA,
  ``Ī ← β1 Ī + (1−β1) S``, ``Ū ← β2 Ū + (1−β2) |S − Ī|``, score ``Ī·Ū``
  (``increlora_module_scores``, ``increlora_init_importance``,
  ``increlora_update_importance``). ``∂L/∂ΔW`` is the gradient of the loss
  w.r.t. the *materialised* kernel ``W' = W0 + ΔW``;
  ``increlora_value_and_grad`` returns it (as scores) with the trainable
  gradients from one backward pass. It is not an optax transform: an optax
  update sees the factors' gradients, from which ``∂L/∂ΔW`` cannot be
  recovered.
* Advance learning: each module also carries ``rank_step`` *reserve*
  components whose ``A``, ``B`` are trained while their ``E`` is held at
  ``1e-5``; a selected module turns its reserve into active components (their
  ``E`` becomes trainable, from ``1e-5``) and gets a new reserve. When the
  total rank reaches the target, the reserve ``E`` are set to 0
  (``increlora_grow``).
* Orthogonality regulariser over all existing components (active and
  reserve), ``‖AAᵀ − I‖_F`` and ``‖BᵀB − I‖_F`` averaged over matrices
  (``increlora_orthogonality``; weight 0.1 in the authors' scripts).

Static shapes: every matrix pre-allocates ``max_rank`` components; the frozen
``IncreLoRARank(rank, reserve, reserve_value)`` says how many are active
(slots ``< rank``) and how many are reserve (the next ``reserve``); the rest
are inert (``E`` masked to 0, so their gradients are exactly zero). Growth
changes only these frozen integers and the newly activated ``E`` values, so a
jitted step does not retrace. Deviations from the authors' code, forced by
pre-allocation: a module whose ``max_rank`` is full is skipped by the
selection; the new reserve ``A``, ``B`` were drawn at init (``N(0, 0.02²)``,
the authors' draw) rather than at growth time; the authors' restart of the
learning-rate warm-up for new parameters belongs to the training schedule and
is not done here.

On a Flax kernel ``W0 (in, out)``: ``ΔW = (a ⊙ ẽ) @ b · α/(rank + 1e-5)`` with
``a = Aᵀ (in, R)``, ``b = Bᵀ (R, out)`` and ``ẽ_j = e_j`` (active),
``reserve_value`` (reserve, constant), 0 (inert).

Factored form: ``y = x@W0 + s·((x@(a ⊙ ẽ))@b)``, ``2·R·(in + out)`` FLOPs per
row for ``R = max_rank``, never an ``(in, out)`` temporary (the importance
score needs ``ΔW`` and its gradient, formed once per scoring step).

Exports: ``IncreLoRAParams``, ``IncreLoRARank``, ``IncreLoRAImportance``,
``increlora``, ``increlora_module_scores``, ``increlora_value_and_grad``,
``increlora_init_importance``, ``increlora_update_importance``,
``increlora_grow``, ``increlora_orthogonality``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _tree


class IncreLoRAParams(NamedTuple):
    """Trainable IncreLoRA components (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, R)`` (``Aᵀ``).
      e: ``(R,)`` (the diagonal ``Λ``; 0 at init).
      b: ``(R, out)`` (``Bᵀ``).
    """

    a: jax.Array
    e: jax.Array
    b: jax.Array


class IncreLoRARank(NamedTuple):
    """Frozen allocation of one matrix (changed only by ``increlora_grow``).

    Attributes:
      rank: int32, the active components (slots ``< rank``).
      reserve: int32, the reserve components after them.
      reserve_value: float32, the fixed ``E`` of the reserve (``1e-5`` with
        advance learning, 0 without it or after the last growth).
    """

    rank: jax.Array
    reserve: jax.Array
    reserve_value: jax.Array


class IncreLoRAImportance(NamedTuple):
    """Smoothed module importance ``{path: (batch...)}`` (AdaLoRA's ``Ī``, ``Ū``).

    Attributes:
      ipt: ``Ī`` per module.
      unc: ``Ū`` per module.
    """

    ipt: dict[str, jax.Array]
    unc: dict[str, jax.Array]


def _effective_e(t: IncreLoRAParams, f: IncreLoRARank) -> jax.Array:
    j = jnp.arange(t.e.shape[-1], dtype=jnp.int32)
    rv = jnp.asarray(f.reserve_value).astype(t.e.dtype)
    return jnp.where(j < f.rank, t.e,
                     jnp.where(j < f.rank + f.reserve, rv, jnp.zeros_like(t.e)))


def increlora(
    max_rank: int,
    *,
    init_rank: int = 1,
    rank_step: int = 1,
    alpha: float = 32.0,
    init_std: float = 0.02,
    advance_learning: bool = True,
    reserve_value: float = 1e-5,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """IncreLoRA adapter: ``max_rank`` pre-allocated components, ``init_rank`` active.

    ``W' = W + (a ⊙ ẽ) @ b · alpha/(rank + 1e-5)``, ``ẽ`` = ``e`` on the
    active slots, ``reserve_value`` on the ``rank_step`` reserve slots, 0
    beyond. Stored trainable parameters: ``max_rank·(in + out + 1)`` per
    matrix; of those, ``(rank + rank_step)·(in + out) + rank`` receive
    gradients (with advance learning; ``rank·(in + out + 1)`` without).

    Args:
      max_rank: ``R``, the pre-allocated components (static; ``<= min(in, out)``
        and ``>= init_rank + rank_step``).
      init_rank: the active components at init (the authors' ``lora_r``, 1).
      rank_step: components added per selection and held in reserve (the
        authors' ``incre_rank_num``; their scripts use half the average
        target rank).
      alpha: ``α`` (32 in the authors' scripts); scale ``α/(rank + 1e-5)``.
      init_std: std of ``a`` and ``b`` at init (0.02); ``e = 0``.
      advance_learning: reserve components are trained (``E`` fixed at
        ``reserve_value``) before they are allocated (True, the authors'
        default); False: reserve is inert until allocated.
      reserve_value: the reserve's fixed ``E`` (``1e-5``).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype.
      dropout: dropout on the adapter input (factored path only).

    Returns:
      An ``Adapter`` with trainable ``IncreLoRAParams(a, e, b)`` and frozen
      ``IncreLoRARank(rank, reserve, reserve_value)``. With advance learning
      the model is not exactly unchanged at init: the reserve adds
      ``reserve_value·α/(init_rank + 1e-5)·a_res@b_res`` (about ``1e-7``
      relative, as the authors').

    Raises:
      ValueError: a rank argument ``<= 0``, ``max_rank < init_rank +
        rank_step``, ``alpha <= 0``; at init, ``max_rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = increlora(4)
      >>> t, f = jax.eval_shape(ad.init, jax.random.key(0), jnp.ones((6, 5)))
      >>> t.a.shape, t.e.shape, t.b.shape, ad.num_trainable(jnp.ones((6, 5)))
      ((6, 4), (4,), (4, 5), 48)

    References:
      Zhang et al., 2023, https://arxiv.org/abs/2308.12043
    """
    max_rank = _lora.check_rank(max_rank, "increlora")
    init_rank = _lora.check_rank(init_rank, "increlora")
    rank_step = _lora.check_rank(rank_step, "increlora")
    if max_rank < init_rank + rank_step:
        raise ValueError(f"increlora: max_rank={max_rank} must be >= init_rank + rank_step "
                         f"= {init_rank + rank_step} (the active and reserve components)")
    alpha = _lora.check_alpha(alpha, "increlora")
    param_dtype = jnp.dtype(param_dtype)
    rv = float(reserve_value) if advance_learning else 0.0

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("increlora takes no stats")
        _lora.check_rank_fits(max_rank, w, "increlora")
        ka, kb = jax.random.split(key)
        n_in, n_out = w.shape
        t = IncreLoRAParams(
            a=(jax.random.normal(ka, (n_in, max_rank), jnp.float32) * init_std
               ).astype(param_dtype),
            e=jnp.zeros((max_rank,), param_dtype),
            b=(jax.random.normal(kb, (max_rank, n_out), jnp.float32) * init_std
               ).astype(param_dtype),
        )
        f = IncreLoRARank(rank=jnp.asarray(init_rank, jnp.int32),
                          reserve=jnp.asarray(rank_step, jnp.int32),
                          reserve_value=jnp.asarray(rv, jnp.float32))
        return t, f

    def factors(t, f):
        e = _effective_e(t, f)
        ct = _lowrank.compute_dtype(t.a.dtype, jnp.float32)
        s = jnp.asarray(alpha, ct) / (f.rank.astype(ct) + jnp.asarray(1e-5, ct))
        left = t.a * (e.astype(ct) * s).astype(t.a.dtype)[None, :]
        return _lowrank.LowRank(left=left, right=t.b, scale=1.0)

    hyper = (("max_rank", max_rank), ("init_rank", init_rank), ("rank_step", rank_step),
             ("alpha", alpha), ("advance_learning", bool(advance_learning)),
             ("reserve_value", float(reserve_value)))
    return _lift.lift_matrix(
        name=f"increlora(max_rank={max_rank}, init_rank={init_rank}, "
             f"rank_step={rank_step}, alpha={alpha})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=hyper,
        **_lowrank.low_rank_forms(factors),
    )


def _entries(frozen: dict[str, Any], fn: str) -> list[str]:
    paths = [p for p, f in frozen.items() if isinstance(f, IncreLoRARank)]
    if not paths:
        raise ValueError(f"{fn}: the state has no IncreLoRA entry (IncreLoRARank)")
    return paths


def _scores(assignment: dict[str, Any], params: Any, merged: Any, grads: Any,
            paths: list[str]) -> dict[str, jax.Array]:
    flat_p = tree.leaves_by_path(params)
    flat_m = tree.leaves_by_path(merged)
    flat_g = tree.leaves_by_path(grads)
    out = {}
    for p in paths:
        w = flat_p[p]
        r = tree.resolve(assignment[p].dimension_numbers, tuple(w.shape), path=p)
        delta = tree.to_matrix(jnp.asarray(flat_m[p]).astype(jnp.float32)
                               - jnp.asarray(w).astype(jnp.float32), r)
        g = tree.to_matrix(jnp.asarray(flat_g[p]).astype(jnp.float32), r)
        n = delta.shape[-2] * delta.shape[-1]
        out[p] = jnp.sum(jnp.abs(delta * g), axis=(-2, -1)) / jnp.sqrt(float(n))
    return out


def increlora_module_scores(assignment: dict[str, Any], params: Any,
                            state: _protocol.AdapterState, grads: Any
                            ) -> dict[str, jax.Array]:
    """The raw importance ``S = Σ|ΔW ⊙ ∂L/∂ΔW| / sqrt(in·out)`` of every IncreLoRA matrix.

    Args:
      assignment: the assignment the state was made with (``tree.assign``).
      params: the base parameters.
      state: the ``AdapterState``.
      grads: the gradient of the loss w.r.t. the *materialised* parameters
        (``jax.grad(loss)(adapters.materialize(assignment, params, *state))``),
        the same tree as ``params``; ``∂L/∂W' = ∂L/∂ΔW``.

    Returns:
      ``{path: (batch...)}`` float32 scores, one per matrix (per layer of a
      stacked leaf).

    Raises:
      ValueError: no IncreLoRA entry.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((6, 5))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.increlora(3))])
      >>> s = adapters.AdapterState(  # what init gives, with e = 1 and no reserve
      ...     {"w": IncreLoRAParams(jnp.ones((6, 3)), jnp.ones(3), jnp.ones((3, 5)))},
      ...     {"w": IncreLoRARank(jnp.asarray(1), jnp.asarray(0), jnp.asarray(0.0))})
      >>> g = {"w": jnp.ones((6, 5))}  # ∂L/∂W'; ΔW = 32/(1 + 1e-5) everywhere
      >>> scores = jax.jit(lambda s, g: adapters.increlora_module_scores(a, params, s, g))
      >>> round(float(scores(s, g)["w"]), 2)
      175.27
    """
    paths = _entries(state.frozen, "increlora_module_scores")
    merged = _tree.materialize(assignment, params, state.trainable, state.frozen,
                               deterministic=True)
    return _scores(assignment, params, merged, grads, paths)


def increlora_value_and_grad(loss_fn: Any, assignment: dict[str, Any], params: Any,
                             state: _protocol.AdapterState, *args: Any
                             ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """Loss, trainable gradients and module scores from one forward and backward pass.

    The loss is differentiated w.r.t. the materialised parameters (which
    gives ``∂L/∂ΔW`` for the scores) and that gradient is pulled back to the
    trainable state, so scoring costs no second backward pass (but uses the
    weight-space path, not ``peftjax.factored``, so adapter input dropout is
    not applied). Use it on the steps that
    update the importance; jit it with ``loss_fn`` and ``assignment`` closed
    over.

    Args:
      loss_fn: ``(params', *args) -> scalar loss``.
      assignment: the assignment (``tree.assign``).
      params: the base parameters.
      state: the ``AdapterState``.
      *args: passed to ``loss_fn`` (a batch).

    Returns:
      ``(loss, grads of state.trainable, {path: score})``, the scores as
      ``increlora_module_scores``.

    Raises:
      ValueError: no IncreLoRA entry.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((6, 5))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.increlora(3))])
      >>> s = adapters.AdapterState(
      ...     {"w": IncreLoRAParams(jnp.ones((6, 3)), jnp.ones(3), jnp.ones((3, 5)))},
      ...     {"w": IncreLoRARank(jnp.asarray(1), jnp.asarray(1), jnp.asarray(1e-5))})
      >>> def loss_fn(p, x):
      ...     return jnp.sum((x @ p["w"]) ** 2)
      >>> step = jax.jit(lambda s, x: adapters.increlora_value_and_grad(
      ...     loss_fn, a, params, s, x))
      >>> loss, g, scores = step(s, jnp.ones((2, 6)))
      >>> g["w"].e.shape, scores["w"].shape
      ((3,), ())
    """
    paths = _entries(state.frozen, "increlora_value_and_grad")
    merged, pull = jax.vjp(
        lambda t: _tree.materialize(assignment, params, t, state.frozen, deterministic=True),
        state.trainable)
    loss, g_merged = jax.value_and_grad(loss_fn)(merged, *args)
    (g_trainable,) = pull(g_merged)
    return loss, g_trainable, _scores(assignment, params, merged, g_merged, paths)


def increlora_init_importance(state: _protocol.AdapterState) -> IncreLoRAImportance:
    """Zero smoothed importance for the IncreLoRA entries of ``state``.

    Args:
      state: the ``AdapterState`` (or its frozen dict).

    Returns:
      ``IncreLoRAImportance`` of float32 zeros, one value per matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> frozen = {"w": IncreLoRARank(jnp.asarray(1), jnp.asarray(1), jnp.asarray(1e-5))}
      >>> float(increlora_init_importance(frozen).ipt["w"])
      0.0
    """
    frozen = state.frozen if isinstance(state, _protocol.AdapterState) else state
    paths = _entries(frozen, "increlora_init_importance")
    zeros = {p: jnp.zeros(jnp.shape(frozen[p].rank), jnp.float32) for p in paths}
    return IncreLoRAImportance(ipt=zeros, unc=dict(zeros))


def increlora_update_importance(state: IncreLoRAImportance, scores: dict[str, jax.Array],
                                *, beta1: Any = 0.85, beta2: Any = 0.85
                                ) -> IncreLoRAImportance:
    """One step of the smoothing: ``Ī ← β1 Ī + (1−β1) S``, ``Ū ← β2 Ū + (1−β2)|S − Ī|``.

    Args:
      state: the current ``IncreLoRAImportance``.
      scores: this step's ``increlora_module_scores``.
      beta1: smoothing of ``Ī`` (0.85).
      beta2: smoothing of ``Ū`` (0.85); uses the updated ``Ī``.

    Returns:
      The new ``IncreLoRAImportance``; its score is ``Ī·Ū``.

    Raises:
      ValueError: ``scores`` and ``state`` cover different paths.

    Example:
      >>> import jax.numpy as jnp
      >>> z = IncreLoRAImportance({"w": jnp.zeros(())}, {"w": jnp.zeros(())})
      >>> s = increlora_update_importance(z, {"w": jnp.asarray(1.0)})
      >>> round(float(s.ipt["w"]), 4), round(float(s.unc["w"]), 4)
      (0.15, 0.1275)
    """
    if sorted(scores) != sorted(state.ipt):
        raise ValueError(f"increlora_update_importance: scores cover {sorted(scores)[:10]}, "
                         f"the importance state {sorted(state.ipt)[:10]}")
    s = {p: jnp.asarray(scores[p], jnp.float32) for p in state.ipt}
    ipt = {p: beta1 * state.ipt[p] + (1 - beta1) * s[p] for p in state.ipt}
    unc = {p: beta2 * state.unc[p] + (1 - beta2) * jnp.abs(s[p] - ipt[p])
           for p in state.ipt}
    return IncreLoRAImportance(ipt=ipt, unc=unc)


def increlora_grow(state: _protocol.AdapterState, scores: Any, *, top_h: int,
                   target_total_rank: Any) -> tuple[_protocol.AdapterState, dict]:
    """Adds ``rank_step`` components to the ``top_h`` most important matrices.

    Call it every ``incre_interval`` steps after ``init_warmup`` (the authors'
    schedule; 100 and 100 in their scripts, ``top_h`` 6 to 10). The threshold
    is the ``k``-th largest score, ``k = min(top_h, target − total)``, over
    all matrices (each layer of a stacked leaf is one); every matrix scoring
    ``>=`` it grows (ties can grow more), except those whose ``max_rank`` is
    full. A grown matrix's reserve becomes active (its ``E`` start from
    ``reserve_value``) and the next ``rank_step`` slots become its reserve.
    When the total rank reaches ``target_total_rank`` the reserve values are
    set to 0 everywhere. Pure and traceable (``top_h`` static).

    Args:
      state: the ``AdapterState``.
      scores: ``{path: (batch...)}`` (``Ī·Ū`` from the importance state, or
        an ``IncreLoRAImportance``, whose ``Ī·Ū`` is taken).
      top_h: matrices selected per growth (static int).
      target_total_rank: the total rank to stop at (the authors' target
        average rank × number of matrices).

    Returns:
      ``(new state, {path: bool (batch...)} grown)``.

    Raises:
      ValueError: no IncreLoRA entry, scores for other paths, ``top_h < 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters
      >>> t = IncreLoRAParams(jnp.ones((6, 4)), jnp.zeros(4), jnp.ones((4, 5)))
      >>> f = IncreLoRARank(jnp.asarray(1), jnp.asarray(1), jnp.asarray(1e-5))
      >>> s = adapters.AdapterState({"u": t, "v": t}, {"u": f, "v": f})  # as init gives
      >>> grow = jax.jit(adapters.increlora_grow, static_argnames="top_h")
      >>> s2, grown = grow(s, {"u": jnp.asarray(2.0), "v": jnp.asarray(1.0)}, top_h=1,
      ...                  target_total_rank=8)
      >>> int(s2.frozen["u"].rank), int(s2.frozen["v"].rank), bool(grown["u"])
      (2, 1, True)
    """
    top_h = _lora.check_rank(top_h, "increlora_grow (top_h)")
    paths = _entries(state.frozen, "increlora_grow")
    if isinstance(scores, IncreLoRAImportance):
        scores = {p: scores.ipt[p] * scores.unc[p] for p in scores.ipt}
    if sorted(scores) != sorted(paths):
        raise ValueError(f"increlora_grow: scores cover {sorted(scores)[:10]}, the state "
                         f"has IncreLoRA entries {sorted(paths)[:10]}")
    fr = {p: state.frozen[p] for p in paths}
    cap = {p: state.trainable[p].e.shape[-1] for p in paths}
    total = sum(jnp.sum(fr[p].rank, dtype=jnp.int32) for p in paths)
    # a matrix can grow if its new reserve still fits in max_rank
    room = {p: fr[p].rank + 2 * fr[p].reserve <= cap[p] for p in paths}
    masked = {p: jnp.where(room[p], jnp.asarray(scores[p], jnp.float32), -jnp.inf)
              for p in paths}
    flat = jnp.concatenate([masked[p].reshape(-1) for p in paths])
    target = jnp.asarray(target_total_rank, jnp.int32)
    k = jnp.minimum(top_h, target - total)
    order = jnp.sort(flat)[::-1]
    thr = order[jnp.clip(k - 1, 0, flat.size - 1)]
    go = k > 0
    grown = {p: go & room[p] & (masked[p] >= thr) & jnp.isfinite(masked[p]) for p in paths}
    trainable, frozen = dict(state.trainable), dict(state.frozen)
    new_total = total
    for p in paths:
        f, t = fr[p], state.trainable[p]
        g = grown[p]
        j = jnp.arange(cap[p], dtype=jnp.int32).reshape((1,) * f.rank.ndim + (cap[p],))
        new_rank = f.rank + jnp.where(g, f.reserve, 0)
        # the reserve becomes active: its E starts from the reserve's value
        act = (j >= f.rank[..., None]) & (j < new_rank[..., None])
        rv = jnp.asarray(f.reserve_value)[..., None].astype(t.e.dtype)
        e = jnp.where(act, jnp.broadcast_to(rv, t.e.shape), t.e)
        trainable[p] = t._replace(e=e)
        frozen[p] = f._replace(rank=new_rank.astype(jnp.int32))
        new_total = new_total + jnp.sum(new_rank - f.rank, dtype=jnp.int32)
    done = new_total >= target
    for p in paths:
        f = frozen[p]
        frozen[p] = f._replace(reserve_value=jnp.where(
            done, jnp.zeros_like(f.reserve_value), f.reserve_value))
    return _protocol.AdapterState(trainable=trainable, frozen=frozen), grown


def increlora_orthogonality(state: _protocol.AdapterState, *, weight: float = 0.1
                            ) -> jax.Array:
    """The orthogonality regulariser over the existing (active and reserve) components.

    Args:
      state: the ``AdapterState`` (pass the trainable part being
        differentiated as ``state._replace(trainable=t)``).
      weight: the coefficient (the authors' ``reg_orth_coef``, 0.1).

    Returns:
      ``weight · mean over matrices of (‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)``, each Gram
      restricted to the slots ``< rank + reserve`` (Flax layout: ``aᵀa`` and
      ``b bᵀ``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.adapters import AdapterState
      >>> t = IncreLoRAParams(jnp.eye(3, 3), jnp.zeros(3), jnp.eye(3, 4))
      >>> f = IncreLoRARank(jnp.asarray(1), jnp.asarray(1), jnp.asarray(1e-5))
      >>> float(jax.jit(increlora_orthogonality)(AdapterState({"w": t}, {"w": f})))
      0.0
    """
    paths = _entries(state.frozen, "increlora_orthogonality")
    terms = []
    for p in paths:
        t, f = state.trainable[p], state.frozen[p]
        n = t.e.shape[-1]
        j = jnp.arange(n, dtype=jnp.int32).reshape((1,) * f.rank.ndim + (n,))
        live = j < (f.rank + f.reserve)[..., None]  # (batch..., R)
        both = (live[..., :, None] & live[..., None, :]).astype(jnp.float32)
        eye = jnp.eye(n, dtype=jnp.float32)
        a = t.a.astype(jnp.float32)
        b = t.b.astype(jnp.float32)
        for gram in (jnp.swapaxes(a, -1, -2) @ a, b @ jnp.swapaxes(b, -1, -2)):
            d = (gram - eye) * both
            terms.append(jnp.sqrt(jnp.sum(jnp.square(d), axis=(-2, -1))).reshape(-1))
    allt = jnp.concatenate(terms)
    return weight * jnp.sum(allt) / allt.size
