# SPDX-License-Identifier: Apache-2.0
"""Batched multi-adapter execution: one batch, a different adapter per example.

``batched(collection, params, ids)`` turns several named adapters of a
collection into one ``NamedAdapter(assignment, trainable, frozen)`` whose
adapters exist only in factored form: run the model through
``peftjax.factored.transform(apply_fn, *named)``. Example ``b`` of the batch uses
adapter ``names[ids[b]]``; ``ids[b] = -1`` runs the base model for it. This is
the gather form of S-LoRA / Punica ("S-LoRA: Serving Thousands of Concurrent
LoRA Adapters", Sheng et al., 2023, https://arxiv.org/abs/2311.03285): for
every adapted matmul ``y = x @ W`` the base product is shared by the batch and
each example adds its own adapter term,

    y_b = x_b @ W + delta_{ids[b]}(x_b),

with the factors gathered per example (``A[ids]: (B, in, r)``), never a
per-example weight. Adapters that are the same ``Adapter`` object at a path
(one ``tree.assign`` reused for several trainings) are stacked and gathered
together; distinct adapter objects form separate groups whose terms are added
with the other groups' examples masked to exactly zero, so an example's
output is ``x_b @ W + delta(x_b)`` with nothing else added.

What can be batched: adapters whose factored form is purely additive (LoRA,
rsLoRA, LoRA-XS/LoRA-SB, VeRA, AdaLoRA); input or output scales (DoRA, (IA)³,
SSF) and bias hooks vary the base product itself and are refused by name.
Member adapters' input dropout is not applied (this form is for inference and
evaluation; gradients with respect to ``trainable`` do flow).

Contract with the model: the activation entering an adapted matmul carries
the examples on its leading axis (``(B, T, in)`` for peftjax's models and
stock Flax layers); another leading size raises ``ValueError`` naming the
path.

Exports: ``BatchedRouting``, ``batched``.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _collection, _lowrank, _protocol, _shared


class BatchedRouting(NamedTuple):
    """The frozen part of a batched adapter at one path.

    Attributes:
      frozen: per group, the members' frozen states stacked on a new axis
        after the leaf's batch axes.
      ids: ``(batch..., B)`` int32, the adapter index of every example
        (``-1``: base), repeated over the leaf's batch (stacked-layer) axes.
    """

    frozen: tuple[Any, ...]
    ids: jax.Array


def _stack(parts: Sequence[Any], axis: int) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *parts)


def _per_matrix_spec(x: Any, nb: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(np.shape(x))[nb:], x.dtype)


def _check_member(path: str, name: str, adapter: _protocol.Adapter, leaf: Any,
                  t: Any, f: Any) -> tree.ResolvedDims:
    form = adapter.factored
    if form is None:
        raise TypeError(f"batched: adapter {name!r} at {path!r} ({adapter!r}) has no "
                        "factored form; only additive factored adapters can be batched")
    if adapter.bias is not None:
        raise TypeError(f"batched: adapter {name!r} at {path!r} ({adapter!r}) also "
                        "changes the bias; it cannot vary per example")
    dims = tree.resolve(form.dimension_numbers, np.shape(leaf), path=path)
    nb = len(dims.batch)
    found: dict[str, bool] = {}

    def probe(t1, f1):
        w = jnp.zeros((dims.n_in, dims.n_out), leaf.dtype)
        terms = form.terms(w, t1, f1)
        found["scales"] = (terms.in_scale is not None or terms.out_scale is not None
                           or terms.in_map is not None or terms.out_map is not None)
        return jnp.zeros(())

    jax.eval_shape(probe, jax.tree.map(lambda x: _per_matrix_spec(x, nb), t),
                   jax.tree.map(lambda x: _per_matrix_spec(x, nb), f))
    if found["scales"]:
        raise TypeError(
            f"batched: adapter {name!r} at {path!r} ({adapter!r}, shape "
            f"{tuple(np.shape(leaf))}, dtype {leaf.dtype}) scales the base product "
            "(DoRA, (IA)3, SSF) or maps its input (OFT) or output (RoAd); only "
            "additive adapters can vary per example")
    return dims


def _make_adapter(path: str, groups: list[tuple[_protocol.Adapter, list[int]]],
                  n_total: int, batch: int, dn: Any, names: Sequence[str]
                  ) -> _protocol.Adapter:
    """The per-path adapter: gather-and-add per group (see module doc)."""
    tables = []
    for _, members in groups:
        table = np.full((n_total,), -1, np.int32)
        table[members] = np.arange(len(members), dtype=np.int32)
        tables.append(table)
    forms = [a.factored for a, _ in groups]
    label = ", ".join(f"{names[m]}" for _, ms in groups for m in ms)

    def init(key, w, *, stats=None):
        # A fresh state of the right structure (what the shape checks need):
        # each member freshly initialised, every example on adapter 0.
        dims = tree.resolve(dn, np.shape(w), path=path)
        nb = len(dims.batch)
        ts, fs = [], []
        for g, (adapter, members) in enumerate(groups):
            keys = jax.random.split(jax.random.fold_in(key, g), len(members))
            parts = [adapter.init(k, w) for k in keys]
            ts.append(_stack([p[0] for p in parts], nb))
            fs.append(_stack([p[1] for p in parts], nb))
        ids = jnp.zeros(dims.batch_shape + (batch,), jnp.int32)
        return tuple(ts), BatchedRouting(tuple(fs), ids)

    def apply(w, trainable, frozen):
        raise ValueError(
            f"batched adapters on {path!r} (shape {tuple(np.shape(w))}, dtype "
            f"{w.dtype}) give every example its own weights; they exist only in "
            "factored form: run the model through peftjax.factored.transform, where this "
            "kernel must reach a plain matmul (a use that needs the weight itself "
            "cannot vary per example)")

    def terms(w, trainable, frozen):
        ids = frozen.ids

        def delta(x):
            if x.ndim < 2 or x.shape[0] != batch:
                raise ValueError(
                    f"batched adapters on {path!r}: the activation entering the "
                    f"matmul has shape {x.shape}, dtype {x.dtype}; its leading axis "
                    f"must be the {batch} examples that ids routes")
            safe = jnp.clip(ids, 0, n_total - 1)
            total = None
            for form, table, t, f in zip(forms, tables, trainable, frozen.frozen, strict=True):
                slot = jnp.where(ids >= 0, jnp.asarray(table)[safe], -1)
                pick = jnp.maximum(slot, 0)
                t_b = jax.tree.map(lambda s, i=pick: jnp.take(s, i, axis=0), t)
                f_b = jax.tree.map(lambda s, i=pick: jnp.take(s, i, axis=0), f)

                def one(xb, tb, fb, form=form):
                    tm = form.terms(w, tb, fb)
                    if tm.delta is None:
                        return jnp.zeros(xb.shape[:-1] + (w.shape[-1],), xb.dtype)
                    return tm.delta(xb)

                d = jax.vmap(one)(x, t_b, f_b)
                keep = (slot >= 0).reshape((batch,) + (1,) * (d.ndim - 1))
                d = jnp.where(keep, d, jnp.zeros((), d.dtype))
                if total is None:
                    total = d
                else:
                    ct = _lowrank.compute_dtype(total.dtype, d.dtype)
                    total = total.astype(ct) + d.astype(ct)
            return total

        return _protocol.FactoredTerms(delta=delta)

    return _protocol.Adapter(
        init=init, apply=apply, name=f"batched({label})",
        factored=_protocol.FactoredForm(dimension_numbers=dn, terms=terms,
                                    apply=apply), dimension_numbers=dn)


def _check_ids(ids: Any, n: int) -> jax.Array:
    shape = tuple(np.shape(ids))
    dtype = getattr(ids, "dtype", None)
    if len(shape) != 1 or shape[0] < 1 or dtype is None or not jnp.issubdtype(
            dtype, jnp.integer):
        raise ValueError(f"batched: ids must be a 1-D integer array (one adapter "
                         f"index per example), got shape {shape}, dtype {dtype}")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)
        bad = bad[(bad < -1) | (bad >= n)]
        if bad.size:
            raise ValueError(f"batched: ids {bad.tolist()} out of range; use "
                             f"0..{n - 1} for the named adapters, -1 for the base")
    return jnp.asarray(ids, jnp.int32)


def batched(
    coll: _collection.AdapterCollection,
    params: Any,
    ids: jax.Array,
    *,
    names: Sequence[str] | None = None,
) -> _collection.NamedAdapter:
    """Several named adapters in one batch: example ``b`` uses ``names[ids[b]]``.

    Args:
      coll: the collection holding the adapters (all on the base ``params``).
      params: the base tree, or a tree of ``jax.ShapeDtypeStruct`` with its
        shapes (only shapes are read).
      ids: ``(B,)`` integers, per example an index into ``names`` or ``-1``
        for the base model. They live in the returned ``frozen`` state, so a
        function jitted over ``(trainable, frozen)`` takes new ids (same
        ``B``) without retracing.
      names: which adapters, in index order (default: all, insertion order).
        Different adapters may target different paths; an example whose
        adapter does not target a path gets the base product there.

    Returns:
      ``NamedAdapter(assignment, trainable, frozen)`` for
      ``peftjax.factored.transform(apply_fn, *named)``; per path ``trainable`` is a
      tuple (one entry per group of identical member adapters) of the members'
      states stacked after the leaf's batch axes, and ``frozen`` a
      ``BatchedRouting``. ``materialize`` refuses it (per-example weights do
      not exist).

    Raises:
      ValueError: unknown names, ids of the wrong shape or range, members
        viewing a path through different dimension numbers.
      TypeError: a member that is not an additive factored adapter.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, factored, tree
      >>> params = {"w": jnp.eye(2)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> c = adapters.collection()
      >>> for n, v in (("x", 1.0), ("y", 2.0)):
      ...     t = {"w": adapters.LoRAParams(jnp.ones((2, 1)), jnp.full((1, 2), v))}
      ...     c = adapters.add(c, n, a, adapters.AdapterState(t, {"w": None}))
      >>> nb = adapters.batched(c, params, jnp.array([1, -1, 0]))
      >>> factored.transform(lambda p, x: x @ p["w"], *nb)(params, jnp.ones((3, 2)))
      Array([[33., 33.],
             [ 1.,  1.],
             [17., 17.]], dtype=float32)
    """
    _collection._check_collection(coll, "batched")
    names = list(coll.adapters) if names is None else list(names)
    if not names:
        raise ValueError("batched: no adapters to batch")
    for n in names:
        _collection._check_name(coll, n, "batched", exists=True)
    ids = _check_ids(ids, len(names))
    batch = ids.shape[0]
    flat = tree.leaves_by_path(params)
    # arrays shared by a member's leaves (adapters.Shared): each member gets
    # its own resolved copy per leaf (serving; no gradient is shared here)
    entries = []
    for n in names:
        e = coll.adapters[n]
        t, f = _shared.resolve_shared(e.assignment, flat, e.trainable, e.frozen)
        own = {p: ad if ad.shared is None else _shared.unshare(ad)
               for p, ad in e.assignment.items()}
        entries.append(e._replace(assignment=own, trainable=t, frozen=f))
    paths = list(dict.fromkeys(p for e in entries for p in e.assignment))
    assignment, trainable, frozen = {}, {}, {}
    for path in paths:
        if path not in flat:
            raise ValueError(f"batched: an adapter targets {path!r}, which is not a "
                             "leaf of params")
        leaf = flat[path]
        groups: list[tuple[_protocol.Adapter, list[int]]] = []
        dims = None
        for i, e in enumerate(entries):
            if path not in e.assignment:
                continue
            adapter = e.assignment[path]
            d = _check_member(path, names[i], adapter, leaf, e.trainable[path],
                              e.frozen[path])
            if dims is not None and d != dims:
                raise ValueError(f"batched: the adapters view {path!r} (shape "
                                 f"{tuple(np.shape(leaf))}) through different "
                                 "dimension numbers")
            dims = d
            for g_adapter, members in groups:
                if g_adapter == adapter:
                    members.append(i)
                    break
            else:
                groups.append((adapter, [i]))
        nb = len(dims.batch)
        dn = groups[0][0].factored.dimension_numbers
        ts, fs = [], []
        for _, members in groups:
            mt = [entries[m].trainable[path] for m in members]
            mf = [entries[m].frozen[path] for m in members]
            shapes = {str(jax.tree.map(np.shape, x)) for x in mt + mf}
            if len({str(jax.tree.map(np.shape, x)) for x in mt}) != 1 or len(
                    {str(jax.tree.map(np.shape, x)) for x in mf}) != 1:
                raise ValueError(f"batched: the states of {[names[m] for m in members]}"
                                 f" at {path!r} differ in shape: {sorted(shapes)}")
            ts.append(_stack(mt, nb))
            fs.append(_stack(mf, nb))
        assignment[path] = _make_adapter(path, groups, len(names), batch, dn, names)
        trainable[path] = tuple(ts)
        frozen[path] = BatchedRouting(
            tuple(fs), jnp.broadcast_to(ids, dims.batch_shape + (batch,)))
    return _collection.NamedAdapter(assignment, trainable, frozen)
