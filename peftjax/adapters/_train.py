# SPDX-License-Identifier: Apache-2.0
"""The canonical training steps: adapter-only and hybrid.

Trainable means differentiated (docs/conventions.md#trainable-means-differentiated): the step takes
``value_and_grad`` with respect to the trainable pytree only; the base
parameters and the frozen adapter parts are passed as non-differentiated
arguments, so they get no gradients and no optimizer moments. Any optax
``GradientTransformation`` works.

* Adapter-only: trainable = ``AdapterState.trainable``.
* Hybrid: trainable = ``{"adapters": AdapterState.trainable, "full":
  {path: leaf}}``; the ``full`` leaves (e.g. a classification head, or the
  MLP under GaLore) are spliced into the base tree before ``materialize``.
  Route them with ``optax.partition`` and ``hybrid_labels``.

Non-finite steps. Both steps skip an update whose loss or gradient has a
NaN or an infinity (``skip_nonfinite=True``, the default): they return the
trainable tree and the optimizer state they were given, unchanged (counts and
inner states included), so one bad batch cannot poison the adapters or the
Adam moments. ``optax.apply_if_finite`` does the same inside an optimizer but
keeps its own counters in the state (which therefore changes on a skipped
step); the steps here decide before the optimizer runs, under one
``lax.cond``. ``return_metrics=True`` adds ``{"skipped": 0 or 1}`` to the
outputs so a loop can count skips; see ``docs/nonfinite.md``.

Exports: ``make_train_step``, ``HybridTrainable``, ``hybrid_init``,
``hybrid_labels``, ``hybrid_materialize``, ``make_hybrid_train_step``,
``update_if_finite`` (the skip, for hand-written steps).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from peftjax.adapters import _protocol, _tree
from peftjax.tree import _paths, _rules

PyTree = Any
LossFn = Callable[..., Any]


def all_finite(tree: PyTree) -> jax.Array:
    """Returns a ``()`` bool: every floating leaf of ``tree`` is finite.

    Integer, boolean and key leaves are ignored (they cannot hold NaN).

    Args:
      tree: any pytree of arrays (a loss, a gradient tree, ...).

    Returns:
      A scalar boolean array (True for a tree without floating leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])}))
      False
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not checks:
        return jnp.ones([], bool)
    return jnp.all(jnp.stack(checks))


def update_if_finite(optimizer: optax.GradientTransformation, grads: PyTree,
                   opt_state: PyTree, trainable: PyTree, loss: Any, *,
                   skip_nonfinite: bool = True) -> tuple[PyTree, PyTree, jax.Array]:
    """Applies ``optimizer`` unless ``loss`` or ``grads`` is non-finite.

    With ``skip_nonfinite`` the update runs under ``lax.cond``: a step whose
    loss or gradient holds a NaN or an infinity returns ``trainable`` and
    ``opt_state`` exactly as given (the optimizer does not run, so no count,
    moment or projector changes). This is the skip ``make_train_step`` uses;
    call it from a hand-written step. ``optax.apply_if_finite`` differs: it
    wraps the optimizer, runs it, and keeps counters in its state, so a
    skipped step still changes the state.

    Args:
      optimizer: any optax transformation over ``trainable``.
      grads: the gradient tree.
      opt_state: the optimizer state.
      trainable: the differentiated tree.
      loss: the scalar loss (checked with the gradients).
      skip_nonfinite: False applies every update (NaN passes on).

    Returns:
      ``(trainable, opt_state, skipped)``; ``skipped`` is a ``()`` int32, 1
      when the update was skipped.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = optax.sgd(1.0)
      >>> t = {"w": jnp.ones(2)}
      >>> t2, _, skipped = update_if_finite(opt, {"w": jnp.array([jnp.nan, 0.0])},
      ...                                 opt.init(t), t, jnp.float32(0.0))
      >>> t2["w"].tolist(), int(skipped)
      ([1.0, 1.0], 1)
    """

    def take(args):
        g, s, t = args
        updates, s = optimizer.update(g, s, t)
        return optax.apply_updates(t, updates), s

    if not skip_nonfinite:
        trainable, opt_state = take((grads, opt_state, trainable))
        return trainable, opt_state, jnp.zeros([], jnp.int32)
    args = (grads, opt_state, trainable)
    out = jax.eval_shape(take, args)

    def keep(args):  # the state as given, in the dtypes the update returns
        _, s, t = args
        return jax.tree.map(
            lambda x, o: x if jnp.result_type(x) == o.dtype else x.astype(o.dtype),
            (t, s), out)

    ok = all_finite((loss, grads))
    trainable, opt_state = jax.lax.cond(ok, take, keep, args)
    return trainable, opt_state, jnp.logical_not(ok).astype(jnp.int32)


def make_train_step(
    assignment: dict[str, _protocol.Adapter],
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    deterministic: bool = False,
    skip_nonfinite: bool = True,
    return_metrics: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """Builds the adapter-only step ``(trainable, opt_state, params, frozen, batch)``.

    The step computes ``loss_fn(materialize(assignment, params, trainable,
    frozen), batch)``, differentiates it with respect to ``trainable`` only
    and applies ``optimizer``. Jit it yourself (``jax.jit(step)``), donating
    ``trainable`` and ``opt_state`` if you like.

    A step whose loss or gradient is not finite is skipped: it returns
    ``trainable`` and ``opt_state`` unchanged (the optimizer does not run, so
    its count and moments stay as they were; with ``optax.apply_if_finite``
    inside the optimizer they would not). Count skips with
    ``return_metrics=True``.

    Args:
      assignment: ``{path: Adapter}``.
      loss_fn: ``(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``); the model sees ordinary parameters.
      optimizer: any optax transformation over the trainable pytree.
      has_aux: forwarded to ``jax.value_and_grad``.
      deterministic: forwarded to ``materialize`` (needed when an adapter has
        input dropout; the factored path applies dropout).
      skip_nonfinite: skip updates whose loss or gradient has a NaN or an
        infinity (default); False applies them (NaN then reaches the state).
      return_metrics: also return ``{"skipped": ()int32}`` (1 on a skipped
        step) as a fourth output.

    Returns:
      ``step(trainable, opt_state, params, frozen, batch) -> (trainable,
      opt_state, loss)`` (``loss`` is ``(loss, aux)`` with ``has_aux``), or
      ``(trainable, opt_state, loss, metrics)`` with ``return_metrics``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.eye(3)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> state = adapters.init(a, jax.random.key(0), params)
      >>> def loss_fn(p, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ p["w"] - y) ** 2)
      >>> opt = optax.sgd(0.1)
      >>> step = jax.jit(adapters.make_train_step(a, loss_fn, opt))
      >>> batch = (jnp.ones((2, 3)), jnp.zeros((2, 3)))
      >>> t, o, loss = step(state.trainable, opt.init(state.trainable), params,
      ...                   state.frozen, batch)
      >>> float(loss)
      1.0
    """

    def step(trainable, opt_state, params, frozen, batch):
        def objective(t):
            p = _tree.materialize(assignment, params, t, frozen,
                                  deterministic=deterministic)
            return loss_fn(p, batch)

        value, grads = jax.value_and_grad(objective, has_aux=has_aux)(trainable)
        trainable, opt_state, skipped = update_if_finite(
            optimizer, grads, opt_state, trainable, value[0] if has_aux else value,
            skip_nonfinite=skip_nonfinite)
        if return_metrics:
            return trainable, opt_state, value, {"skipped": skipped}
        return trainable, opt_state, value

    return step


HybridTrainable = dict[str, dict[str, Any]]


def hybrid_init(state: _protocol.AdapterState, params: PyTree, full_rules: Any, *,
                allow_unused: bool = False) -> HybridTrainable:
    """Builds the hybrid trainable tree ``{"adapters": ..., "full": ...}``.

    Args:
      state: the adapter state (its trainable part is taken as is).
      params: the base tree.
      full_rules: rules whose matching leaves are trained in full (payload
        ``True``; ``None``/``False`` excludes).
      allow_unused: forwarded to ``peftjax.tree.assign``.

    Returns:
      ``{"adapters": state.trainable, "full": {path: leaf}}``.

    Raises:
      ValueError: if a leaf is both adapted and trained in full.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.eye(3), "head": jnp.ones((3, 2))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> t = hybrid_init(s, params, [tree.Rule(where="head", then=True)])
      >>> sorted(t["full"])
      ['head']
    """
    chosen = _rules.assign(params, full_rules, allow_unused=allow_unused)
    full = {p: leaf for p, leaf in _paths.flatten(params) if chosen.get(p) is True}
    both = [p for p in full if p in state.trainable]
    if both:
        raise ValueError(
            f"hybrid_init: {both} are adapted and also trained in full; pick one"
        )
    return {"adapters": dict(state.trainable), "full": full}


def hybrid_labels(trainable: HybridTrainable, *, adapters: str = "adapters",
                  full: str | Callable[[str], str] = "full") -> PyTree:
    """Labels a hybrid trainable tree for ``optax.partition``.

    Args:
      trainable: from ``hybrid_init``.
      adapters: the label of every adapter leaf.
      full: the label of the fully trained leaves, or a function
        ``path -> label`` (e.g. GaLore for kernels, Adam for the rest).

    Returns:
      A label tree with the structure of ``trainable``.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"adapters": {}, "full": {"head": jnp.ones((3, 2))}}
      >>> hybrid_labels(t, full="adamw")
      {'adapters': {}, 'full': {'head': 'adamw'}}
    """
    ad = jax.tree.map(lambda _: adapters, trainable["adapters"])
    fl = {p: (full(p) if callable(full) else full) for p in trainable["full"]}
    return {"adapters": ad, "full": jax.tree.map(lambda x, lab: lab,
                                                 trainable["full"], fl)}


def replace_leaves(params: PyTree, leaves: dict[str, Any]) -> PyTree:
    """Returns ``params`` with the leaves at the given paths replaced.

    Args:
      params: any tree.
      leaves: ``{path: new_leaf}``; every path must exist.

    Returns:
      A tree with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> replace_leaves({"a": 1, "b": 2}, {"b": 3})
      {'a': 1, 'b': 3}
    """
    known = set(_paths.paths(params))
    missing = [p for p in leaves if p not in known]
    if missing:
        raise ValueError(f"replace_leaves: paths not in params: {missing[:10]}")
    return _paths.map_with_path(lambda p, x: leaves.get(p, x), params)


def hybrid_materialize(assignment: dict[str, _protocol.Adapter], params: PyTree,
                       trainable: HybridTrainable, frozen: dict[str, Any], *,
                       deterministic: bool = False) -> PyTree:
    """Splices the ``full`` leaves into ``params``, then materialises adapters.

    Args:
      assignment: ``{path: Adapter}``.
      params: the base tree.
      trainable: the hybrid trainable tree.
      frozen: ``AdapterState.frozen``.
      deterministic: forwarded to ``materialize``.

    Returns:
      A tree with the structure of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.eye(2), "head": jnp.ones((2, 1))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> t = {"adapters": s.trainable, "full": {"head": jnp.zeros((2, 1))}}
      >>> hybrid_materialize(a, params, t, s.frozen)["head"].sum()
      Array(0., dtype=float32)
    """
    spliced = replace_leaves(params, trainable["full"])
    return _tree.materialize(assignment, spliced, trainable["adapters"], frozen,
                             deterministic=deterministic)


def make_hybrid_train_step(
    assignment: dict[str, _protocol.Adapter],
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    deterministic: bool = False,
    skip_nonfinite: bool = True,
    return_metrics: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """Builds the hybrid step ``(trainable, opt_state, params, frozen, batch)``.

    Like ``make_train_step`` with ``trainable = {"adapters": ..., "full":
    ...}`` from ``hybrid_init``; route the two parts with
    ``optax.partition(..., hybrid_labels(trainable))``. ``params`` keeps the
    original values of the fully trained leaves (they are overridden by
    ``trainable["full"]``); write them back with ``replace_leaves`` to export.
    Non-finite steps are skipped as in ``make_train_step``: the whole hybrid
    tree and the optimizer state (a GaLore projector included) come back
    unchanged.

    Args:
      assignment: ``{path: Adapter}``.
      loss_fn: ``(params, batch) -> loss``.
      optimizer: any optax transformation over the hybrid trainable tree.
      has_aux: forwarded to ``jax.value_and_grad``.
      deterministic: forwarded to ``materialize``.
      skip_nonfinite: as in ``make_train_step``.
      return_metrics: as in ``make_train_step``.

    Returns:
      The step function, with ``make_train_step``'s signature and outputs.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.eye(2), "head": jnp.ones((2, 1))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> t = hybrid_init(s, params, [tree.Rule(where="head", then=True)])
      >>> opt = optax.partition({"adapters": optax.adam(1e-2),
      ...                        "full": optax.sgd(1e-2)}, hybrid_labels(t))
      >>> loss_fn = lambda p, x: jnp.sum(x @ p["w"] @ p["head"])
      >>> step = make_hybrid_train_step(a, loss_fn, opt)
      >>> t, o, loss = step(t, opt.init(t), params, s.frozen, jnp.ones((1, 2)))
      >>> float(loss)
      2.0
    """

    def step(trainable, opt_state, params, frozen, batch):
        def objective(t):
            p = hybrid_materialize(assignment, params, t, frozen,
                                   deterministic=deterministic)
            return loss_fn(p, batch)

        value, grads = jax.value_and_grad(objective, has_aux=has_aux)(trainable)
        trainable, opt_state, skipped = update_if_finite(
            optimizer, grads, opt_state, trainable, value[0] if has_aux else value,
            skip_nonfinite=skip_nonfinite)
        if return_metrics:
            return trainable, opt_state, value, {"skipped": skipped}
        return trainable, opt_state, value

    return step
