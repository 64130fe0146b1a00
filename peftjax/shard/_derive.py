# SPDX-License-Identifier: Apache-2.0
"""Shardings of adapter and optimizer state, derived from their base leaf.

Adapter factors, DoRA magnitudes, LoRA-XS/LoRA-SB cores, sparse-delta values
and indices, Adam moments, GaLore/FRUGAL projectors and low-rank moments and
SpIEL accumulators are not placed by rules of their own: each leaf takes the
mesh axes of the base leaf it belongs to. Which base leaf, and in which way,
an optimizer state's field says through the ``peftjax.tree.StateRole`` its
type declares (``state_shardings``); this module knows no optimizer type.

The rule, per derived leaf (its shape compared with the base's matrix view
``(batch..., in, out)`` from ``peftjax.tree.DimensionNumbers``):

1. an axis that is one of the base's axes keeps its mesh axes: the leading
   batch axes (stacked layers; flattened slice axes ``S`` of GaLore bases
   take the first batch axis's), an ``in``-sized axis in the input position
   (LoRA ``a (in, r)``, a GaLore basis ``(S, in, r)``, a ``left`` moment
   ``(in, r)``) and an ``out``-sized axis in the output position (LoRA
   ``b (r, out)``, DoRA's magnitude ``(out,)``, a ``right`` moment
   ``(r, out)``); a leaf of the base's own shape (Adam moments) takes the
   base's spec;
2. mesh axes of base axes that the leaf does not have (the axis projected to
   rank ``r``, a sparse leaf's matrix axes) move to another axis of the leaf
   that they divide, full-size axes first, then rank/``k`` axes, then batch
   axes, so parameters' memory split carries over (FSDP over ``in`` with a
   ``(r, out)`` moment gives ``(None, "fsdp")``);
3. a mesh axis no axis can take is dropped with a ``ShardingFallbackWarning``
   naming the leaf: nothing is replicated silently where its base is sharded.

Exports: ``ShardingFallbackWarning``, ``adapter_shardings``,
``state_shardings``.
"""

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.shard import _specs

_IN, _OUT, _FREE, _FLAT = "in", "out", "free", "flat"
_SPARSE_FIELDS = ("values", "indices")


class ShardingFallbackWarning(UserWarning):
    """A derived leaf could not be split over a mesh axis that splits its base."""


class _View(NamedTuple):
    """A base leaf's shape, mesh axes per axis and matrix view."""

    shape: tuple[int, ...]
    spec: PartitionSpec
    resolved: Any  # tree.ResolvedDims | None
    batch: tuple[tuple[str, ...], ...]
    inp: tuple[str, ...]
    out: tuple[str, ...]
    axes: tuple[str, ...]


def _view(shape: tuple[int, ...], spec: PartitionSpec, dims: Any, path: str) -> _View:
    entries = tuple(_specs.axes_of(e) for e in tuple(spec))
    entries = entries + ((),) * (len(shape) - len(entries))
    every = tuple(a for e in entries for a in e)
    resolved = None
    if len(shape) >= 2:
        try:
            resolved = tree.resolve(dims, shape, path=path)
        except ValueError:
            resolved = None
    if resolved is None:
        return _View(shape, spec, None, (), (), (), every)
    return _View(
        shape,
        spec,
        resolved,
        batch=tuple(entries[a] for a in resolved.batch),
        inp=entries[resolved.reduction[0]],
        out=entries[resolved.output[0]],
        axes=every,
    )


def _roles(view: _View, shape: tuple[int, ...], name: str | None) -> list[Any]:
    """The role of each axis of a derived leaf relative to its base."""
    r = view.resolved
    if r is None:
        return [(_FREE,)] * len(shape)
    nb = len(r.batch)
    if nb and tuple(shape[:nb]) == r.batch_shape:
        lead, rest = [("batch", j) for j in range(nb)], tuple(shape[nb:])
    else:
        lead, rest = [], tuple(shape)
    n_in, n_out = r.n_in, r.n_out
    if name in _SPARSE_FIELDS:
        tail = [(_FREE,)] * len(rest)
    elif len(rest) == 2:
        if rest == (n_in, n_out):
            tail = [(_IN,), (_OUT,)]
        elif rest[0] == n_in:
            tail = [(_IN,), (_FREE,)]
        elif rest[1] == n_out:
            tail = [(_FREE,), (_OUT,)]
        else:
            tail = [(_FREE,), (_FREE,)]
    elif len(rest) == 1:
        tail = (
            [(_OUT,)]
            if rest[0] == n_out
            else [(_IN,)]
            if rest[0] == n_in
            else [(_FREE,)]
        )
    else:
        tail = [(_FREE,)] * len(rest)
    return lead + tail


_PREFERENCE = {_IN: 0, _OUT: 0, _FREE: 1, "batch": 2, _FLAT: 2}


def _place(
    view: _View,
    roles: list[Any],
    shape: tuple[int, ...],
    sizes: Mapping[str, int],
    what: str,
) -> PartitionSpec:
    """Assigns the base's mesh axes to the derived leaf's axes (module rule)."""
    assign: list[list[str]] = []
    for role, dim in zip(roles, shape, strict=True):
        kind = role[0]
        if kind == "batch":
            axes = view.batch[role[1]]
        elif kind == _FLAT:
            axes = view.batch[0] if view.batch and not any(view.batch[1:]) else ()
        elif kind == _IN:
            axes = view.inp
        elif kind == _OUT:
            axes = view.out
        else:
            axes = ()
        if dim % math.prod(sizes[a] for a in axes):
            axes = ()
        assign.append(list(axes))
    placed = {a for x in assign for a in x}
    order = sorted(range(len(shape)), key=lambda i: (_PREFERENCE[roles[i][0]], i))
    lost = []
    for a in view.axes:
        if a in placed:
            continue
        for i in order:
            if shape[i] % (math.prod(sizes[b] for b in assign[i]) * sizes[a]) == 0:
                assign[i].append(a)
                placed.add(a)
                break
        else:
            lost.append(a)
    lost = [a for a in lost if sizes[a] > 1]
    if lost:
        warnings.warn(
            f"{what}: shape {tuple(shape)} cannot be split over mesh axes {lost} "
            f"that split its base (shape {view.shape}, spec {view.spec}); it is "
            "replicated over them",
            ShardingFallbackWarning,
            stacklevel=4,
        )
    return PartitionSpec(*[_specs.entry_of(tuple(x)) for x in assign])


def _derive(
    view: _View,
    leaf: Any,
    name: str | None,
    sizes: Mapping[str, int],
    what: str,
    roles: list[Any] | None = None,
) -> PartitionSpec:
    shape = tuple(np.shape(leaf))
    if roles is None:
        if shape == view.shape:
            return view.spec
        roles = _roles(view, shape, name)
    return _place(view, roles, shape, sizes, what)


def _spec_tree(shardings: Any) -> dict[str, PartitionSpec]:
    flat = tree.flatten(
        shardings, is_leaf=lambda x: isinstance(x, (NamedSharding, PartitionSpec))
    )
    return {p: _specs.spec_of(s) for p, s in flat}


def _named(mesh: Any, spec: PartitionSpec, leaf: Any, what: str) -> NamedSharding:
    _specs.check_spec(mesh, spec, tuple(np.shape(leaf)), what)
    return NamedSharding(mesh, spec)


def _last_name(keypath: tuple[Any, ...]) -> str | None:
    if not keypath:
        return None
    last = keypath[-1]
    return getattr(last, "name", None) or str(getattr(last, "key", last))


def adapter_shardings(
    mesh: Any,
    assignment: dict[str, _adapters.Adapter],
    params: Any,
    shardings: Any,
    state: _adapters.AdapterState,
) -> _adapters.AdapterState:
    """Returns shardings of an adapter state, derived from the base's.

    LoRA ``a (in, r)`` follows the base's input axis and ``b (r, out)`` its
    output axis; DoRA's ``magnitude (out,)`` the output axis; LoRA-XS /
    LoRA-SB's frozen ``a``/``b`` likewise and the ``core (r, r)`` takes the
    base's mesh axes where ``r`` divides; sparse ``values``/``indices``
    ``(batch..., k)`` put the base's matrix mesh axes on ``k``. Stacked
    kernels keep their batch axes' mesh axes. The mesh axes of a projected
    axis move to another axis (see the module docstring); one that fits
    nowhere is dropped with a ``ShardingFallbackWarning``.

    Args:
      mesh: the mesh.
      assignment: ``{path: Adapter}`` the state was initialised with (its
        dimension numbers give the matrix view).
      params: the base tree (arrays or ``ShapeDtypeStruct``).
      shardings: the base's shardings (``param_shardings``), or specs.
      state: the ``AdapterState`` (or ``jax.eval_shape`` of it).

    Returns:
      An ``AdapterState`` of ``NamedSharding`` trees (``None`` where ``frozen``
      is None).

    Raises:
      ValueError: the assignment, params, shardings and state disagree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
      >>> from peftjax import adapters, tree
      >>> mesh = AbstractMesh((2, 4), ("fsdp", "tensor"),
      ...                     axis_types=(AxisType.Auto,) * 2)
      >>> params = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> state = jax.eval_shape(lambda: adapters.init(a, jax.random.key(0), params))
      >>> sh = adapter_shardings(mesh, a, params, {"w": P(None, "tensor")}, state)
      >>> sh.trainable["w"].a.spec, sh.trainable["w"].b.spec
      (P('tensor', None), P(None, 'tensor'))
      >>> sh = adapter_shardings(mesh, a, params, {"w": P("fsdp", None)}, state)
      >>> sh.trainable["w"].a.spec, sh.trainable["w"].b.spec  # fsdp moves to out
      (P('fsdp', None), P(None, 'fsdp'))
    """
    flat = tree.leaves_by_path(params)
    specs = _spec_tree(shardings)
    if set(specs) != set(flat):
        raise ValueError(
            "adapter_shardings: shardings do not cover params' paths: missing "
            f"{sorted(set(flat) - set(specs))[:5]}, "
            f"extra {sorted(set(specs) - set(flat))[:5]}"
        )
    sizes = dict(mesh.shape)
    out_t: dict[str, Any] = {}
    out_f: dict[str, Any] = {}
    for path, adapter in assignment.items():
        if path not in flat or path not in state.trainable:
            raise ValueError(
                f"adapter_shardings: {path!r} is assigned but missing from params or "
                "from the state"
            )
        dims = adapter.dimension_numbers  # bound for stacked leaves, factored or not
        view = _view(tuple(np.shape(flat[path])), specs[path], dims, path)

        def one(kp, leaf, path=path, view=view, part="trainable"):
            name = _last_name(kp)
            what = f"{part} {path!r} field {name!r}"
            return _named(mesh, _derive(view, leaf, name, sizes, what), leaf, what)

        out_t[path] = jax.tree.map_with_path(one, state.trainable[path])
        fr = state.frozen.get(path)
        out_f[path] = (
            None
            if fr is None
            else jax.tree.map_with_path(
                lambda kp, x, one=one: one(kp, x, part="frozen"), fr
            )
        )
    # arrays shared by many leaves (``adapters.Shared``): small, replicated
    for src, out in ((state.trainable, out_t), (state.frozen, out_f)):
        if _adapters.SHARED in src:
            out[_adapters.SHARED] = jax.tree.map(
                lambda x: NamedSharding(mesh, PartitionSpec()), src[_adapters.SHARED])
    return _adapters.AdapterState(trainable=out_t, frozen=out_f)


def _owner(path: str, known: dict[str, Any]) -> str | None:
    """The longest known path that ``path`` ends with (at a ``/`` boundary)."""
    parts = path.split("/")
    for i in range(len(parts)):
        cand = "/".join(parts[i:])
        if cand in known:
            return cand
    return None


def _prefix_owner(path: str, known: dict[str, Any]) -> tuple[str | None, str]:
    """The longest known path that ``path`` starts with, and the remainder."""
    parts = path.split("/")
    for i in range(len(parts), 0, -1):
        cand = "/".join(parts[:i])
        if cand in known:
            return cand, "/".join(parts[i:])
    return None, path


def state_shardings(
    mesh: Any,
    state: Any,
    params: Any,
    shardings: Any,
    *,
    dimension_numbers: Mapping[str, tree.DimensionNumbers] | tree.Layout | None = None,
) -> Any:
    """Returns shardings of an optimizer (or SpIEL) state, derived from params'.

    ``params`` is the tree the optimizer was initialised on: the base
    parameters (GaLore, FRUGAL, full fine-tuning) or ``AdapterState.trainable``
    (LoRA, LoRA-SB, sparse deltas). A state type places its fields by the
    roles it declares (``peftjax.tree.StateRole`` in a ``state_roles`` class
    attribute, read with ``peftjax.tree.state_roles``); nothing here knows
    the optimizer's types:

    * ``LIKE_PARAMS`` (and every leaf of an undeclared state, e.g.
      ``optax.ScaleByAdamState``): the leaf is matched to the parameter
      whose path its own path ends with (``mu/<path>``,
      ``inner_states/galore/inner_state/0/nu/<path>``); a leaf of the
      parameter's shape takes its spec, a low-rank moment
      ``(batch..., r, out)`` / ``(batch..., in, r)`` follows the surviving
      axis; a leaf matching no parameter is replicated;
    * ``PROJECTOR``: bases ``(S, in|out, r)`` under the parameter's path
      follow the surviving axis, ``S`` the first batch axis;
    * ``SPARSE_SLOTS``: ``{path: (batch..., k)}`` takes the spec of
      ``<path>/values`` in ``params`` (same shape), else is replicated;
    * ``REPLICATED``: counters, keys and hyperparameters.

    A declared state nested inside another's field is placed by its own
    declaration.

    Args:
      mesh: the mesh.
      state: the state (arrays or ``jax.eval_shape(opt.init, params)``).
      params: the tree the optimizer (or SpIEL) was given.
      shardings: the shardings (or specs) of ``params``.
      dimension_numbers: ``{path: DimensionNumbers}`` for parameters that
        the optimizer views with other dimension numbers than the tree's
        layout (2-D ``(in, out)``, stacked ``layers/...``), or the
        ``peftjax.tree.Layout`` given to the optimizer.

    Returns:
      A tree with ``state``'s structure of ``NamedSharding``.

    Raises:
      ValueError: ``shardings`` does not cover ``params``' paths, or a
        ``state_roles`` declaration misses or invents a field.
      TypeError: a ``state_roles`` declaration holds something other than a
        ``StateRole``, or its type's fields are not attributes.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
      >>> mesh = AbstractMesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
      >>> params = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
      >>> st = jax.eval_shape(optax.adam(1e-3).init, params)
      >>> state_shardings(mesh, st, params, {"w": P("fsdp")})[0].mu["w"].spec
      P('fsdp',)
    """
    flat = tree.leaves_by_path(params)
    specs = _spec_tree(shardings)
    if set(specs) != set(flat):
        raise ValueError(
            "state_shardings: shardings do not cover params' paths: missing "
            f"{sorted(set(flat) - set(specs))[:5]}, "
            f"extra {sorted(set(specs) - set(flat))[:5]}"
        )
    declared = dimension_numbers if isinstance(dimension_numbers, tree.Layout) else None
    dims_of = {} if declared is not None else dict(dimension_numbers or {})
    sizes = dict(mesh.shape)
    views: dict[str, _View] = {}
    rep = PartitionSpec()
    layout = tree.bind(declared, list(flat.items()))

    def default_dims(p: str) -> Any:
        # The view GaLore/FRUGAL take by default (the tree's layout); a leaf
        # without one keeps None and is derived as a plain tensor.
        try:
            return layout.view(p)
        except ValueError:
            return None

    def view_of(p: str) -> _View:
        if p not in views:
            dims = dims_of[p] if p in dims_of else default_dims(p)
            views[p] = _view(tuple(np.shape(flat[p])), specs[p], dims, p)
        return views[p]

    def generic(kp, leaf):
        path = tree.canonical(kp)
        if not hasattr(leaf, "shape"):
            return None
        p = _owner(path, flat)
        spec = (
            rep
            if p is None
            else _derive(
                view_of(p), leaf, _last_name(kp), sizes, f"state leaf {path!r}"
            )
        )
        return _named(mesh, spec, leaf, f"state leaf {path!r}")

    def replicate(leaf):
        return None if not hasattr(leaf, "shape") else NamedSharding(mesh, rep)

    def basis(path, leaf):
        p, rest = _prefix_owner(path, flat)
        if p is None:
            return _named(mesh, rep, leaf, f"projector leaf {path!r}")
        view = view_of(p)
        shape = tuple(np.shape(leaf))
        roles: list[Any] = [(_FLAT,)] + [(_FREE,)] * (len(shape) - 1)
        r = view.resolved
        if len(shape) == 3 and r is not None:
            side = (
                _IN
                if rest == "0"
                else _OUT
                if rest == "1"
                else _IN
                if shape[1] == r.n_in
                else _OUT
                if shape[1] == r.n_out
                else _FREE
            )
            roles[1] = (side,)
        what = f"projector of {p!r}"
        return _named(mesh, _place(view, roles, shape, sizes, what), leaf, what)

    def sparse_slot(path, leaf):
        owner = f"{path}/values"
        if owner in flat and tuple(np.shape(flat[owner])) == tuple(np.shape(leaf)):
            return _named(mesh, specs[owner], leaf, f"sparse slots of {path!r}")
        return replicate(leaf)

    def declared(x) -> bool:
        return tree.state_roles(x) is not None

    def place(kp, node):
        roles = tree.state_roles(node)
        if roles is None:
            return generic(kp, node)

        def one(rel, leaf):
            if not rel or not isinstance(rel[0], jax.tree_util.GetAttrKey):
                raise TypeError(
                    f"state_shardings: {type(node).__qualname__} declares state_roles, "
                    f"but its pytree keys are not its field names (got {rel[:1]})"
                )
            if declared(leaf):
                return place(kp + rel, leaf)
            role = roles[rel[0].name]
            inner = tree.canonical(rel[1:])
            if role is tree.StateRole.REPLICATED:
                return replicate(leaf)
            if role is tree.StateRole.PROJECTOR:
                return basis(inner, leaf)
            if role is tree.StateRole.SPARSE_SLOTS:
                return sparse_slot(inner, leaf)
            return generic(kp + rel, leaf)

        return jax.tree.map_with_path(
            one, node, is_leaf=lambda x: x is not node and declared(x)
        )

    return jax.tree.map_with_path(place, state, is_leaf=declared)
