# SPDX-License-Identifier: Apache-2.0
"""The step builder: one jitted training step for every composition.

``trainer(loss_fn, optimizer, ...)`` returns ``Trainer(init, step, params)``.
The composition is chosen by the arguments, and fixes the trainable tree:

* adapter-only (``adapters=assignment``): ``{path: AdapterParams}``;
* hybrid (``adapters=assignment or {}``, ``full=rules``): ``{"adapters":
  {...}, "full": {path: leaf}}``, routed with ``optax.partition`` and
  ``hybrid_labels``;
* optimizer-only (neither): the whole parameter tree (route frozen leaves to
  ``optax.set_to_zero()`` with ``tree.labels``);
* sparse (``adapters=`` sparse deltas, ``sparse=selector``): SpIEL-AG's
  accumulate / prune / regrow inside the step (``_sparse``).

Trainable means differentiated (docs/conventions.md#trainable-means-differentiated):
the step differentiates ``TrainState.trainable`` only; the base parameters and
the frozen adapter parts are non-differentiated arguments. Adapter-only and
hybrid steps run the model through ``factored.transform`` by default (no
``W + ΔW`` and no weight-sized cotangent); ``factored=False`` materialises.

A step whose loss or gradient is not finite is skipped (``update_if_finite``):
trainable, frozen and optimizer state come back unchanged, ``step`` still
counts the call and the key still advances; see ``docs/nonfinite.md``.

Exports: ``Trainer``, ``trainer``, ``hybrid_labels``, ``update_if_finite``,
``all_finite``.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import adapters as adapters_lib
from peftjax import factored as factored_lib
from peftjax import tree
from peftjax.train import _sparse, _state

PyTree = Any
LossFn = Callable[..., Any]
_ADAPTERS, _HYBRID, _OPTIMIZER, _SPARSE = "adapter-only", "hybrid", "optimizer-only", "sparse"


class Trainer(NamedTuple):
    """What ``trainer`` builds: three functions over one ``TrainState``.

    Attributes:
      init: ``(key, params, *, state=None) -> TrainState``; ``params`` is the
        base tree (optimizer-only: the tree to train, copied into the state);
        ``state``: start from this ``adapters.AdapterState`` instead of
        ``adapters.init`` (a data-driven initialiser's ``InitResult.state``,
        with its ``InitResult.params`` as the base).
      step: ``(state, batch, params=None) -> (state, metrics)``, jitted, the
        state donated (unless ``donate=False``); ``params`` is the frozen base
        tree (``None`` in optimizer-only). ``metrics``: ``loss``,
        ``grad_norm``, ``skipped`` and, when counted, ``tokens`` (``()``
        arrays); ``aux`` with ``has_aux``.
      params: ``(state, params=None) -> tree``: the effective parameters the
        model sees (adapters materialised, full leaves spliced in, dropout
        off), for evaluation and export.
    """

    init: Callable[..., _state.TrainState]
    step: Callable[..., tuple[_state.TrainState, dict[str, Any]]]
    params: Callable[..., PyTree]


def all_finite(t: PyTree) -> jax.Array:
    """Returns a ``()`` bool: every floating leaf of ``t`` is finite.

    Integer, boolean and PRNG-key leaves are ignored (they hold no NaN).

    Args:
      t: any pytree of arrays (a loss, a gradient tree, ...).

    Returns:
      A scalar boolean array (True for a tree without floating leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import train
      >>> bool(train.all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}))
      False
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not checks:
        return jnp.ones([], bool)
    return jnp.all(jnp.stack(checks))


def update_if_finite(optimizer: optax.GradientTransformation, grads: PyTree,
                     opt_state: PyTree, trainable: PyTree, loss: Any, *,
                     skip_nonfinite: bool = True) -> tuple[PyTree, PyTree, jax.Array]:
    """Applies ``optimizer`` unless ``loss`` or ``grads`` holds a NaN or an infinity.

    The update runs under one ``lax.cond``: on a non-finite loss or gradient
    ``trainable`` and ``opt_state`` come back exactly as given (the optimizer
    does not run, so no count, moment or projector moves). This is the skip
    ``trainer``'s step uses; call it from a hand-written step. Unlike
    ``optax.apply_if_finite``, which runs inside the optimizer and keeps its
    own counters, a skipped step leaves the state untouched.

    Args:
      optimizer: any optax transformation over ``trainable``.
      grads: the gradient tree (``trainable``'s structure).
      opt_state: the optimizer state.
      trainable: the differentiated tree.
      loss: the loss (checked with the gradients).
      skip_nonfinite: False applies every update (a NaN then reaches the
        state).

    Returns:
      ``(trainable, opt_state, skipped)``; ``skipped`` is a ``()`` int32, 1
      when the update was skipped.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from peftjax import train
      >>> opt = optax.sgd(1.0)
      >>> t = {"w": jnp.ones(2)}
      >>> t2, _, skipped = train.update_if_finite(
      ...     opt, {"w": jnp.array([jnp.nan, 0.0])}, opt.init(t), t, jnp.float32(0.0))
      >>> t2["w"].tolist(), int(skipped)
      ([1.0, 1.0], 1)
    """

    def take(args):
        g, s, t = args
        with jax.numpy_dtype_promotion("standard"):
            updates, s = optimizer.update(g, s, t)
            return optax.apply_updates(t, updates), s

    args = (grads, opt_state, trainable)
    if not skip_nonfinite:
        trainable, opt_state = take(args)
        return trainable, opt_state, jnp.zeros([], jnp.int32)
    out = jax.eval_shape(take, args)

    def keep(args):  # the state as given, in the dtypes an update returns
        _, s, t = args
        return jax.tree.map(
            lambda x, o: x if jnp.result_type(x) == o.dtype else x.astype(o.dtype),
            (t, s), out)

    ok = all_finite((loss, grads))
    trainable, opt_state = jax.lax.cond(ok, take, keep, args)
    return trainable, opt_state, jnp.logical_not(ok).astype(jnp.int32)


def hybrid_labels(*, adapters: str | Callable[[str], str] = "adapters",
                  full: str | Callable[[str], str] = "full") -> Callable[[PyTree], PyTree]:
    """Labels a hybrid trainable tree for ``optax.partition``.

    Args:
      adapters: the label of every adapter leaf, or ``path -> label`` (the
        adapted leaf's path).
      full: the label of the fully trained leaves, or ``path -> label``
        (e.g. GaLore for kernels, Adam for the rest).

    Returns:
      A function ``trainable -> label tree`` of a hybrid trainable tree
      (``{"adapters": ..., "full": ...}``), usable directly as
      ``optax.partition``'s labels.

    Raises:
      ValueError: (when called) the tree is not a hybrid trainable tree.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import train
      >>> labels = train.hybrid_labels(adapters="adam", full="sgd")
      >>> labels({"adapters": {}, "full": {"head": jnp.ones((3, 2))}})
      {'adapters': {}, 'full': {'head': 'sgd'}}
    """

    def pick(label, path):
        return label(path) if callable(label) else label

    def labels(trainable: PyTree) -> PyTree:
        if not isinstance(trainable, Mapping) or set(trainable) != {"adapters", "full"}:
            got = sorted(trainable) if isinstance(trainable, Mapping) else type(trainable)
            raise ValueError(
                "hybrid_labels: expected the hybrid trainable tree {'adapters': ..., "
                f"'full': ...}} (TrainState.trainable of a hybrid trainer), got keys {got}")
        return {
            "adapters": {p: jax.tree.map(lambda _, p=p: pick(adapters, p), v)
                         for p, v in trainable["adapters"].items()},
            "full": {p: jax.tree.map(lambda _, p=p: pick(full, p), v)
                     for p, v in trainable["full"].items()},
        }

    return labels


def _typed_key(key: Any) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"trainer.init: key must be a single PRNG key, got shape "
                             f"{key.shape}")
        return key
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise TypeError(f"trainer.init: key must be a jax.random.key (or a raw (2,) uint32 "
                        f"key), got shape {key.shape} dtype {key.dtype}")
    return jax.random.wrap_key_data(key)


def _own(state: PyTree, params: PyTree) -> PyTree:
    # A donated state must not share buffers with the caller's params (the
    # base tree is passed to every step and would be deleted by donation).
    ids = {id(x) for x in jax.tree.leaves(params)}
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if id(x) in ids else x, state)


def _validate(loss_fn, optimizer, assignment, full, sparse, factored, accumulate, tokens):
    if not callable(loss_fn):
        raise TypeError(f"trainer: loss_fn must be callable (params, batch) -> loss, got "
                        f"{type(loss_fn).__name__}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"trainer: optimizer must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}")
    if assignment is not None:
        if not isinstance(assignment, Mapping):
            raise TypeError(f"trainer: adapters must be a {{path: Adapter}} assignment "
                            f"(tree.assign), got {type(assignment).__name__}")
        for p, a in assignment.items():
            if not isinstance(a, adapters_lib.Adapter):
                raise TypeError(f"trainer: adapters[{p!r}] must be an adapters.Adapter, got "
                                f"{type(a).__name__}")
    if full is not None:
        if isinstance(full, tree.Rule) or not isinstance(full, Sequence):
            raise TypeError(f"trainer: full must be a list of tree.Rule (payload True), got "
                            f"{type(full).__name__}")
        for i, r in enumerate(full):
            if not isinstance(r, tree.Rule):
                raise TypeError(f"trainer: full[{i}] must be a tree.Rule, got "
                                f"{type(r).__name__}")
    if factored not in (None, True, False):
        raise TypeError(f"trainer: factored must be None, True or False, got {factored!r}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"trainer: accumulate must be a positive int, got {accumulate!r}")
    if tokens is not None and not callable(tokens):
        raise TypeError(f"trainer: tokens must be a function batch -> () count, got "
                        f"{type(tokens).__name__}")
    if sparse is not None:
        if assignment is None:
            raise ValueError("trainer: sparse= needs adapters= (an assignment of "
                             "adapters.sparse_delta)")
        if factored is True:
            raise ValueError("trainer: sparse= runs the materialize path (SpIEL needs the "
                             "dense gradient of W'); factored=True cannot apply")
        return _SPARSE
    if full is not None:
        return _HYBRID
    if assignment is not None:
        if not assignment:
            raise ValueError("trainer: adapters={} and no full= rules: nothing is trainable")
        return _ADAPTERS
    if factored is True:
        raise ValueError("trainer: factored=True needs adapters= (optimizer-only trains the "
                         "parameters themselves)")
    return _OPTIMIZER


def _count_tokens(tokens, batch, accumulate):
    if tokens is not None:
        if accumulate == 1:
            return jnp.asarray(tokens(batch))
        return sum(jnp.asarray(tokens(jax.tree.map(lambda x, i=i: x[i], batch)))
                   for i in range(accumulate))
    if isinstance(batch, Mapping) and "segment_ids" in batch:
        return jnp.sum(jnp.asarray(batch["segment_ids"]) != 0).astype(jnp.int32)
    return None


def trainer(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    adapters: Mapping[str, Any] | None = None,
    full: Sequence[Any] | None = None,
    sparse: Any = None,
    factored: bool | None = None,
    accumulate: int = 1,
    skip_nonfinite: bool = True,
    donate: bool = True,
    has_aux: bool = False,
    deterministic: bool = False,
    tokens: Callable[[Any], Any] | None = None,
) -> Trainer:
    """Builds the training step of one composition.

    The step computes ``loss_fn(params', batch)`` on the effective
    parameters ``params'``, differentiates it with respect to
    ``TrainState.trainable`` only and applies ``optimizer``:

    * adapter-only (``adapters=``): trainable ``{path: AdapterParams}``;
    * hybrid (``adapters=`` or ``{}``, ``full=``): trainable ``{"adapters":
      {...}, "full": {path: leaf}}``; the full leaves are spliced into the
      base tree (``tree.replace_leaves``) before the adapters apply; route
      with ``optax.partition(..., hybrid_labels(...))``;
    * optimizer-only (neither): trainable is the whole parameter tree; route
      frozen leaves to ``optax.set_to_zero()`` with ``tree.labels``;
    * sparse (``adapters=`` sparse deltas, ``sparse=``): SpIEL-AG; the
      supports in ``TrainState.frozen`` change on regrowth and
      ``opt_state = (optimizer state, SpIELState)``.

    Adapter-only and hybrid run ``loss_fn`` through ``factored.transform``
    by default (``factored=None``): no ``W + ΔW`` and no weight-sized
    cotangent; an adapter without a factored form is materialised with one
    ``factored.FactoredFallbackWarning`` naming its path. ``factored=False``
    materialises every adapter (the portable path; input dropout then needs
    ``deterministic=True``).

    Each call splits ``state.key``; the sub-key, folded with the micro-batch
    index, drives adapter dropout. With ``accumulate=k > 1`` every leaf of
    the batch has a leading axis of size ``k``: the step scans the
    micro-batches, averages their losses and gradients and applies one
    update (a non-finite micro-batch skips the whole update). With
    ``accumulate=1`` the batch is passed to ``loss_fn`` as is.

    Memory: no gradient or optimizer moment exists for frozen leaves; with
    ``donate`` the state's buffers are reused for the new state (no second
    copy of the state), so a donated state must not be used after the call.

    Args:
      loss_fn: ``(params, batch) -> ()`` loss (``(loss, aux)`` with
        ``has_aux``); the model sees an ordinary parameter tree.
      optimizer: any optax transformation over the trainable tree.
      adapters: ``{path: Adapter}`` from ``tree.assign``, or None.
      full: rules (``tree.Rule`` with payload ``True``; ``None`` excludes)
        for leaves trained in full next to the adapters (hybrid), or None.
      sparse: a ``masks.Selector`` (``masks.spiel_selector(...)``) or a
        ``SpIELConfig`` (other Adam betas for seeding regrown moments), or
        None.
      factored: None (factored where it applies), True or False (forced).
      accumulate: micro-batches per update (static).
      skip_nonfinite: skip updates with a non-finite loss or gradient.
      donate: jit the step with the state donated.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``metrics["aux"]`` holds
        ``aux`` (stacked over micro-batches when ``accumulate > 1``).
      deterministic: no adapter dropout.
      tokens: ``batch -> ()`` token count for ``metrics["tokens"]``; by
        default a mapping batch with ``segment_ids`` counts its non-zero ids.

    Returns:
      ``Trainer(init, step, params)``.

    Raises:
      TypeError / ValueError: a composition that cannot be built (e.g.
        ``sparse=`` without adapters, ``factored=True`` with ``sparse=``),
        naming the argument.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from peftjax import adapters, train, tree
      >>> params = {"w": jnp.eye(3)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> def loss_fn(p, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ p["w"] - y) ** 2)
      >>> t = train.trainer(loss_fn, optax.adam(0.1), adapters=a)
      >>> state = t.init(jax.random.key(0), params)
      >>> batch = (jnp.ones((2, 3)), jnp.zeros((2, 3)))
      >>> state, metrics = t.step(state, batch, params)
      >>> float(metrics["loss"]), int(state.step), int(metrics["skipped"])
      (1.0, 1, 0)
    """
    kind = _validate(loss_fn, optimizer, adapters, full, sparse, factored, accumulate, tokens)
    assignment = dict(adapters) if adapters is not None else {}
    use_factored = bool(assignment) and kind in (_ADAPTERS, _HYBRID) and factored is not False
    spiel = _sparse.config(sparse) if kind == _SPARSE else None
    hybrid = full is not None

    def split(trainable):  # (adapter part, full part)
        return (trainable["adapters"], trainable["full"]) if hybrid else (trainable, {})

    def join(trainable, adapter_part):
        return {"adapters": adapter_part, "full": trainable["full"]} if hybrid else adapter_part

    def effective(trainable, frozen, params, *, det=deterministic):
        if kind == _OPTIMIZER:
            return trainable
        ad, fl = split(trainable)
        base = tree.replace_leaves(params, fl) if fl else params
        if not assignment:
            return base
        return adapters_lib.materialize(assignment, base, ad, frozen, deterministic=det)

    def objective(trainable, frozen, params, batch, key):
        if not use_factored:
            return loss_fn(effective(trainable, frozen, params), batch)
        ad, fl = split(trainable)
        base = tree.replace_leaves(params, fl) if fl else params
        run = factored_lib.transform(loss_fn, assignment, ad, frozen, key=key,
                                     deterministic=deterministic)
        return run(base, batch)

    def init(key: jax.Array, params: PyTree, *,
             state: adapters_lib.AdapterState | None = None) -> _state.TrainState:
        key = _typed_key(key)
        if kind == _OPTIMIZER:
            if state is not None:
                raise ValueError("trainer.init: state= (an adapters.AdapterState) needs "
                                 "adapters=; optimizer-only trains params itself")
            trainable, frozen = params, {}
        else:
            st = (adapters_lib.init(assignment, key, params) if state is None
                  else _given_state(state))
            trainable, frozen = dict(st.trainable), dict(st.frozen)
            if hybrid:
                trainable = {"adapters": trainable, "full": _full_leaves(params, trainable)}
        with jax.numpy_dtype_promotion("standard"):
            opt_state = optimizer.init(trainable)
        if kind == _SPARSE:
            opt_state = (opt_state, _sparse.init(split(trainable)[0], frozen))
        # opt_state too: an optimizer may keep a leaf it was given (e.g. a copy-free
        # projector start), which donation would then delete from the caller's params.
        trainable, frozen, opt_state = _own((trainable, frozen, opt_state), params)
        return _state.TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state,
                                 step=jnp.zeros([], jnp.int32),
                                 key=jax.random.split(key)[1])

    def _given_state(state):
        if not isinstance(state, adapters_lib.AdapterState):
            raise TypeError(f"trainer.init: state must be an adapters.AdapterState (e.g. "
                            f"inits.run(...).state), got {type(state).__name__}")
        for part in ("trainable", "frozen"):
            got = set(getattr(state, part))
            if got != set(assignment):
                missing = sorted(set(assignment) - got)[:10]
                extra = sorted(got - set(assignment))[:10]
                raise ValueError(f"trainer.init: state.{part} must hold one entry per "
                                 f"adapted path; missing {missing}, not adapted {extra}")
        return state

    def _full_leaves(params, adapted):
        chosen = tree.assign(params, list(full))
        bad = {p: v for p, v in chosen.items() if v is not True and v is not False}
        if bad:
            p = next(iter(bad))
            raise ValueError(f"trainer: full= rules take payload True (or None to exclude); "
                             f"{p!r} got {bad[p]!r}")
        leaves = {p: x for p, x in tree.flatten(params) if chosen.get(p) is True}
        both = sorted(set(leaves) & set(adapted))
        if both:
            raise ValueError(f"trainer: {both[:10]} are adapted and also trained in full "
                             "(full=); pick one")
        return leaves

    def check(state, batch, params, fn):
        if not isinstance(state, _state.TrainState):
            raise TypeError(f"{fn}: state must be a train.TrainState (from init), got "
                            f"{type(state).__name__}")
        if kind == _OPTIMIZER and params is not None:
            raise ValueError(f"{fn}: optimizer-only trains the whole tree "
                             "(state.trainable); pass params=None")
        if kind != _OPTIMIZER and params is None:
            raise ValueError(f"{fn}: the {kind} composition needs params= (the frozen "
                             "base tree the adapters apply to)")
        if batch is None or accumulate == 1:
            return
        for p, x in tree.flatten(batch):
            shape = np.shape(x)
            if not shape or shape[0] != accumulate:
                raise ValueError(
                    f"{fn}: accumulate={accumulate} needs every batch leaf to carry a "
                    f"leading micro-batch axis of size {accumulate}; batch leaf {p!r} has "
                    f"shape {shape} dtype {jnp.result_type(x)}")

    def grads_of(trainable, frozen, params, batch, key):
        def one(i, mb):
            v, g = jax.value_and_grad(objective, has_aux=has_aux)(
                trainable, frozen, params, mb, jax.random.fold_in(key, i))
            return (v[0], v[1], g) if has_aux else (v, None, g)

        if accumulate == 1:
            return one(0, batch)

        def body(acc, xs):
            loss_i, aux_i, g = one(*xs)
            return jax.tree.map(jnp.add, acc, (loss_i, g)), aux_i

        mb0 = jax.tree.map(lambda x: x[0], batch)
        out = jax.eval_shape(one, 0, mb0)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (out[0], out[2]))
        (loss, grads), aux = jax.lax.scan(body, zeros, (jnp.arange(accumulate), batch))
        return loss / accumulate, aux, jax.tree.map(lambda g: g / accumulate, grads)

    def step(state: _state.TrainState, batch: Any, params: PyTree = None):
        check(state, batch, params, "trainer.step")
        key, sub = jax.random.split(state.key)
        if kind == _SPARSE:
            update = _sparse.make_update(
                spiel, optimizer, effective, loss_fn, get_adapters=lambda t: split(t)[0],
                set_adapters=join, accumulate=accumulate, has_aux=has_aux,
                skip_nonfinite=skip_nonfinite)
            trainable, frozen, opt_state, loss, aux, grads, skipped = update(
                state.trainable, state.frozen, state.opt_state, params, batch)
        else:
            loss, aux, grads = grads_of(state.trainable, state.frozen, params, batch, sub)
            trainable, opt_state, skipped = update_if_finite(
                optimizer, grads, state.opt_state, state.trainable, loss,
                skip_nonfinite=skip_nonfinite)
            frozen = state.frozen
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped": skipped}
        count = _count_tokens(tokens, batch, accumulate)
        if count is not None:
            metrics["tokens"] = count
        if has_aux:
            metrics["aux"] = aux
        new = _state.TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state,
                                step=state.step + 1, key=key)
        return new, metrics

    def params_of(state: _state.TrainState, params: PyTree = None) -> PyTree:
        check(state, None, params, "trainer.params")
        return effective(state.trainable, state.frozen, params, det=True)

    jitted = jax.jit(step, donate_argnums=0) if donate else jax.jit(step)
    return Trainer(init=init, step=jitted, params=params_of)
