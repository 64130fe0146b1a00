# SPDX-License-Identifier: Apache-2.0
"""Lifting per-matrix math to an ``Adapter`` on any leaf, and per-leaf keys.

An adapter's math is written once for one ``(in, out)`` matrix;
``lift_matrix`` views the leaf as ``(batch..., in, out)`` through its
``DimensionNumbers`` and maps the math over the batch axes (``jax.vmap`` for
``apply``, ``map_slices`` for ``init``). ``path_key`` derives a leaf's PRNG
key from the tree's key and the leaf's path.

Exports: ``lift_matrix``, ``map_slices``, ``path_key``.
"""

import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters._protocol import Adapter, BiasHook, FactoredForm, FactoredTerms
from peftjax.adapters._shared import SharedInit


def path_key(key: jax.Array, path: str) -> jax.Array:
    """Folds a stable CRC32 of ``path`` into ``key`` (never Python's ``hash``).

    Args:
      key: the tree-level key.
      path: the leaf's canonical path.

    Returns:
      The leaf's key, identical across processes and rule sets.

    Example:
      >>> import jax
      >>> k = path_key(jax.random.key(0), "dense/kernel")
      >>> bool((jax.random.key_data(k) ==
      ...       jax.random.key_data(path_key(jax.random.key(0), "dense/kernel"))).all())
      True
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF)


def describe_leaf(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return f"shape {tuple(np.shape(leaf))}, dtype {dtype}"


def map_slices(fn: Callable, nbatch: int) -> Callable:
    """``fn`` over the slices of the leading ``nbatch`` axes, one after another.

    Used for initialisers instead of ``jax.vmap``: a vmapped SVD/QR lowers to
    one batched LAPACK call, and jaxlib's batched CPU LAPACK kernels split the
    batch over the same small thread pool the XLA program runs on. On a
    two-core machine a jitted init of stacked layers then deadlocks (each pool
    thread waits for chunks no free thread can run). ``lax.map`` issues one
    unbatched call per slice; init runs once, so the lost batching is cheap.

    Args:
      fn: per-slice function; every argument has the same leading batch axes.
      nbatch: number of leading batch axes.

    Returns:
      A function with ``fn``'s arguments plus the batch axes, whose outputs
      carry the batch axes in front.

    Example:
      >>> import jax.numpy as jnp
      >>> norms = map_slices(lambda m: jnp.linalg.norm(m, axis=0), 2)
      >>> norms(jnp.ones((2, 3, 4, 5))).shape  # (2, 3) slices of (4, 5)
      (2, 3, 5)
    """

    def concrete(a: Any) -> bool:
        return isinstance(a, (jax.Array, np.ndarray))

    def run(*args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        lead = tuple(leaves[0].shape[:nbatch])
        # Abstract leaves (``jax.ShapeDtypeStruct``, e.g. from ``quant.abstract``)
        # carry no values to map over: each slice sees the slice's struct.
        live = [k for k, a in enumerate(leaves) if concrete(a)]
        fixed = [
            a if concrete(a)
            else jax.ShapeDtypeStruct(tuple(a.shape[nbatch:]), a.dtype)
            for a in leaves
        ]

        def one(xs: list) -> Any:
            slice_leaves = list(fixed)
            for k, x in zip(live, xs, strict=True):
                slice_leaves[k] = x
            return fn(*jax.tree.unflatten(treedef, slice_leaves))

        flat = [leaves[k].reshape((-1,) + leaves[k].shape[nbatch:]) for k in live]
        out = jax.lax.map(one, flat)
        return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)

    return run


def lift_matrix(
    *,
    name: str,
    init_matrix: Callable[..., tuple[Any, Any]],
    apply_matrix: Callable[..., jax.Array],
    unapply_matrix: Callable[..., jax.Array] | None = None,
    aux_matrix: Callable[..., Any] | None = None,
    bias: BiasHook | None = None,
    dimension_numbers: tree.DimensionNumbers | None = None,
    dropout: float = 0.0,
    factored_matrix: Callable[..., FactoredTerms] | None = None,
    hyperparameters: tuple[tuple[str, Any], ...] = (),
    shared: SharedInit | None = None,
) -> Adapter:
    """Builds an ``Adapter`` from math written once for one ``(in, out)`` matrix.

    The leaf is viewed as ``(batch..., in, out)`` through ``dimension_numbers``
    (None: a 2-D ``(in, out)`` leaf; ``tree.assign`` fills in the view of
    stacked and declared leaves); the per-matrix functions
    are ``jax.vmap``-ed over each batch axis, so stacked layers get independent
    adapters. Per-slice PRNG keys are split from the leaf key.

    Args:
      name: description for ``repr`` and errors.
      init_matrix: ``(key, w (in, out), stats) -> (trainable, frozen)``.
      apply_matrix: ``(w (in, out), trainable, frozen) -> w' (in, out)``;
        it may return a wider dtype, the result is cast back to ``w.dtype``.
      unapply_matrix: exact inverse ``(w', trainable, frozen, aux) -> w``.
      aux_matrix: ``(w, trainable, frozen) -> aux`` kept by ``fold``.
      bias: optional bias hook (its functions are also per matrix).
      dimension_numbers: the matrix view of the leaf.
      dropout: adapter-input dropout rate (factored path only).
      factored_matrix: ``(w (in, out), trainable, frozen) -> FactoredTerms``,
        the per-matrix factored form used by ``peftjax.factored``; None if the
        adapter has none.
      hyperparameters: the factory's arguments, ``((name, value), ...)``
        (``Adapter.hyperparameters``).
      shared: the ``SharedInit`` of arrays shared across leaves
        (``Adapter.shared``), or None.

    Returns:
      The lifted ``Adapter``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> scale_cols = lift_matrix(
      ...     name="double",
      ...     init_matrix=lambda key, w, stats: (w[0] * 0 + 2.0, None),
      ...     apply_matrix=lambda w, t, f: w * t[None, :])
      >>> w = jnp.ones((3, 2, 4))  # stacked: one vector per layer
      >>> from peftjax.tree import dims
      >>> stacked = scale_cols.with_dimension_numbers(dims.stacked())
      >>> t, f = stacked.init(jax.random.key(0), w)
      >>> t.shape, float(stacked.apply(w, t, f).sum())
      ((3, 4), 48.0)
    """
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    if dimension_numbers is not None and not isinstance(
            dimension_numbers, tree.DimensionNumbers):
        raise TypeError(f"{name}: dimension_numbers must be a "
                        f"peftjax.tree.DimensionNumbers or None, got {dimension_numbers!r}")
    again = dict(name=name, init_matrix=init_matrix, apply_matrix=apply_matrix,
                 unapply_matrix=unapply_matrix, aux_matrix=aux_matrix, bias=bias,
                 dropout=dropout, factored_matrix=factored_matrix,
                 hyperparameters=tuple(hyperparameters), shared=shared)

    def resolved(w: Any) -> tree.ResolvedDims:
        shape = tuple(np.shape(w))
        dtype = getattr(w, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} needs a floating-point matrix leaf, got {describe_leaf(w)}"
            )
        if len(shape) < 2:
            raise ValueError(
                f"{name} is a matrix adapter and cannot target a {len(shape)}-D "
                f"leaf ({describe_leaf(w)}); exclude it with a `then=None` rule "
                "or use a vector method"
            )
        return tree.resolve(dimension_numbers, shape, path="leaf")

    def vmapped(fn: Callable, nbatch: int) -> Callable:
        for _ in range(nbatch):
            fn = jax.vmap(fn)
        return fn

    def init(key: jax.Array, w: jax.Array, *, stats: Any = None):
        r = resolved(w)
        m = tree.to_matrix(w, r)
        nb = len(r.batch)
        if nb:
            keys = jax.random.split(key, math.prod(r.batch_shape)).reshape(
                r.batch_shape
            )
            if stats is None:
                return map_slices(lambda k, x: init_matrix(k, x, None), nb)(keys, m)
            return map_slices(init_matrix, nb)(keys, m, stats)
        return init_matrix(key, m, stats)

    def apply(w: jax.Array, trainable: Any, frozen: Any) -> jax.Array:
        r = resolved(w)
        m = tree.to_matrix(w, r)
        out = vmapped(apply_matrix, len(r.batch))(m, trainable, frozen)
        return tree.from_matrix(out.astype(w.dtype), r)

    unapply = None
    if unapply_matrix is not None:

        def unapply(w: jax.Array, trainable: Any, frozen: Any, aux: Any):
            r = resolved(w)
            m = tree.to_matrix(w, r)
            out = vmapped(unapply_matrix, len(r.batch))(m, trainable, frozen, aux)
            return tree.from_matrix(out.astype(w.dtype), r)

    fold_aux = None
    if aux_matrix is not None:

        def fold_aux(w: jax.Array, trainable: Any, frozen: Any):
            r = resolved(w)
            m = tree.to_matrix(w, r)
            return vmapped(aux_matrix, len(r.batch))(m, trainable, frozen)

    hook = None
    if bias is not None:

        def lift_bias(fn: Callable) -> Callable:
            def lifted(w_shape, b, trainable, frozen, *extra):
                r = tree.resolve(dimension_numbers, w_shape, path="leaf")
                flat = b.reshape(r.batch_shape + (r.n_out,))
                if bias.kernel:  # the base kernel, as (batch..., in, out)
                    extra = (tree.to_matrix(extra[0], r),) + tuple(extra[1:])
                out = vmapped(fn, len(r.batch))(flat, trainable, frozen, *extra)
                return out.astype(b.dtype).reshape(b.shape)

            return lifted

        hook = BiasHook(
            name=bias.name,
            apply=lift_bias(bias.apply),
            unapply=lift_bias(bias.unapply) if bias.unapply else None,
            required=bias.required,
            kernel=bias.kernel,
        )

    return Adapter(
        init=init,
        apply=apply,
        unapply=unapply,
        fold_aux=fold_aux,
        bias=hook,
        dropout=float(dropout),
        name=name,
        factored=None if factored_matrix is None else FactoredForm(
            dimension_numbers=dimension_numbers, terms=factored_matrix,
            apply=apply_matrix),
        dimension_numbers=dimension_numbers,
        relayout=lambda dims: lift_matrix(**again, dimension_numbers=dims),
        hyperparameters=tuple(hyperparameters),
        shared=shared,
    )
