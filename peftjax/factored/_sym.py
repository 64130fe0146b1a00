# SPDX-License-Identifier: Apache-2.0
"""Symbolic adapted kernels: a base view plus the adapter state that rides along.

While ``peftjax.factored`` re-evaluates a model's jaxpr, every adapted kernel is a
``Sym``: the *base* kernel as the program currently sees it (after the
transposes, reshapes, casts and layer slices the program applied), the
adapter's state sliced the same way, and for every axis its *role* in the
adapter's matrix view ``(batch..., in, out)``. A ``Sym`` is a pytree whose
leaves are the base view and the state, so it crosses ``scan``/``cond``/
``checkpoint`` boundaries unchanged; its static part says how to read them.

* ``view(sym, eqn, ...)`` applies a layout primitive to the base and updates
  the roles (or returns None when it cannot);
* ``dot(...)`` rewrites ``dot_general(x, view(W'))`` into
  ``out_map`` of the model's own ``dot_general(in_map(x ⊙ in_scale),
  view(W))`` plus the adapter's cheap terms;
* ``materialize(sym)`` forms ``view(W')`` (the loud fallback).

A *quantised* kernel (a ``peftjax.quant.QuantizedArray``, adapted or not) is a
``Sym`` with no float base: its stored blocks ride along with the state (they
share its leading stacked-layer axes, so layer slices slice them too), the
current view's shape and dtype are static, and ``dot`` multiplies by the
dequantised kernel a tile of output columns at a time
(``peftjax.quant._matmul``); ``gather`` of whole rows (an embedding lookup)
gathers the blocks and decodes only the rows taken.

Exports: ``Sym``, ``Role``, ``from_leaf``, ``view``, ``dot``, ``gather``,
``materialize``, ``slice_leading``.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, quant, tree

# An axis' role: kind "b" (batch), "i" (input), "o" (output) or "u" (unit,
# size 1), with the indices of the matrix view's batch/reduction/output axes
# it covers (row-major, consecutive). ("i", (0, 1)) is two input axes merged.
Role = tuple[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True, eq=False)
class Meta:
    """The static part of a ``Sym`` (compared by identity)."""

    path: str
    adapter: adapters.Adapter | None  # None: a quantised leaf without adapter
    dims: tree.ResolvedDims
    roles: tuple[Role, ...]
    state_batch: tuple[int, ...]  # batch ids of the state leaves' leading axes
    treedef: Any                  # of (trainable, frozen, key, blocks)
    qformat: quant.QuantFormat | None = None  # quantised: the block format
    view_shape: tuple[int, ...] = ()  # quantised: the current view's shape
    view_dtype: Any = None            # quantised: the current view's dtype

    def replace(self, **kw: Any) -> "Meta":
        return dataclasses.replace(self, **kw)


@jax.tree_util.register_pytree_node_class
class Sym:
    """An adapted kernel in flight: ``base`` view, state, roles (see module doc)."""

    def __init__(self, meta: Meta, base: Any, state: list[Any]):
        self.meta, self.base, self.state = meta, base, state

    def tree_flatten(self):
        return (self.base, *self.state), self.meta

    @classmethod
    def tree_unflatten(cls, meta, leaves):
        return cls(meta, leaves[0], list(leaves[1:]))

    @property
    def parts(self) -> tuple[Any, Any, Any]:
        """``(trainable, frozen, keys)``."""
        return jax.tree.unflatten(self.meta.treedef, self.state)[:3]

    @property
    def blocks(self) -> Any:
        """A quantised kernel's blocks (batch axes as the state's), else None."""
        return jax.tree.unflatten(self.meta.treedef, self.state)[3]

    @property
    def is_quant(self) -> bool:
        return self.meta.qformat is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.view_shape if self.is_quant else tuple(np.shape(self.base))

    @property
    def dtype(self) -> Any:
        return self.meta.view_dtype if self.is_quant else self.base.dtype

    def with_(self, base: Any, state: list[Any] | None = None, *, aval: Any = None,
              **meta: Any) -> "Sym":
        """A new Sym; ``aval`` (shape/dtype of the new view) for quantised ones."""
        if self.is_quant and aval is not None:
            meta.update(view_shape=tuple(aval.shape), view_dtype=np.dtype(aval.dtype))
        return Sym(self.meta.replace(**meta), None if self.is_quant else base,
                   self.state if state is None else state)


def _quant_dims(path: str, adapter: adapters.Adapter | None,
                w: quant.QuantizedArray) -> tree.ResolvedDims:
    """The matrix view of a quantised leaf: reduction = the blocked axis."""
    shape, k = tuple(w.shape), w.axis
    if len(shape) < 2:
        raise ValueError(
            f"peftjax.factored: the quantised leaf {path!r} (shape {shape}, dtype "
            f"{w.dtype}, {w.format!r}) is not a matrix; keep 1-D leaves in float")
    if adapter is not None and adapter.factored is not None:
        dims = tree.resolve(adapter.factored.dimension_numbers, shape, path=path)
    else:
        # Flax defaults with the blocked axis as input: (batch..., in, out...),
        # or (batch..., out, in) for a table blocked along its last axis.
        n = len(shape)
        if k == n - 1 and n >= 2:
            out, batch = (n - 2,), tuple(range(n - 2))
        else:
            out, batch = tuple(range(k + 1, n)), tuple(range(k))
        dims = tree.resolve(tree.DimensionNumbers(
            reduction_axis=k, output_axis=out, batch_axis=batch), shape, path=path)
    nb = len(dims.batch)
    if (dims.reduction != (k,) or dims.batch != tuple(range(nb))
            or dims.output != tuple(sorted(dims.output))):
        raise ValueError(
            f"peftjax.factored: the quantised leaf {path!r} (shape {shape}, dtype "
            f"{w.dtype}, {w.format!r}) is blocked along axis {k}, but its matrix view "
            f"has reduction axes {dims.reduction}, output axes {dims.output} and batch "
            f"axes {dims.batch}; the factored path needs the blocked axis to be the "
            "only reduction axis and the batch axes to lead (quantise along the "
            "adapter's reduction axis)")
    return dims


def from_leaf(path: str, adapter: adapters.Adapter | None, w: Any, trainable: Any,
              frozen: Any, keys: Any) -> Sym:
    """Wraps an adapted or quantised leaf (``keys``: dropout keys, or None)."""
    quantized = quant.is_quantized(w)
    if quantized:
        dims = _quant_dims(path, adapter, w)
    else:
        form = adapter.factored
        dn = None if form is None else form.dimension_numbers
        dims = tree.resolve(dn, np.shape(w), path=path)
    roles = []
    for a in range(len(dims.shape)):
        for kind, axes in (("b", dims.batch), ("i", dims.reduction),
                           ("o", dims.output)):
            if a in axes:
                roles.append((kind, (axes.index(a),)))
    blocks = w.blocks if quantized else None
    leaves, treedef = jax.tree.flatten((trainable, frozen, keys, blocks))
    meta = Meta(path, adapter, dims, tuple(roles),
                tuple(range(len(dims.batch))), treedef)
    if quantized:
        meta = meta.replace(qformat=w.format, view_shape=tuple(w.shape),
                            view_dtype=np.dtype(w.dtype))
        return Sym(meta, None, leaves)
    return Sym(meta, w, leaves)


def _id_size(dims: tree.ResolvedDims, role: Role) -> int:
    kind, ids = role
    axes = {"b": dims.batch, "i": dims.reduction, "o": dims.output}.get(kind, ())
    return math.prod(dims.shape[axes[k]] for k in ids)


def _group(old: tuple[int, ...], new: tuple[int, ...]) -> list | None:
    """Pairs runs of old and new axes with equal products (reshape groups)."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        oi, nj = [], []
        po = pn = 1
        while True:
            if po == pn and (oi or nj):
                while i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
                    oi.append(i)
                    i += 1
                break
            if po <= pn and i < len(old):
                po *= old[i]
                oi.append(i)
                i += 1
            elif j < len(new):
                pn *= new[j]
                nj.append(j)
                j += 1
            else:
                return None
        groups.append((oi, nj))
    return groups


def _reshape_roles(sym: Sym, new_shape: tuple[int, ...]) -> tuple[Role, ...] | None:
    roles, dims = sym.meta.roles, sym.meta.dims
    old_shape = sym.shape
    groups = _group(old_shape, new_shape)
    if groups is None:
        return None
    out: list[Role] = [("u", ())] * len(new_shape)
    for oi, nj in groups:
        real = [roles[a] for a in oi if roles[a][0] != "u"]
        kinds = {k for k, _ in real}
        if len(kinds) > 1:
            return None
        if not real:
            continue
        kind = real[0][0]
        ids = tuple(k for _, r in real for k in r)
        if list(ids) != list(range(ids[0], ids[0] + len(ids))):
            return None
        if kind == "b" and len(ids) > 1:
            return None
        targets = [j for j in nj if new_shape[j] != 1] or nj[:1]
        # Split ids across the non-unit new axes in order.
        pos = 0
        for j in targets:
            take = []
            size = 1
            while pos < len(ids) and size < new_shape[j]:
                size *= _id_size(dims, (kind, (ids[pos],)))
                take.append(ids[pos])
                pos += 1
            if size != new_shape[j] or not take:
                return None
            out[j] = (kind, tuple(take))
        if pos != len(ids):
            return None
    return tuple(out)


def view(sym: Sym, name: str, params: dict, new_base: Any, aval: Any) -> Sym | None:
    """Applies layout primitive ``name`` (already bound on the base to give
    ``new_base``; None for a quantised Sym) with output ``aval`` to the roles;
    None if the primitive is not a pure view."""
    roles = sym.meta.roles
    new_shape = tuple(aval.shape)
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision",
                "sharding_constraint", "pvary", "optimization_barrier"):
        return sym.with_(new_base, aval=aval)
    if name == "transpose":
        return sym.with_(new_base, aval=aval,
                         roles=tuple(roles[p] for p in params["permutation"]))
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None
        new = _reshape_roles(sym, new_shape)
        return None if new is None else sym.with_(new_base, aval=aval, roles=new)
    if name == "squeeze":
        drop = {d % len(roles) for d in params["dimensions"]}
        if any(roles[d][0] not in ("u", "b") for d in drop):
            return None
        state, sb = sym.state, list(sym.meta.state_batch)
        for d in sorted(drop, reverse=True):
            if roles[d][0] == "b":
                p = sb.index(roles[d][1][0])
                state = [jnp.squeeze(x, p) for x in state]
                sb.pop(p)
        return sym.with_(new_base, state, aval=aval, state_batch=tuple(sb),
                         roles=tuple(r for d, r in enumerate(roles) if d not in drop))
    if name == "broadcast_in_dim":
        if math.prod(params["shape"]) != math.prod(sym.shape):
            return None
        new: list[Role] = [("u", ())] * len(params["shape"])
        for old, d in enumerate(params["broadcast_dimensions"]):
            new[d] = roles[old]
        return sym.with_(new_base, aval=aval, roles=tuple(new))
    return None


def slice_batch(sym: Sym, axis: int, start: Any, size: int, new_base: Any,
                aval: Any) -> Sym | None:
    """Slices batch axis ``axis`` to ``[start, start + size)`` (state too)."""
    kind, ids = sym.meta.roles[axis]
    if kind != "b":
        return None
    p = sym.meta.state_batch.index(ids[0])
    state = [jax.lax.dynamic_slice_in_dim(x, start, size, axis=p) for x in sym.state]
    return sym.with_(new_base, state, aval=aval)


def slice_leading(sym: Sym) -> tuple[Sym, Sym] | None:
    """For ``scan`` over axis 0: (the Sym passed as xs, its per-step meta)."""
    kind, ids = sym.meta.roles[0]
    if kind != "b":
        return None
    sb = list(sym.meta.state_batch)
    p = sb.index(ids[0])
    state = [jnp.moveaxis(x, p, 0) for x in sym.state]
    sb.pop(p)
    # The pytree's static part already describes one slice: scan slices every
    # leaf's axis 0 and rebuilds the Sym with this meta inside the body.
    meta = sym.meta.replace(roles=sym.meta.roles[1:], state_batch=tuple(sb))
    if sym.is_quant:
        meta = meta.replace(view_shape=sym.shape[1:])
    return Sym(meta, sym.base, state), sym


def _matrix_perm(roles: tuple[Role, ...], kinds: str) -> list[int]:
    order = []
    for kind in kinds:
        axes = [a for a, r in enumerate(roles) if r[0] == kind]
        order += sorted(axes, key=lambda a: roles[a][1][0])
    return order


def _quant_matrix_blocks(sym: Sym) -> Any:
    """A quantised Sym's blocks as ``(batch in state order..., out, nb, ...)``."""
    nb = len(sym.meta.state_batch)
    n_out = math.prod(_id_size(sym.meta.dims, r) for r in sym.meta.roles if r[0] == "o")
    blocks = sym.blocks
    grid = tuple(sym.meta.qformat.grid(blocks))
    bshape, n_lead = grid[:nb], len(grid) - 1

    def flat(a):
        return a.reshape(bshape + (n_out,) + a.shape[n_lead:])

    return jax.tree.map(flat, blocks), bshape


def _quant_matrix(sym: Sym) -> tuple[jax.Array, tuple[int, ...]]:
    """A quantised Sym's kernel dequantised as ``(batch..., in, out)`` (whole)."""
    blocks, bshape = _quant_matrix_blocks(sym)
    fmt = sym.meta.qformat
    w = fmt.decode(blocks)  # (batch..., out, nb, bs)
    w = w.reshape(w.shape[:-2] + (w.shape[-2] * w.shape[-1],))
    return jnp.swapaxes(w, -1, -2).astype(sym.dtype), bshape


def _to_matrix(sym: Sym) -> tuple[jax.Array, list[int], tuple[int, ...]]:
    """The base as ``(batch in state order..., in, out)``; returns perm, sizes."""
    roles, meta = sym.meta.roles, sym.meta
    b_axes = [next(a for a, r in enumerate(roles) if r == ("b", (k,)))
              for k in meta.state_batch]
    perm = b_axes + _matrix_perm(roles, "io") + [
        a for a, r in enumerate(roles) if r[0] == "u"]
    if sym.is_quant:
        m, bshape = _quant_matrix(sym)
        return m, perm, bshape
    t = jnp.transpose(sym.base, perm) if perm != list(range(len(perm))) else sym.base
    bshape = tuple(np.shape(sym.base)[a] for a in b_axes)
    n_in = math.prod(_id_size(meta.dims, r) for r in roles if r[0] == "i")
    n_out = math.prod(_id_size(meta.dims, r) for r in roles if r[0] == "o")
    return t.reshape(bshape + (n_in, n_out)), perm, bshape


def materialize(sym: Sym) -> jax.Array:
    """Forms the (adapted, dequantised) kernel in the current view: the fallback."""
    roles = sym.meta.roles
    if any(r[0] == "b" for r in roles) and len(sym.meta.state_batch) != sum(
            r[0] == "b" for r in roles):
        raise ValueError(f"{sym.meta.path}: inconsistent batch axes {roles}")
    m, perm, bshape = _to_matrix(sym)
    out = m
    if sym.meta.adapter is not None:
        trainable, frozen, _ = sym.parts
        fn = sym.meta.adapter.factored.apply
        for _ in bshape:
            fn = jax.vmap(fn)
        out = fn(m, trainable, frozen)
    out = out.astype(sym.dtype)
    permuted = tuple(sym.shape[a] for a in perm)
    inverse = [perm.index(i) for i in range(len(perm))]
    return jnp.transpose(out.reshape(permuted), inverse)


def gather(sym: Sym, indices: Any, params: dict) -> Any | None:
    """Whole-row ``gather`` from an unadapted quantised table (an embedding
    lookup): gathers the blocks and decodes only the rows taken; None when the
    gather is not of that form."""
    roles, meta = sym.meta.roles, sym.meta
    if not sym.is_quant or meta.adapter is not None or meta.state_batch:
        return None
    n = len(roles)
    want = tuple(("o", (i,)) for i in range(n - 1)) + (("i", (0,)),)
    if roles != want:
        return None
    dn = params["dimension_numbers"]
    out_rank = len(params["slice_sizes"]) - len(dn.collapsed_slice_dims) + (
        np.ndim(indices) - 1)
    if (n - 1 in dn.collapsed_slice_dims or n - 1 in dn.start_index_map
            or dn.operand_batching_dims or params["slice_sizes"][-1] != sym.shape[-1]
            or not dn.offset_dims or dn.offset_dims[-1] != out_rank - 1):
        return None
    fmt = meta.qformat
    rows = []
    for leaf in jax.tree.leaves(sym.blocks):
        extra = leaf.ndim - (n - 1)  # (nb, trailing...) replace the input axis
        leaf_dn = dn._replace(offset_dims=tuple(dn.offset_dims) + tuple(
            range(out_rank, out_rank + extra - 1)))
        rows.append(jax.lax.gather(
            leaf, indices, leaf_dn,
            tuple(params["slice_sizes"][:-1]) + tuple(leaf.shape[n - 1:]),
            indices_are_sorted=params["indices_are_sorted"],
            unique_indices=params["unique_indices"], mode=params["mode"]))
    blocks = jax.tree.unflatten(jax.tree.structure(sym.blocks), rows)
    w = fmt.decode(blocks)
    return w.reshape(w.shape[:-2] + (sym.shape[-1],)).astype(sym.dtype)


def _dropout(x: jax.Array, rate: float, key: Any) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def dot(sym: Sym, other: Any, sym_is_lhs: bool, params: dict,
        bind: Callable[..., Any], key: Any, *,
        tile_bytes: int = quant.DEFAULT_TILE_BYTES) -> Any | None:
    """Factored ``dot_general``; None when the use is not a plain contraction.

    ``bind(lhs, rhs)`` is the model's own ``dot_general`` with its parameters;
    ``key`` is this site's dropout key (None: no dropout). A quantised kernel
    is multiplied a tile of at most ``tile_bytes`` dequantised bytes at a time.
    """
    roles, meta = sym.meta.roles, sym.meta
    form = None if meta.adapter is None else meta.adapter.factored
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    cs, cx = (lc, rc) if sym_is_lhs else (rc, lc)
    if (form is None and not sym.is_quant) or lb or rb or any(
            r[0] == "b" for r in roles):
        return None
    if any(roles[a][0] not in ("i", "u") for a in cs):
        return None
    if sorted(k for a in cs for k in roles[a][1]) != sorted(
            k for r in roles if r[0] == "i" for k in r[1]):
        return None
    ids = [k for a in sorted(cs, key=lambda a: roles[a][1][:1] or (-1,))
           for k in roles[a][1]]
    if ids != list(range(len(meta.dims.reduction))):
        return None
    pairs = sorted(zip(cs, cx, strict=True), key=lambda p: roles[p[0]][1][:1] or (-1,))
    x_free = [a for a in range(other.ndim) if a not in cx]
    x_shape = tuple(other.shape[a] for a in x_free)
    sym_free = [a for a in range(len(roles)) if a not in cs]

    if form is None:
        terms = adapters.FactoredTerms()
    else:
        w_m, _, _ = _to_matrix(sym)  # quantised: unused by most adapters (DCE)
        trainable, frozen, _ = sym.parts
        terms = form.terms(w_m, trainable, frozen)

    # Output layout of the product: (lhs free..., rhs free...).
    out_sizes = [_id_size(meta.dims, roles[a]) for a in sym_free]
    o_order = sorted(range(len(sym_free)),
                     key=lambda k: roles[sym_free[k]][1][:1] or (-1,))

    def as_matrix(x: jax.Array) -> jax.Array:
        """``x`` as ``(x free..., in)`` with the input axes in matrix order."""
        xm = jnp.transpose(x, x_free + [b for _, b in pairs])
        return xm.reshape(x_shape + (-1,))

    def place(d: jax.Array) -> jax.Array:
        """``(x free..., out)`` -> the model's output layout."""
        d = d.reshape(x_shape + tuple(out_sizes[k] for k in o_order))
        inv = [o_order.index(k) for k in range(len(sym_free))]
        n = len(x_shape)
        d = jnp.transpose(d, list(range(n)) + [n + k for k in inv])
        if sym_is_lhs:
            d = jnp.transpose(d, list(range(n, n + len(sym_free))) + list(range(n)))
        return d

    def unplace(y: jax.Array) -> jax.Array:
        """The inverse of ``place``: the model's output layout -> ``(x free..., out)``."""
        n, k = len(x_shape), len(sym_free)
        if sym_is_lhs:
            y = jnp.transpose(y, list(range(k, k + n)) + list(range(k)))
        y = jnp.transpose(y, list(range(n)) + [n + j for j in o_order])
        return y.reshape(x_shape + (-1,))

    x_in = other
    if terms.in_scale is not None:
        in_sizes = [other.shape[b] for _, b in pairs]
        sc = terms.in_scale.reshape(in_sizes)
        order = sorted(range(len(pairs)), key=lambda k: pairs[k][1])
        sc = jnp.transpose(sc, order)
        sc = jax.lax.broadcast_in_dim(sc, other.shape, tuple(sorted(cx)))
        ct = adapters.compute_dtype(other.dtype, sc.dtype)
        x_in = (other.astype(ct) * sc.astype(ct)).astype(other.dtype)
    if terms.in_map is not None:
        xm = terms.in_map(as_matrix(x_in)).astype(other.dtype)
        xm = xm.reshape(x_shape + tuple(other.shape[b] for _, b in pairs))
        layout = x_free + [b for _, b in pairs]
        x_in = jnp.transpose(xm, [layout.index(a) for a in range(other.ndim)])
    if sym.is_quant:
        blocks, _ = _quant_matrix_blocks(sym)
        xm = as_matrix(x_in)
        y = quant.tiled_product(
            xm.reshape(math.prod(x_shape), xm.shape[-1]), blocks, meta.qformat,
            sym.dtype, tile_bytes=tile_bytes, precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"))
        y = place(y)
    else:
        y = bind(*((sym.base, x_in) if sym_is_lhs else (x_in, sym.base)))
    if terms.out_map is not None:
        y = place(terms.out_map(unplace(y)).astype(y.dtype))
    if terms.delta is None and terms.out_scale is None:
        return y

    ct = y.dtype
    extra = []
    if terms.delta is not None:
        xm = as_matrix(other)
        if key is not None:
            xm = _dropout(xm, meta.adapter.dropout, key)
        d = terms.delta(xm)
        ct = adapters.compute_dtype(ct, d.dtype)
        extra.append(place(d))
    out = y.astype(ct)
    for d in extra:
        out = out + d.astype(ct)
    if terms.out_scale is not None:
        sc = terms.out_scale
        ct2 = adapters.compute_dtype(ct, sc.dtype)
        sc = sc.reshape([out_sizes[k] for k in o_order])
        sc = jnp.transpose(sc, [o_order.index(k) for k in range(len(sym_free))])
        start = 0 if sym_is_lhs else len(x_shape)
        sc = jax.lax.broadcast_in_dim(
            sc.astype(ct2), out.shape, tuple(range(start, start + len(sym_free))))
        out = out.astype(ct2) * sc
    return out.astype(y.dtype)
