# SPDX-License-Identifier: Apache-2.0
"""SpIEL's update / prune / regrow cycle as one jittable training step.

Scaling Sparse Fine-Tuning to Large Language Models (SpIEL). Ansell, Vulić,
Sterz, Korhonen, Ponti, 2024. https://arxiv.org/abs/2401.16405

Map to the reference ``SftSelector`` (docs/methods.md#spiel, counters in
completed optimizer steps ``c``; the schedule and heuristics come as a value,
``peftjax.masks.spiel_selector(...)``, since ``optim`` does not import
``masks``): an accumulation phase is open from the
start and again whenever ``(c+1) % S == 0``; while it is open the step also
takes the dense gradient ``∂L/∂W'`` (through a zero probe added to the
materialised weight) and on its first micro-batch fixes the candidate pool
(``selector.candidates``), then accumulates ``Σg``, ``Σg²`` and the sample
count at the candidates; when ``c % S == γ`` (and ``c <= T``) the phase closes
with ``selector.regrow`` (prune smallest ``|δ|``, grow the top ``|Σg|``) and
``reset_slots`` seeds the regrown slots' moments with the bias
counter-corrected means (``m = ḡ(1−β1^a)``, ``v = ḡ²(1−β2^a)``,
``age a = samples / grad_accumulation_steps``). The dense-gradient branch and
the regrow branch sit under ``lax.cond`` with unbatched predicates, so the
step compiles once and pays for the dense gradient only inside phases.

The sparse leaves are found by key path: trainable entries with a ``values``
field whose frozen entry has an ``indices`` field (``peftjax.adapters``'
``SparseValues``/``SparseSupport``); anything else in the trainable tree is
trained by the optimizer without reselection.

A step whose loss, gradient or (inside a phase) dense gradient is not finite
is skipped as a whole: values, support, optimizer state and selection state
come back unchanged, so the accumulators and moments never see a NaN.

Exports: ``SpIELState``, ``spiel_init``, ``make_spiel_step``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _slots

PyTree = Any


class SpIELState(NamedTuple):
    """Selection state carried between steps.

    Attributes:
      count: ``()`` int32, completed optimizer steps ``c``.
      phase: ``()`` bool, an accumulation phase is open.
      samples: ``()`` float32, micro-batches accumulated in this phase.
      candidates: ``{path: (batch..., k) int32}`` candidate positions.
      grad_sum: ``{path: (batch..., k) float32}`` ``Σ g`` at the candidates.
      gradsq_sum: ``{path: (batch..., k) float32}`` ``Σ g²``.
    """

    count: jax.Array
    phase: jax.Array
    samples: jax.Array
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


def _sparse_paths(trainable: dict, frozen: dict) -> list[str]:
    return [p for p, t in trainable.items()
            if hasattr(t, "values") and hasattr(frozen.get(p), "indices")]


def spiel_init(trainable: dict[str, Any], frozen: dict[str, Any]) -> SpIELState:
    """Creates the selection state (a phase open from step 0, as the reference).

    Args:
      trainable: ``AdapterState.trainable`` with sparse deltas.
      frozen: ``AdapterState.frozen``.

    Returns:
      A ``SpIELState`` with ``k``-sized accumulators per sparse leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.adapters import SparseSupport, SparseValues
      >>> s = spiel_init({"w": SparseValues(jnp.zeros(3))},
      ...                {"w": SparseSupport(jnp.arange(3))})
      >>> s.candidates["w"].shape, bool(s.phase)
      ((3,), True)
    """
    paths = _sparse_paths(trainable, frozen)
    if not paths:
        raise ValueError(
            "spiel_init: no sparse deltas in the state (trainable entries with a "
            "`values` field whose frozen entry has `indices`); use "
            "peftjax.adapters.sparse_delta"
        )
    shape = {p: frozen[p].indices.shape for p in paths}
    return SpIELState(
        count=jnp.zeros([], jnp.int32),
        phase=jnp.ones([], bool),
        samples=jnp.zeros([], jnp.float32),
        candidates={p: jnp.zeros(shape[p], jnp.int32) for p in paths},
        grad_sum={p: jnp.zeros(shape[p], jnp.float32) for p in paths},
        gradsq_sum={p: jnp.zeros(shape[p], jnp.float32) for p in paths},
    )


def _all_finite(tree: PyTree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.ones([], bool)


def _vmapped(fn: Callable, nbatch: int, in_axes: tuple) -> Callable:
    for _ in range(nbatch):
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn


def make_spiel_step(
    materialize_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    selector: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_accumulation_steps: int = 1,
    skip_nonfinite: bool = True,
    return_metrics: bool = False,
) -> Callable:
    """Builds ``step(trainable, frozen, opt_state, spiel_state, batch)`` for SpIEL-AG.

    One call = one optimizer step on one batch. Returns
    ``(trainable, frozen, opt_state, spiel_state, loss)``. A step whose loss
    or gradient (the dense one too, inside an accumulation phase) is not
    finite is skipped: all four states come back unchanged, the step count
    included (``optax.apply_if_finite`` inside the optimizer would not cover
    the accumulators or the support). Reselection
    replaces ``selector.counts(k)[e]`` slots per matrix at selection ``e``, keeps
    ``k`` fixed, zeroes replaced values and seeds their optimizer state via
    ``reset_slots`` (fields ``mu``, ``nu``, ``slot_count`` as in
    ``sft_adamw``; other params-shaped fields are zeroed). Use
    ``sft_adamw(lr, b1, b2, weight_decay=...)`` for the reference optimizer.

    Args:
      materialize_fn: ``(trainable, frozen) -> params`` (e.g.
        ``functools.partial(adapters.materialize, assignment, base)``).
      loss_fn: ``(params, batch) -> scalar``.
      optimizer: over the trainable tree (``optax.partition`` allowed).
      selector: ``peftjax.masks.spiel_selector(total_steps=..., ...)`` (the
        schedule ``S``, ``γ``, ``ξ``, policy, and the candidate / regrow
        functions; static).
      b1: the optimizer's ``β1`` used to seed moments.
      b2: the optimizer's ``β2``.
      grad_accumulation_steps: micro-batches per optimizer step in the
        reference run; only sets the seeded ``age = samples / this``.
      skip_nonfinite: skip steps with a non-finite loss or gradient
        (default); False applies them (NaN then reaches the state).
      return_metrics: also return ``{"skipped": ()int32}`` (1 on a skipped
        step) as a sixth output.

    Returns:
      The step function (jit it; it traces once).

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> from peftjax import masks
      >>> from peftjax.optim import sft_adamw
      >>> base = {"w": jnp.zeros((4, 4))}
      >>> a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=4))])
      >>> st = adapters.init(a, jax.random.key(0), base)
      >>> opt = sft_adamw(0.1)
      >>> step = jax.jit(make_spiel_step(
      ...     functools.partial(adapters.materialize, a, base),
      ...     lambda p, b: jnp.sum((p["w"] - b) ** 2), opt,
      ...     selector=masks.spiel_selector(total_steps=30, reselection_steps=10,
      ...                                   accumulation_steps=2)))
      >>> t, f, o, s = st.trainable, st.frozen, opt.init(st.trainable), None
      >>> s = spiel_init(t, f)
      >>> for _ in range(3):
      ...     t, f, o, s, loss = step(t, f, o, s, jnp.eye(4))
      >>> sorted(f["w"].indices.tolist()) == [0, 5, 10, 15]  # regrown on the diagonal
      True
    """
    for name in ("total_steps", "reselection_steps", "accumulation_steps",
                 "counts", "candidates", "regrow"):
        if not hasattr(selector, name):
            raise TypeError(
                f"make_spiel_step: selector must be a peftjax.masks.Selector (from "
                f"masks.spiel_selector), got {type(selector).__name__} without {name!r}"
            )
    S, gamma = selector.reselection_steps, selector.accumulation_steps
    total_steps = selector.total_steps
    f32 = jnp.float32

    def advance(trainable, frozen, opt_state, sstate, grads, cands, gs, gsq):
        # The optimizer step, the selection counters and, when due, regrowth.
        paths = list(sstate.candidates)
        nb = {p: frozen[p].indices.ndim - 1 for p in paths}
        samples = jnp.where(sstate.phase, sstate.samples + 1, sstate.samples)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        count = sstate.count + 1
        begin = (count + 1) % S == 0
        end = (count % S == gamma) & sstate.phase
        do_select = end & (count <= total_steps)

        def select(args):
            tr, fr, ost = args
            e = count // S
            tr, fr = dict(tr), dict(fr)
            changed = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), bool), tr)
            mu_seed, nu_seed, age_seed = (
                jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), f32), tr) for _ in range(3))
            for p in paths:
                k = fr[p].indices.shape[-1]
                table = jnp.asarray(selector.counts(k), jnp.int32)
                num = table[jnp.clip(e, 0, table.shape[0] - 1)]
                r = _vmapped(selector.regrow, nb[p], (0, 0, 0, 0, None))(
                    fr[p].indices, tr[p].values, cands[p], gs[p], num)
                tr[p] = tr[p]._replace(values=r.values)
                fr[p] = fr[p]._replace(indices=r.indices)
                gbar = jnp.take_along_axis(gs[p], r.source, axis=-1) / samples
                g2bar = jnp.take_along_axis(gsq[p], r.source, axis=-1) / samples
                age = samples / grad_accumulation_steps
                changed[p] = changed[p]._replace(values=r.changed)
                mu_seed[p] = mu_seed[p]._replace(values=gbar * (1 - b1**age))
                nu_seed[p] = nu_seed[p]._replace(values=g2bar * (1 - b2**age))
                age_seed[p] = age_seed[p]._replace(
                    values=jnp.broadcast_to(age - 1, gbar.shape))
            ost = _slots.reset_slots(ost, changed, {"mu": mu_seed, "nu": nu_seed,
                                                    "slot_count": age_seed})
            return tr, fr, ost

        trainable, frozen, opt_state = jax.lax.cond(
            do_select, select, lambda a: a, (trainable, frozen, opt_state))
        phase = jnp.where(end, False, sstate.phase) | begin
        samples = jnp.where(begin | end, 0.0, samples).astype(f32)
        new = SpIELState(count=count, phase=phase, samples=samples,
                         candidates=cands, grad_sum=gs, gradsq_sum=gsq)
        return trainable, frozen, opt_state, new

    def step(trainable, frozen, opt_state, sstate, batch):
        paths = list(sstate.candidates)
        nb = {p: frozen[p].indices.ndim - 1 for p in paths}

        def plain(tr):
            return jax.value_and_grad(lambda t: loss_fn(materialize_fn(t, frozen), batch))(tr)

        def with_probe(tr):
            base = materialize_fn(tr, frozen)
            flat = tree.leaves_by_path(base)
            for p in paths:
                lead = flat[p].shape[:nb[p]]
                if lead != frozen[p].indices.shape[:-1]:
                    raise ValueError(
                        f"SpIEL: {p!r} has shape {flat[p].shape} but indices "
                        f"{frozen[p].indices.shape}; batch axes must lead"
                    )
            probes = {p: jnp.zeros(flat[p].shape, f32) for p in paths}

            def loss(t, pr):
                w = tree.map_with_path(
                    lambda path, x: (x + pr[path].astype(x.dtype)) if path in pr else x,
                    materialize_fn(t, frozen))
                return loss_fn(w, batch)

            value, (g, dense) = jax.value_and_grad(loss, argnums=(0, 1))(tr, probes)
            finite = _all_finite((value, g, dense))
            first = sstate.samples == 0
            cands, gs, gsq = {}, {}, {}
            for p in paths:
                d = dense[p].reshape(frozen[p].indices.shape[:-1] + (-1,))
                k = frozen[p].indices.shape[-1]
                fresh = _vmapped(lambda x, k=k: selector.candidates(x, k), nb[p], (0,))
                c = jax.lax.cond(first, lambda d=d, f=fresh: f(d),
                                 lambda p=p: sstate.candidates[p])
                got = jnp.take_along_axis(d, c, axis=-1)
                cands[p] = c
                gs[p] = jnp.where(first, got, sstate.grad_sum[p] + got)
                gsq[p] = jnp.where(first, got * got, sstate.gradsq_sum[p] + got * got)
            return value, g, cands, gs, gsq, finite

        def acc_branch(tr):
            return with_probe(tr)

        def plain_branch(tr):
            value, g = plain(tr)
            return (value, g, sstate.candidates, sstate.grad_sum, sstate.gradsq_sum,
                    _all_finite((value, g)))

        value, grads, cands, gs, gsq, finite = jax.lax.cond(
            sstate.phase, acc_branch, plain_branch, trainable)
        old = (trainable, frozen, opt_state, sstate)
        if not skip_nonfinite:
            new = advance(trainable, frozen, opt_state, sstate, grads, cands, gs, gsq)
            skipped = jnp.zeros([], jnp.int32)
        else:
            args = (trainable, frozen, opt_state, sstate, grads, cands, gs, gsq)
            out = jax.eval_shape(advance, *args)

            def keep(*_):  # the states as given, in the dtypes a step returns
                return jax.tree.map(
                    lambda x, o: x if jnp.result_type(x) == o.dtype else x.astype(o.dtype),
                    old, out)

            new = jax.lax.cond(finite, advance, keep, *args)
            skipped = jnp.logical_not(finite).astype(jnp.int32)
        if return_metrics:
            return (*new, value, {"skipped": skipped})
        return (*new, value)

    return step
