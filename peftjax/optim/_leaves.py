# SPDX-License-Identifier: Apache-2.0
"""Leaf plans and refresh plumbing shared by GaLore and FRUGAL.

Which leaves are projected (dimension numbers looked up by canonical path),
their matrix views ``(slices, n_in, n_out)``, the side rule of ``proj_type``
(the table is in ``_projectors``), PRNG keys kept as raw data in optax states,
and the ``lax.cond`` refresh with an unbatched predicate, synchronous or
staggered.

Exports (private): ``LeafPlan``, ``plan_leaves``, ``side_for``, ``side_dim``,
``to_slices``, ``from_slices``, ``key_data``, ``leaf_keys``,
``stagger_offsets``, ``finite_refresh``, ``refresh_slices``,
``check_refresh_options``, ``refresh_bases``, ``no_params_error``.
"""

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _projectors

DimsSpec = (
    tree.DimensionNumbers
    | tree.Layout
    | Mapping[str, "tree.DimensionNumbers | None"]
    | Callable[[str, Any], "tree.DimensionNumbers | None"]
    | None
)



# ----------------------------------------------------------------------------
# Side rules and leaf plans.


def side_for(proj_type: str, n_in: int, n_out: int) -> str:
    """Returns the projected axis of the Flax view for a reference ``proj_type``."""
    if proj_type not in _projectors.PROJ_TYPES:
        raise ValueError(
            f"proj_type must be one of {_projectors.PROJ_TYPES}, got {proj_type!r}"
        )
    if proj_type == "right":
        return _projectors.SIDE_IN
    if proj_type == "left":
        return _projectors.SIDE_OUT
    if proj_type == "full":
        return _projectors.SIDE_BOTH
    # Reference rule on W = gᵀ (m = n_out, n = n_in): std -> right iff m >= n.
    right = n_out >= n_in
    if proj_type == "reverse_std":
        right = not right
    return _projectors.SIDE_IN if right else _projectors.SIDE_OUT


def side_dim(side: str, n_in: int, n_out: int) -> int:
    """The size of the projected axis (``min`` of both for ``full``)."""
    if side == _projectors.SIDE_IN:
        return n_in
    if side == _projectors.SIDE_OUT:
        return n_out
    return min(n_in, n_out)


class LeafPlan(NamedTuple):
    """Static plan of one leaf: its matrix view and projection spec."""

    path: str
    resolved: Any  # peftjax.tree ResolvedDims
    spec: _projectors.LeafSpec

    @property
    def n_slices(self) -> int:
        return math.prod(self.resolved.batch_shape)


def leaf_dims(
    dimension_numbers: DimsSpec, path: str, leaf: Any,
    views: "tree.Views | None" = None,
) -> "tree.DimensionNumbers | None | bool":
    """Looks up the dimension numbers for one leaf.

    Returns ``False`` for leaves that are not projected. The default (None, a
    ``Layout``, or a path missing from a mapping) projects what is a matrix
    under ``views`` (the tree's layout: 2-D leaves, stacked ``(L..., in,
    out)`` leaves, declared views), except biases and embedding tables
    (by name) unless a ``Layout`` view names them; a leaf of rank >= 3
    with no declared view raises (``views.view``).
    """
    ndim = len(leaf.shape)
    if isinstance(dimension_numbers, tree.DimensionNumbers):
        return dimension_numbers if ndim >= 2 else False
    if isinstance(dimension_numbers, Mapping) and path in dimension_numbers:
        dims = dimension_numbers[path]
        return False if dims is None else dims
    if (callable(dimension_numbers) and not isinstance(
            dimension_numbers, (Mapping, tree.Layout))):
        dims = dimension_numbers(path, leaf)
        return False if dims is None else dims
    if dimension_numbers is not None and not isinstance(
            dimension_numbers, (Mapping, tree.Layout)):
        raise TypeError(
            "dimension_numbers must be None, a DimensionNumbers, a "
            "peftjax.tree.Layout, a mapping from canonical path to "
            "DimensionNumbers (or None), or a callable (path, leaf) -> "
            f"DimensionNumbers | None; got {type(dimension_numbers).__name__}"
        )
    if views is None:
        views = tree.bind(None, [(path, leaf)])
    dims = views.matrix_view(path)
    return False if dims is None else dims


def views_for(dimension_numbers: DimsSpec, flat: list[tuple[str, Any]]
              ) -> "tree.Views | None":
    """The tree's layout views for the default selection (None if unused)."""
    if isinstance(dimension_numbers, tree.Layout):
        return tree.bind(dimension_numbers, flat)
    if dimension_numbers is None or isinstance(dimension_numbers, Mapping):
        return tree.bind(None, flat)
    return None


def check_dims_keys(dimension_numbers: DimsSpec, params: Any) -> None:
    """Raises if a path-keyed ``dimension_numbers`` names no leaf of ``params``."""
    if not isinstance(dimension_numbers, Mapping):
        return
    found = set(tree.paths(params))
    unused = [p for p in dimension_numbers if p not in found]
    if unused and found:
        raise ValueError(
            f"dimension_numbers names paths that are not in the tree: {unused}; "
            f"existing paths: {sorted(found)[:8]}"
        )


def plan_leaves(
    params: Any,
    dimension_numbers: DimsSpec,
    rank_fn: Callable[[str, Any, int, int, str], int],
    proj_type: str,
    what: str,
) -> tuple[list[tuple[str, Any]], list["LeafPlan | None"]]:
    """Flattens ``params`` and plans each leaf (``None`` = not projected).

    ``rank_fn(path, shape, n_in, n_out, side)`` returns the rank of a leaf and
    raises its own errors.
    """
    flat = tree.flatten(params)
    views = views_for(dimension_numbers, flat)
    plans: list[LeafPlan | None] = []
    for path, leaf in flat:
        try:
            dims = leaf_dims(dimension_numbers, path, leaf, views)
            if dims is False:
                plans.append(None)
                continue
            resolved = tree.resolve(dims, leaf.shape, path=path)
        except ValueError as e:
            raise ValueError(
                f"{what}: cannot view leaf {path!r} (shape {tuple(leaf.shape)}, "
                f"dtype {leaf.dtype}) as a matrix: {e}"
            ) from None
        side = side_for(proj_type, resolved.n_in, resolved.n_out)
        rank = rank_fn(path, leaf, resolved.n_in, resolved.n_out, side)
        plans.append(
            LeafPlan(
                path,
                resolved,
                _projectors.LeafSpec(side, rank, resolved.n_in, resolved.n_out),
            )
        )
    return flat, plans


def to_slices(x: jax.Array, plan: LeafPlan) -> jax.Array:
    """``(leaf shape) -> (n_slices, n_in, n_out)``."""
    m = tree.to_matrix(x, plan.resolved)
    return m.reshape((plan.n_slices, plan.spec.n_in, plan.spec.n_out))


def from_slices(m: jax.Array, plan: LeafPlan) -> jax.Array:
    """``(n_slices, n_in, n_out) -> (leaf shape)``."""
    m = m.reshape(plan.resolved.batch_shape + (plan.spec.n_in, plan.spec.n_out))
    return tree.from_matrix(m, plan.resolved)


# ----------------------------------------------------------------------------
# Refresh plumbing shared by GaLore and FRUGAL.


def key_data(key: Any) -> jax.Array:
    """Stores a PRNG key as raw ``uint32`` data (safe under ``jnp.where``)."""
    if key is None:
        key = 0
    if isinstance(key, int):
        key = jax.random.key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"key must be an int seed or a jax.random.key, got dtype {key.dtype}"
        )
    return jax.random.key_data(key)


def leaf_keys(raw_key: jax.Array, leaf_index: int, count: jax.Array, n: int):
    """``n`` keys for one leaf's slices at step ``count``."""
    k = jax.random.wrap_key_data(raw_key)
    k = jax.random.fold_in(jax.random.fold_in(k, leaf_index), count)
    return jax.random.split(k, n)


def stagger_offsets(plans: list["LeafPlan | None"], gap: int) -> list[Any]:
    """Per-slice refresh phases spread evenly over ``[0, gap)``."""
    total = sum(p.n_slices for p in plans if p is not None)
    out, j = [], 0
    for p in plans:
        if p is None:
            out.append(None)
            continue
        out.append(
            jnp.asarray([((j + i) * gap) // max(total, 1) for i in range(p.n_slices)],
                        jnp.int32)
        )
        j += p.n_slices
    return out


def finite_refresh(projector: _projectors.Projector, spec: _projectors.LeafSpec
                   ) -> Callable[[jax.Array, Any, jax.Array], Any]:
    """``projector.refresh`` for one slice, keeping the old basis on a non-finite one.

    A slice gradient with a NaN or an infinity would give a NaN basis (SVD)
    or a basis drawn on a bad step (random projectors); the returned
    function gives the slice's previous basis instead, and hands the
    projector zeros in place of the bad gradient so no NaN reaches LAPACK or
    cuSOLVER. On a finite slice it is ``projector.refresh`` exactly.
    """

    def one(gi, bi, ki):
        ok = jnp.all(jnp.isfinite(gi))
        new = projector.refresh(jnp.where(ok, gi, jnp.zeros_like(gi)), bi, spec, ki)
        return jax.tree.map(lambda n, o: jnp.where(ok, n.astype(o.dtype), o), new, bi)

    return one


def refresh_slices(
    projector: _projectors.Projector,
    spec: _projectors.LeafSpec,
    g: jax.Array,
    basis: Any,
    keys: jax.Array,
    count: jax.Array,
    gap: int,
    offsets: "jax.Array | None",
) -> Any:
    """Refreshes the bases of one leaf's slices under ``lax.cond``.

    ``g: (n_slices, n_in, n_out)`` float; ``basis`` has a leading slice axis.
    Synchronous (``offsets is None``): one unbatched predicate
    ``count % gap == 0`` and a ``vmap`` of the refresh inside the taken branch.
    Staggered: a ``lax.map`` (scan) over slices, each with its own unbatched
    predicate ``count == 0 or count % gap == offset``, so a step only pays for
    the slices whose phase it is (a ``cond`` under ``vmap`` would become a
    ``select`` and run every SVD every step). A slice whose gradient is not
    finite keeps its basis (``finite_refresh``).
    """

    one = finite_refresh(projector, spec)

    if offsets is None:
        return jax.lax.cond(
            count % gap == 0,
            lambda: jax.vmap(one)(g, basis, keys),
            lambda: basis,
        )
    preds = (count == 0) | (count % gap == offsets)

    def body(args):
        gi, bi, ki, pi = args
        return jax.lax.cond(pi, lambda: one(gi, bi, ki), lambda: bi)

    return jax.lax.map(body, (g, basis, keys, preds))


def check_refresh_options(refresh_batch_size: Any, refresh_sharding: Any,
                          stagger: bool, what: str) -> None:
    """Validates the static refresh-placement options of GaLore and FRUGAL."""
    if refresh_batch_size is not None and (
        isinstance(refresh_batch_size, bool)
        or not isinstance(refresh_batch_size, numbers.Integral) or refresh_batch_size < 1
    ):
        raise ValueError(
            f"{what}: refresh_batch_size must be None or a positive int, got "
            f"{refresh_batch_size!r}"
        )
    if refresh_sharding is not None:
        if not isinstance(refresh_sharding, jax.sharding.NamedSharding):
            raise TypeError(
                f"{what}: refresh_sharding must be a jax.sharding.NamedSharding of the "
                f"slice axis (e.g. peftjax.shard.refresh_sharding(mesh)), got "
                f"{type(refresh_sharding).__name__}"
            )
        if any(e is not None for e in tuple(refresh_sharding.spec)[1:]):
            raise ValueError(
                f"{what}: refresh_sharding must shard only the slice axis, got spec "
                f"{refresh_sharding.spec}"
            )
        if refresh_batch_size is not None:
            raise ValueError(
                f"{what}: give refresh_batch_size or refresh_sharding, not both "
                f"(got {refresh_batch_size} and {refresh_sharding.spec})"
            )
    if stagger and (refresh_batch_size is not None or refresh_sharding is not None):
        raise ValueError(
            f"{what}: stagger already refreshes one slice at a time; drop "
            "refresh_batch_size / refresh_sharding"
        )


def _shard_count(sharding: jax.sharding.NamedSharding) -> int:
    entry = tuple(sharding.spec)[0] if len(sharding.spec) else None
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(sharding.mesh.shape[n] for n in names)


def refresh_bases(
    projector: _projectors.Projector,
    spec: _projectors.LeafSpec,
    g: jax.Array,
    basis: Any,
    keys: jax.Array,
    count: jax.Array,
    gap: int,
    offsets: Any,
    batch_size: int | None,
    sharding: jax.sharding.NamedSharding | None,
) -> Any:
    """Refreshes one leaf's slice bases, placed as the static options say.

    ``g: (n_slices, n_in, n_out)``. Staggered refreshes and the default
    (``batch_size`` and ``sharding`` None) are ``refresh_slices``;
    otherwise one unbatched ``lax.cond`` guards either a ``lax.map`` over the
    slices in chunks of ``batch_size`` or a ``shard_map`` over the slices
    (padded to a multiple of the sharding's device count) in which each
    device maps over its own slices. A slice whose gradient is not finite
    keeps its previous basis.
    """
    if offsets is not None or (batch_size is None and sharding is None):
        return refresh_slices(projector, spec, g, basis, keys, count, gap,
                                      offsets)

    refresh = finite_refresh(projector, spec)

    def one(args):
        return refresh(*args)

    def chunked():
        return jax.lax.map(one, (g, basis, keys), batch_size=batch_size)

    def spread():
        n = g.shape[0]
        pad = (-n) % _shard_count(sharding)

        def padded(x):
            if not pad:
                return x
            return jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])

        kp = keys
        if pad:
            kp = jnp.concatenate([keys, jax.random.split(keys[0], pad)])
        spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[:1])
        gp = g
        if pad:
            # Pad while the slices are split on a matrix axis: padding an
            # array split on its other axes makes XLA replicate it first.
            size = _shard_count(sharding)
            for axis in (1, 2):
                if g.shape[axis] % size == 0:
                    entries = [None, None, None]
                    entries[axis] = tuple(sharding.spec)[0]
                    on = jax.sharding.NamedSharding(
                        sharding.mesh, jax.sharding.PartitionSpec(*entries))
                    zeros = jax.lax.with_sharding_constraint(
                        jnp.zeros((n + pad,) + g.shape[1:], g.dtype), on)
                    gp = jax.lax.with_sharding_constraint(
                        zeros.at[:n].set(jax.lax.with_sharding_constraint(g, on)), on)
                    break
            else:
                gp = padded(g)
        # Each device loops over its own slices, one SVD call at a time.
        local = jax.shard_map(
            lambda *a: jax.lax.map(one, a), mesh=sharding.mesh,
            in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
        new = local(gp, jax.tree.map(padded, basis), kp)
        return jax.tree.map(lambda b: b[:n], new)

    return jax.lax.cond(count % gap == 0, spread if sharding is not None else chunked,
                        lambda: basis)


def no_params_error(e: ValueError) -> Exception:
    if optax._src.base.NO_PARAMS_MSG in str(e):  # noqa: SLF001
        return TypeError(
            "the inner transform needs params, but it receives projected "
            "gradients whose shapes differ from the params; use a param-free "
            "transform (scale_by_adam, scale_by_lion, ...) and pass "
            "weight_decay to the outer alias instead of using adamw"
        )
    return e
