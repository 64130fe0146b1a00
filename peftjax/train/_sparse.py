# SPDX-License-Identifier: Apache-2.0
"""SpIEL-AG inside the training step: accumulate, prune and regrow sparse deltas.

Scaling Sparse Fine-Tuning to Large Language Models (SpIEL). Ansell, Vulić,
Sterz, Korhonen, Ponti, 2024. https://arxiv.org/abs/2401.16405

Map to the reference ``SftSelector`` (docs/methods.md#spiel; counters in
completed optimizer updates ``c``; the schedule and heuristics come as a value,
``peftjax.masks.spiel_selector(...)``):

* an accumulation phase is open from the start and again whenever
  ``(c+1) % S == 0``; while it is open every micro-batch also yields the dense
  gradient ``∂L/∂W'`` (through a zero probe added to the materialised weight).
  The first micro-batch of a phase fixes the candidate pool
  (``selector.candidates``); each micro-batch adds ``g``, ``g²`` at the
  candidates and one sample;
* when ``c % S == γ`` (and ``c <= T``) the phase closes with
  ``selector.regrow`` (prune the smallest ``|δ|``, grow the top ``|Σg|``) and
  ``optim.reset_slots`` seeds the regrown slots' moments with the bias
  counter-corrected means ``m = ḡ(1−β1^a)``, ``v = ḡ²(1−β2^a)``,
  ``a = samples / accumulate`` (updates accumulated).

With ``accumulate > 1`` each micro-batch's gradient of its own loss is
accumulated, so ``ḡ`` has the scale of the gradient the optimizer applies (the
mean over micro-batches); the reference's hook sees gradients of the loss
already divided by the accumulation count, which seeds moments that many times
smaller. The dense-gradient branch and the regrow branch sit under
``lax.cond`` with unbatched predicates: the step compiles once and pays for
the dense gradient only inside phases.

The sparse leaves are found by key path: adapter entries with a ``values``
field whose frozen entry has an ``indices`` field (``adapters.SparseValues``
/ ``adapters.SparseSupport``). Other trainable entries are trained by the
optimizer without reselection.

Exports: ``SpIELState``, ``SpIELConfig``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import optim, tree

PyTree = Any
_SELECTOR_FIELDS = ("total_steps", "reselection_steps", "accumulation_steps", "counts",
                    "candidates", "regrow")


class SpIELState(NamedTuple):
    """The selection state SpIEL carries between updates.

    ``TrainState.opt_state`` is ``(optimizer state, SpIELState)`` in the
    sparse composition of ``peftjax.train.trainer``.

    Attributes:
      count: ``()`` int32, completed optimizer updates ``c`` (skipped steps
        are not counted).
      phase: ``()`` bool, an accumulation phase is open.
      samples: ``()`` float32, micro-batches accumulated in this phase.
      candidates: ``{path: (batch..., k) int32}`` candidate positions (flat
        indices into each matrix slice).
      grad_sum: ``{path: (batch..., k) float32}`` ``Σ g`` at the candidates.
      gradsq_sum: ``{path: (batch..., k) float32}`` ``Σ g²``.
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    phase: jax.Array  # shape=(), dtype=bool
    samples: jax.Array  # shape=(), dtype=jnp.float32
    candidates: dict[str, jax.Array]
    grad_sum: dict[str, jax.Array]
    gradsq_sum: dict[str, jax.Array]

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "phase": tree.StateRole.REPLICATED,
                   "samples": tree.StateRole.REPLICATED,
                   "candidates": tree.StateRole.SPARSE_SLOTS,
                   "grad_sum": tree.StateRole.SPARSE_SLOTS,
                   "gradsq_sum": tree.StateRole.SPARSE_SLOTS}

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole): the
    # accumulators follow the sparse values at <path>/values.
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "phase": tree.StateRole.REPLICATED,
                   "samples": tree.StateRole.REPLICATED,
                   "candidates": tree.StateRole.SPARSE_SLOTS,
                   "grad_sum": tree.StateRole.SPARSE_SLOTS,
                   "gradsq_sum": tree.StateRole.SPARSE_SLOTS}


class SpIELConfig(NamedTuple):
    """SpIEL settings beyond the schedule: the betas that seed regrown moments.

    ``trainer(..., sparse=selector)`` seeds regrown slots with ``β1 = 0.9``,
    ``β2 = 0.999`` (``optim.sft_adamw``'s defaults); an optimizer with other
    betas passes ``sparse=SpIELConfig(selector, b1=..., b2=...)``.

    Attributes:
      selector: a ``peftjax.masks.Selector`` (``masks.spiel_selector(...)``).
      b1: the optimizer's ``β1`` (static).
      b2: the optimizer's ``β2`` (static).

    Example:
      >>> from peftjax import masks, train
      >>> cfg = train.SpIELConfig(masks.spiel_selector(total_steps=10), b1=0.8)
      >>> cfg.b1, cfg.b2
      (0.8, 0.999)
    """

    selector: Any
    b1: float = 0.9
    b2: float = 0.999


def config(sparse: Any) -> SpIELConfig:
    """The ``SpIELConfig`` of ``trainer``'s ``sparse`` argument, validated."""
    cfg = sparse if isinstance(sparse, SpIELConfig) else SpIELConfig(sparse)
    missing = [n for n in _SELECTOR_FIELDS if not hasattr(cfg.selector, n)]
    if missing:
        raise TypeError(
            "trainer: sparse= selector must be a peftjax.masks.Selector (from "
            f"masks.spiel_selector) or a train.SpIELConfig, got "
            f"{type(cfg.selector).__name__} without {missing[0]!r}")
    for name in ("b1", "b2"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"trainer: SpIELConfig.{name} must be a float in [0, 1), "
                             f"got {v!r}")
    return cfg


def sparse_paths(adapter_trainable: dict[str, Any], frozen: dict[str, Any]) -> list[str]:
    """Paths of the sparse deltas: ``values`` trainable with ``indices`` frozen."""
    return [p for p, t in adapter_trainable.items()
            if hasattr(t, "values") and hasattr(frozen.get(p), "indices")]


def init(adapter_trainable: dict[str, Any], frozen: dict[str, Any]) -> SpIELState:
    """The selection state before the first step (a phase open, as the reference)."""
    paths = sparse_paths(adapter_trainable, frozen)
    if not paths:
        raise ValueError(
            "trainer: sparse= needs sparse deltas among the adapters (adapter entries "
            "with a `values` field whose frozen entry has `indices`); assign "
            f"peftjax.adapters.sparse_delta to some leaves; adapted paths: "
            f"{sorted(adapter_trainable)[:10]}")
    shape = {p: frozen[p].indices.shape for p in paths}
    return SpIELState(
        count=jnp.zeros([], jnp.int32),
        phase=jnp.ones([], bool),
        samples=jnp.zeros([], jnp.float32),
        candidates={p: jnp.zeros(shape[p], jnp.int32) for p in paths},
        grad_sum={p: jnp.zeros(shape[p], jnp.float32) for p in paths},
        gradsq_sum={p: jnp.zeros(shape[p], jnp.float32) for p in paths},
    )


def _vmapped(fn: Callable, nbatch: int, in_axes: tuple) -> Callable:
    for _ in range(nbatch):
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn


def _all_finite(t: PyTree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.ones([], bool)


def make_update(
    cfg: SpIELConfig,
    optimizer: optax.GradientTransformation,
    effective: Callable[[PyTree, PyTree, PyTree], PyTree],
    loss_fn: Callable[..., Any],
    *,
    get_adapters: Callable[[PyTree], dict[str, Any]],
    set_adapters: Callable[[PyTree, dict[str, Any]], PyTree],
    accumulate: int,
    has_aux: bool,
    skip_nonfinite: bool,
) -> Callable[..., tuple[Any, ...]]:
    """The SpIEL half of the sparse step.

    Returns ``update(trainable, frozen, opt_state, params, batch) ->
    (trainable, frozen, opt_state, loss, aux, grads, skipped)`` where
    ``opt_state = (optimizer state, SpIELState)``, ``effective(trainable,
    frozen, params)`` is the tree the model sees and ``batch`` carries a
    leading micro-batch axis when ``accumulate > 1``.
    """
    selector, b1, b2 = cfg.selector, cfg.b1, cfg.b2
    S, gamma = selector.reselection_steps, selector.accumulation_steps
    total_steps = selector.total_steps
    f32 = jnp.float32

    def value_of(v):
        return (v[0], v[1]) if has_aux else (v, None)

    def micro(trainable, frozen, params, sstate, carry, mb):
        # One micro-batch: its loss and gradient, and (inside a phase) the
        # candidates and their accumulated dense-gradient statistics.
        paths = list(sstate.candidates)
        nb = {p: frozen[p].indices.ndim - 1 for p in paths}
        cands, gs, gsq, first, dense_ok = carry

        def plain(_):
            v, g = jax.value_and_grad(lambda t: loss_fn(effective(t, frozen, params), mb),
                                      has_aux=has_aux)(trainable)
            return v, g, cands, gs, gsq, jnp.ones([], bool)

        def probed(_):
            shapes = tree.leaves_by_path(jax.eval_shape(effective, trainable, frozen, params))
            for p in paths:
                lead = shapes[p].shape[:nb[p]]
                if lead != frozen[p].indices.shape[:-1]:
                    raise ValueError(
                        f"trainer (SpIEL): {p!r} has shape {shapes[p].shape} but its "
                        f"indices have shape {frozen[p].indices.shape}; batch axes must lead")
            probes = {p: jnp.zeros(shapes[p].shape, f32) for p in paths}

            def loss(t, pr):
                w = tree.map_with_path(
                    lambda path, x: x + pr[path].astype(x.dtype) if path in pr else x,
                    effective(t, frozen, params))
                return loss_fn(w, mb)

            v, (g, dense) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux)(
                trainable, probes)
            new_c, new_s, new_q = {}, {}, {}
            for p in paths:
                d = dense[p].reshape(frozen[p].indices.shape[:-1] + (-1,))
                k = frozen[p].indices.shape[-1]
                fresh = _vmapped(lambda x, k=k: selector.candidates(x, k), nb[p], (0,))
                c = jax.lax.cond(first, lambda d=d, f=fresh: f(d), lambda p=p: cands[p])
                got = jnp.take_along_axis(d, c, axis=-1)
                new_c[p] = c
                new_s[p] = jnp.where(first, got, gs[p] + got)
                new_q[p] = jnp.where(first, got * got, gsq[p] + got * got)
            return v, g, new_c, new_s, new_q, _all_finite(dense)

        v, g, cands, gs, gsq, ok = jax.lax.cond(sstate.phase, probed, plain, None)
        first = first & ~sstate.phase
        return v, g, (cands, gs, gsq, first, dense_ok & ok)

    def advance(trainable, frozen, opt_state, grads, cands, gs, gsq):
        # The optimizer update, the selection counters and, when due, regrowth.
        inner, sstate = opt_state
        paths = list(sstate.candidates)
        nb = {p: frozen[p].indices.ndim - 1 for p in paths}
        samples = jnp.where(sstate.phase, sstate.samples + accumulate, sstate.samples)
        with jax.numpy_dtype_promotion("standard"):
            updates, inner = optimizer.update(grads, inner, trainable)
            trainable = optax.apply_updates(trainable, updates)
        count = sstate.count + 1
        begin = (count + 1) % S == 0
        end = (count % S == gamma) & sstate.phase
        do_select = end & (count <= total_steps)

        def select(args):
            tr, fr, ost = args
            e = count // S
            ad, fr = dict(get_adapters(tr)), dict(fr)

            def zeros(dtype):
                return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype), ad)

            changed, mu_seed, nu_seed, age_seed = zeros(bool), zeros(f32), zeros(f32), zeros(f32)
            for p in paths:
                k = fr[p].indices.shape[-1]
                table = jnp.asarray(selector.counts(k), jnp.int32)
                num = table[jnp.clip(e, 0, table.shape[0] - 1)]
                r = _vmapped(selector.regrow, nb[p], (0, 0, 0, 0, None))(
                    fr[p].indices, ad[p].values, cands[p], gs[p], num)
                ad[p] = ad[p]._replace(values=r.values)
                fr[p] = fr[p]._replace(indices=r.indices)
                gbar = jnp.take_along_axis(gs[p], r.source, axis=-1) / samples
                g2bar = jnp.take_along_axis(gsq[p], r.source, axis=-1) / samples
                age = samples / accumulate
                changed[p] = changed[p]._replace(values=r.changed)
                mu_seed[p] = mu_seed[p]._replace(values=gbar * (1 - b1**age))
                nu_seed[p] = nu_seed[p]._replace(values=g2bar * (1 - b2**age))
                age_seed[p] = age_seed[p]._replace(values=jnp.broadcast_to(age - 1, gbar.shape))

            def whole(part, fill):  # an adapter-part tree lifted to the trainable tree
                return set_adapters(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), fill), tr),
                                    part)

            ost = optim.reset_slots(ost, whole(changed, bool),
                                    {"mu": whole(mu_seed, f32), "nu": whole(nu_seed, f32),
                                     "slot_count": whole(age_seed, f32)})
            return set_adapters(tr, ad), fr, ost

        trainable, frozen, inner = jax.lax.cond(
            do_select, select, lambda a: a, (trainable, frozen, inner))
        phase = jnp.where(end, False, sstate.phase) | begin
        samples = jnp.where(begin | end, 0.0, samples).astype(f32)
        new = SpIELState(count=count, phase=phase, samples=samples,
                         candidates=cands, grad_sum=gs, gradsq_sum=gsq)
        return trainable, frozen, (inner, new)

    def update(trainable, frozen, opt_state, params, batch):
        sstate = opt_state[1]
        carry = (sstate.candidates, sstate.grad_sum, sstate.gradsq_sum,
                 sstate.samples == 0, jnp.ones([], bool))
        if accumulate == 1:
            v, grads, carry = micro(trainable, frozen, params, sstate, carry, batch)
            loss, aux = value_of(v)
        else:
            def body(acc, mb):
                loss_sum, g_sum, c = acc
                v, g, c = micro(trainable, frozen, params, sstate, c, mb)
                loss_i, aux_i = value_of(v)
                return (loss_sum + loss_i, jax.tree.map(jnp.add, g_sum, g), c), aux_i

            mb0 = jax.tree.map(lambda x: x[0], batch)
            out = jax.eval_shape(lambda: micro(trainable, frozen, params, sstate, carry, mb0))
            loss0 = value_of(out[0])[0]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, out[1]))
            (loss, grads, carry), aux = jax.lax.scan(body, (*zeros, carry), batch)
            loss = loss / accumulate
            grads = jax.tree.map(lambda g: g / accumulate, grads)
        cands, gs, gsq, _, dense_ok = carry
        finite = _all_finite((loss, grads)) & dense_ok
        args = (trainable, frozen, opt_state, grads, cands, gs, gsq)
        if not skip_nonfinite:
            trainable, frozen, opt_state = advance(*args)
            return trainable, frozen, opt_state, loss, aux, grads, jnp.zeros([], jnp.int32)
        out = jax.eval_shape(advance, *args)

        def keep(*_):  # the states as given, in the dtypes an update returns
            return jax.tree.map(
                lambda x, o: x if jnp.result_type(x) == o.dtype else x.astype(o.dtype),
                (trainable, frozen, opt_state), out)

        trainable, frozen, opt_state = jax.lax.cond(finite, advance, keep, *args)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        return trainable, frozen, opt_state, loss, aux, grads, skipped

    return update
