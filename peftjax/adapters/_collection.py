# SPDX-License-Identifier: Apache-2.0
"""Several named adapters on one base: add, switch, disable, delete, combine.

An ``AdapterCollection`` holds named adapters (each an assignment plus its
state) trained on the same base parameters, and which one is active. Every
function here is pure: it returns a new collection and never mutates its
input. The collection is host-side bookkeeping; what goes into a model is
``active(collection)``, a ``NamedAdapter(assignment, trainable, frozen)``
that unpacks into ``materialize(assignment, params, trainable, frozen)`` or
``peftjax.factored.transform(apply_fn, *named)``.

* ``disable`` makes the base model active: ``active`` then returns an empty
  assignment, and ``materialize`` passes every leaf through by identity, so
  the result *is* the base (the "adapters off" reference model of preference
  tuning), bit for bit.
* ``add_weighted`` combines LoRA-family adapters with the adapter arithmetic
  of ``peftjax.merge.adapters`` (``concatenate`` is exact, ``svd_refactor``
  truncates, ``linear`` is PEFT's approximation), passed in as ``combine``:
  the method layers do not import each other (docs/architecture.md#layers).
* ``peftjax.adapters.batched`` runs several of them in one batch, one adapter
  per example.

Exports: ``NamedAdapter``, ``AdapterCollection``, ``collection``, ``add``,
``switch``, ``disable``, ``delete``, ``active``, ``add_weighted``.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from peftjax.adapters import _lora, _protocol, _shared


class NamedAdapter(NamedTuple):
    """One adapter of a collection: its assignment and its state.

    The field order matches ``peftjax.factored.transform(apply_fn, assignment,
    trainable, frozen)``, so ``factored(apply_fn, *named)`` works.

    Attributes:
      assignment: ``{path: Adapter}``.
      trainable: ``{path: NamedTuple of arrays}`` (``AdapterState.trainable``).
      frozen: ``{path: NamedTuple of arrays or None}``.

    Example:
      >>> NamedAdapter({}, {}, {}).assignment
      {}
    """

    assignment: dict[str, _protocol.Adapter]
    trainable: dict[str, Any]
    frozen: dict[str, Any]


class AdapterCollection(NamedTuple):
    """Named adapters on one base and the active one (treat as immutable).

    Attributes:
      adapters: ``{name: NamedAdapter}`` in insertion order.
      active: the active adapter's name, or None for the base model.

    Example:
      >>> collection().active is None
      True
    """

    adapters: dict[str, NamedAdapter]
    active: str | None


def collection() -> AdapterCollection:
    """Returns an empty collection with the base model active.

    Returns:
      ``AdapterCollection(adapters={}, active=None)``.

    Example:
      >>> len(collection().adapters)
      0
    """
    return AdapterCollection(adapters={}, active=None)


def _check_collection(coll: Any, fn: str) -> None:
    if not isinstance(coll, AdapterCollection):
        raise TypeError(f"{fn}: expected an AdapterCollection (from "
                        f"peftjax.adapters.collection()), got {type(coll).__name__}")


def _check_name(coll: AdapterCollection, name: Any, fn: str, *, exists: bool) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{fn}: an adapter name must be a non-empty str, got {name!r}")
    if exists and name not in coll.adapters:
        raise ValueError(f"{fn}: no adapter named {name!r}; the collection has "
                         f"{list(coll.adapters)}")
    if not exists and name in coll.adapters:
        raise ValueError(f"{fn}: an adapter named {name!r} already exists; delete it "
                         "first or pick another name")


def _named(assignment: Any, state: Any, fn: str) -> NamedAdapter:
    if not isinstance(assignment, dict):
        raise TypeError(f"{fn}: assignment must be a dict {{path: Adapter}} from "
                        f"peftjax.tree.assign, got {type(assignment).__name__}")
    for path, adapter in assignment.items():
        if not isinstance(adapter, _protocol.Adapter):
            raise TypeError(f"{fn}: the payload for {path!r} is "
                            f"{type(adapter).__name__} ({adapter!r}), not an Adapter")
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(f"{fn}: state must be an AdapterState(trainable, frozen), got "
                        f"{type(state).__name__}")
    trainable, frozen = state
    for part_name, part in (("trainable", trainable), ("frozen", frozen)):
        # arrays shared by the adapter's leaves live beside them (_shared.SHARED)
        if not isinstance(part, dict) or set(part) - {_shared.SHARED} != set(assignment):
            have = sorted(part)[:6] if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"{fn}: state.{part_name} must be keyed by the assignment's paths "
                f"{sorted(assignment)[:6]}, got {have}")
    return NamedAdapter(dict(assignment), dict(trainable), dict(frozen))


def add(coll: AdapterCollection, name: str, assignment: dict[str, _protocol.Adapter],
        state: _protocol.AdapterState, *, activate: bool = False) -> AdapterCollection:
    """Adds a named adapter (PEFT's ``add_adapter``).

    Args:
      coll: the collection.
      name: a new, non-empty name.
      assignment: ``{path: Adapter}`` for the shared base.
      state: its ``AdapterState`` (from ``init``, training or ``load_peft``).
      activate: also make it the active adapter (default: keep the active one).

    Returns:
      A new collection; ``coll`` is unchanged.

    Raises:
      ValueError: a name already taken, or a state keyed by other paths.
      TypeError: a payload that is not an ``Adapter``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> c = add(collection(), "fr", a, adapters.init(a, jax.random.key(0), params),
      ...         activate=True)
      >>> c.active, list(c.adapters)
      ('fr', ['fr'])
    """
    _check_collection(coll, "add")
    _check_name(coll, name, "add", exists=False)
    entry = _named(assignment, state, "add")
    return AdapterCollection({**coll.adapters, name: entry},
                             name if activate else coll.active)


def switch(coll: AdapterCollection, name: str) -> AdapterCollection:
    """Makes ``name`` the active adapter (PEFT's ``set_adapter``).

    Args:
      coll: the collection.
      name: an existing adapter's name.

    Returns:
      A new collection with ``active == name``.

    Raises:
      ValueError: an unknown name (the message lists the known ones).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> c = add(collection(), "fr", a, adapters.init(a, jax.random.key(0), params))
      >>> switch(c, "fr").active
      'fr'
    """
    _check_collection(coll, "switch")
    _check_name(coll, name, "switch", exists=True)
    return AdapterCollection(dict(coll.adapters), name)


def disable(coll: AdapterCollection) -> AdapterCollection:
    """Makes the base model active: ``active`` returns an empty adapter.

    ``materialize`` with the empty assignment returns every base leaf by
    identity, and ``peftjax.factored.transform`` re-emits the model unchanged: the
    exact base model (the reference model of DPO-style preference tuning).

    Args:
      coll: the collection (its adapters are kept).

    Returns:
      A new collection with ``active is None``.

    Example:
      >>> disable(collection()).active is None
      True
    """
    _check_collection(coll, "disable")
    return AdapterCollection(dict(coll.adapters), None)


def delete(coll: AdapterCollection, name: str) -> AdapterCollection:
    """Removes an adapter; deleting the active one makes the base active.

    Args:
      coll: the collection.
      name: an existing adapter's name.

    Returns:
      A new collection without ``name``.

    Raises:
      ValueError: an unknown name.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> c = add(collection(), "fr", a, adapters.init(a, jax.random.key(0), params),
      ...         activate=True)
      >>> c = delete(c, "fr")
      >>> list(c.adapters), c.active
      ([], None)
    """
    _check_collection(coll, "delete")
    _check_name(coll, name, "delete", exists=True)
    rest = {k: v for k, v in coll.adapters.items() if k != name}
    return AdapterCollection(rest, None if coll.active == name else coll.active)


def active(coll: AdapterCollection) -> NamedAdapter:
    """Returns the active adapter, or an empty one when the base is active.

    Args:
      coll: the collection.

    Returns:
      ``NamedAdapter(assignment, trainable, frozen)``; all three are empty
      dicts when adapters are disabled, so
      ``materialize(named.assignment, params, named.trainable, named.frozen)``
      is exactly ``params``.

    Example:
      >>> active(collection())
      NamedAdapter(assignment={}, trainable={}, frozen={})
    """
    _check_collection(coll, "active")
    if coll.active is None:
        return NamedAdapter({}, {}, {})
    return coll.adapters[coll.active]


def _scaling(path: str, name: str, adapter: _protocol.Adapter, t: Any, f: Any) -> float:
    """The scaling ``s`` of a LoRA-family adapter, read off its own weight form."""
    if f is not None or not (isinstance(t, tuple) and getattr(t, "_fields", None)
                             == ("a", "b")):
        raise TypeError(
            f"add_weighted: adapter {name!r} at {path!r} is {adapter!r} with state "
            f"{type(t).__name__}; weighted combination needs LoRA-family states "
            "(trainable (a, b), nothing frozen)")
    if adapter.factored is None:
        raise TypeError(f"add_weighted: adapter {name!r} at {path!r} ({adapter!r}) "
                        "has no per-matrix form to read its scaling from")
    n_in, r, n_out = t.a.shape[-2], t.a.shape[-1], t.b.shape[-1]
    # A one-entry probe: apply(0, e_00, e_00)[0, 0] is s·1, every other entry 0.
    a = np.zeros((n_in, r), np.float32)
    b = np.zeros((r, n_out), np.float32)
    a[0, 0] = b[0, 0] = 1.0
    w = jnp.zeros((n_in, n_out), jnp.float32)
    out = np.array(adapter.factored.apply(w, type(t)(a=jnp.asarray(a),
                                                       b=jnp.asarray(b)), None))
    s = float(out[0, 0])
    out[0, 0] = 0.0
    if np.any(out != 0.0):
        raise TypeError(f"add_weighted: adapter {name!r} at {path!r} ({adapter!r}) "
                        "is not an additive s·A@B adapter")
    return s


def add_weighted(
    coll: AdapterCollection,
    name: str,
    weights: Mapping[str, Any],
    *,
    combine: Callable[..., dict[str, Any]],
    activate: bool = False,
) -> AdapterCollection:
    """Adds ``Σ_i w_i · adapter_i`` as a new LoRA adapter (PEFT: add_weighted_adapter).

    Each source's scaling ``s_i`` is read off its own adapter, the sources'
    trainable states go through ``combine`` (a function of
    ``peftjax.merge.adapters``: ``concatenate`` gives the exact
    ``ΔW = Σ w_i s_i A_i B_i`` at rank ``Σ r_i``; ``functools.partial(
    svd_refactor, rank=r)`` its rank-``r`` truncation; ``linear`` PEFT's
    approximate ``"linear"`` for equal ranks), and the result is added as a
    ``lora(rank, scaling=Scaling.NONE)`` adapter on the same paths and matrix
    views.

    Args:
      coll: the collection.
      name: the new adapter's name.
      weights: ``{source name: w_i}``; every source must be a LoRA-family
        adapter (``LoRAParams``-like state, nothing frozen) on the same paths.
      combine: ``(trainables, *, scalings, weights) -> {path: LoRAParams}``.
      activate: make the combination the active adapter.

    Returns:
      A new collection with the combination added.

    Raises:
      ValueError: unknown or no sources, different target paths or matrix
        views, or a combined rank above ``min(in, out)`` of a target
        (``concatenate`` of many adapters: use ``svd_refactor``).
      TypeError: a source that is not an additive LoRA-family adapter.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, merge, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> c = adapters.collection()
      >>> for n, k in (("x", 0), ("y", 1)):
      ...     c = adapters.add(c, n, a, adapters.init(a, jax.random.key(k), params))
      >>> c = adapters.add_weighted(c, "xy", {"x": 0.5, "y": 0.5},
      ...                           combine=merge.adapters.concatenate)
      >>> c.adapters["xy"].trainable["w"].a.shape
      (4, 2)
    """
    _check_collection(coll, "add_weighted")
    _check_name(coll, name, "add_weighted", exists=False)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"add_weighted: weights must be a non-empty "
                         f"{{name: weight}} mapping, got {weights!r}")
    for src in weights:
        _check_name(coll, src, "add_weighted", exists=True)
    if not callable(combine):
        raise TypeError(f"add_weighted: combine must be a function of "
                        f"peftjax.merge.adapters, got {combine!r}")
    sources = [coll.adapters[s] for s in weights]
    paths = list(sources[0].assignment)
    for src, entry in zip(weights, sources, strict=True):
        if set(entry.assignment) != set(paths):
            raise ValueError(
                f"add_weighted: {src!r} targets {sorted(entry.assignment)[:6]}, "
                f"{next(iter(weights))!r} targets {sorted(paths)[:6]}; combine "
                "adapters on the same paths")
    scalings = []
    for src, entry in zip(weights, sources, strict=True):
        per_path = {p: _scaling(p, src, entry.assignment[p], entry.trainable[p],
                                entry.frozen[p]) for p in paths}
        values = set(per_path.values())
        if len(values) != 1:
            raise ValueError(
                f"add_weighted: {src!r} has different scalings per path {per_path}; "
                "combine per-path groups separately")
        scalings.append(values.pop())
    dims = {}
    for p in paths:
        dns = {(e.assignment[p].factored.dimension_numbers) for e in sources}
        if len(dns) != 1:
            raise ValueError(f"add_weighted: the sources view {p!r} through "
                             f"different dimension numbers {dns}")
        dims[p] = dns.pop()
    trainables = [{p: e.trainable[p] for p in paths} for e in sources]
    combined = combine(trainables, scalings=scalings,
                       weights=[weights[s] for s in weights])
    if not isinstance(combined, dict) or set(combined) != set(paths):
        raise ValueError(f"add_weighted: combine returned "
                         f"{type(combined).__name__} without the paths {paths[:6]}")
    made: dict[tuple, _protocol.Adapter] = {}
    assignment = {}
    for p in paths:
        t = combined[p]
        rank, n_in, n_out = t.a.shape[-1], t.a.shape[-2], t.b.shape[-1]
        if rank > min(n_in, n_out):
            raise ValueError(
                f"add_weighted: the combination at {p!r} has rank {rank} > "
                f"min(in, out) = {min(n_in, n_out)} (a {t.a.shape} @ b {t.b.shape}); "
                "use functools.partial(merge.adapters.svd_refactor, rank=...)")
        key = (rank, dims[p], jnp.dtype(t.a.dtype))
        if key not in made:
            made[key] = _lora.lora(rank, scaling=_lora.Scaling.NONE,
                                   dimension_numbers=dims[p], param_dtype=t.a.dtype)
        assignment[p] = made[key]
    state = _protocol.AdapterState(trainable={p: combined[p] for p in paths},
                               frozen={p: None for p in paths})
    return add(coll, name, assignment, state, activate=activate)
