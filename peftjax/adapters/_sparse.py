# SPDX-License-Identifier: Apache-2.0
"""Sparse deltas: ``W' = W + scatter_add(0, indices, values)`` with fixed ``k``.

Scaling Sparse Fine-Tuning to Large Language Models (SpIEL). Ansell, Vulić,
Sterz, Korhonen, Ponti, 2024. https://arxiv.org/abs/2401.16405
Composable Sparse Fine-Tuning for Cross-Lingual Transfer (LT-SFT). Ansell,
Ponti, Korhonen, Vulić, ACL 2022. https://arxiv.org/abs/2110.07560

Per matrix (stacked leaves: per slice of the batch axes) the adapter keeps
``k`` flat positions ``indices`` (frozen, int32, unique) and ``k`` trainable
``values`` (the delta ``φ − θ0``). ``k`` is fixed for the life of a run, so
shapes never change and a training step compiles once; drop-and-regrow
(``peftjax.masks``) only rewrites the contents of ``indices``.

Equation map (SpIEL §3, "φ = θ0 + scatter(η, ι)") ↔ ``apply``; its inverse
(subtracting the same scatter) ↔ ``unapply``; the flat position of entry
``(i, j)`` of an ``(in, out)`` matrix is ``i·out + j`` (row-major over the
leaf's non-batch axes). ``sparse_to_compact`` / ``sparse_from_compact`` are the
export format (indices + values) and its validating loader.

Factored form (``peftjax.factored``): ``y[..., j] += x[..., i]·v`` for every
stored ``(i·out + j, v)``, a gather and a scatter-add of ``k`` entries per
token instead of a weight-sized delta.

Exports: ``SparseSupport``, ``SparseValues``, ``sparse_delta``,
``sparse_num``, ``sparse_to_compact``, ``sparse_from_compact``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

_MAX_FLAT = 2**31 - 1
_INDICES = "indices"
_VALUES = "values"


class SparseSupport(NamedTuple):
    """Frozen positions of a sparse delta (per matrix; stacked adds batch axes).

    Attributes:
      indices: ``(k,)`` int32 flat positions in the ``(in, out)`` matrix
        (row-major), unique.
    """

    indices: jax.Array


class SparseValues(NamedTuple):
    """Trainable values of a sparse delta.

    Attributes:
      values: ``(k,)`` the delta at ``indices``, dtype ``param_dtype``.
    """

    values: jax.Array


def sparse_num(size: int, *, density: float | None = None, k: int | None = None,
               name: str = "sparse_delta") -> int:
    """Returns the number ``k`` of (index, value) pairs for a matrix of ``size``.

    ``k = int(density · size)`` (the reference floors), or ``k`` itself.

    Args:
      size: ``in·out`` of one matrix.
      density: fraction in ``(0, 1]``.
      k: an explicit count in ``[1, size]`` (exclusive with ``density``).
      name: used in error messages.

    Returns:
      ``k`` as a Python int.

    Raises:
      ValueError: ``k`` is 0 or larger than ``size``.

    Example:
      >>> sparse_num(30, density=0.1), sparse_num(30, k=7)
      (3, 7)
    """
    num = int(density * size) if k is None else int(k)
    if num < 1:
        raise ValueError(
            f"{name}: density={density} of a matrix of {size} entries gives k=0; "
            "raise the density or exclude this leaf with a `then=None` rule"
        )
    if num > size:
        raise ValueError(
            f"{name}: k={num} is larger than the matrix ({size} entries)"
        )
    if size > _MAX_FLAT:
        raise ValueError(
            f"{name}: a matrix of {size} entries needs int64 indices; split it "
            "with batch axes (dimension_numbers)"
        )
    return num


def _check_layout(resolved: tree.ResolvedDims, name: str) -> None:
    if resolved.permutation != tuple(range(len(resolved.shape))):
        raise ValueError(
            f"{name}: the matrix view {resolved.permutation} of shape "
            f"{resolved.shape} reorders axes; sparse deltas need batch axes "
            "first, then reduction, then output axes in the leaf's order, so "
            "flat indices are the leaf's own row-major positions"
        )


def sparse_delta(
    density: float | None = None,
    *,
    k: int | None = None,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """Sparse delta: ``W' = W + scatter_add(zeros, indices, values)`` per matrix.

    Initial ``indices`` are a uniform random ``k``-subset of the ``in·out``
    positions, sorted (as the reference); initial ``values`` are 0, so the
    model is unchanged at init. Trainable parameters: ``k`` per matrix (times
    the product of batch axes for stacked kernels); optimizer state is
    ``k``-sized too, never weight-sized. The frozen ``indices`` cost
    ``4·k`` bytes per matrix. Drop-and-regrow (``peftjax.masks``) changes the
    indices' contents, never their shape.

    Args:
      density: fraction of each matrix that is tunable, in ``(0, 1]``;
        ``k = int(density·in·out)`` (static).
      k: an explicit per-matrix count instead of ``density`` (static).
      dimension_numbers: the kernel's matrix view; None for a 2-D ``(in,
        out)`` kernel (``tree.assign`` fills in stacked ``(L, in, out)``
        views). The view must keep the leaf's axis order.
      param_dtype: storage dtype of ``values`` (float32 by default; the sum is
        computed in the wider of it and the base dtype, then cast back).

    Returns:
      An ``Adapter`` with trainable ``SparseValues(values)`` and frozen
      ``SparseSupport(indices)``; exact ``unfold``.

    Static arguments: all.

    Raises:
      ValueError: ``density`` outside ``(0, 1]``, both or neither of
        ``density``/``k``; at init ``k = 0`` or ``k > in·out``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = sparse_delta(0.25)
      >>> t, f = ad.init(jax.random.key(0), jnp.zeros((4, 2)))
      >>> t.values.shape, f.indices.dtype
      ((2,), dtype('int32'))
      >>> w = ad.apply(jnp.zeros((4, 2)), SparseValues(jnp.array([1.0, 2.0])), f)
      >>> float(w.sum()), int((w != 0).sum())
      (3.0, 2)

    References:
      Ansell et al., 2024, https://arxiv.org/abs/2401.16405 ; Ansell et al.,
      2022, https://arxiv.org/abs/2110.07560
    """
    if (density is None) == (k is None):
        raise ValueError(
            f"sparse_delta: give exactly one of density and k, got density="
            f"{density!r}, k={k!r}"
        )
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"sparse_delta: density must be a float, got {density!r}")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(
                f"sparse_delta: density must be in (0, 1], got density={density}"
            )
        density = float(density)
    else:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"sparse_delta: k must be a positive int, got {k!r}")
        if k < 1:
            raise ValueError(f"sparse_delta: k must be >= 1, got k={k}")
    param_dtype = jnp.dtype(param_dtype)
    label = f"density={density}" if density is not None else f"k={k}"
    name = f"sparse_delta({label})"

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError(f"{name} takes no stats")
        size = w.shape[0] * w.shape[1]
        num = sparse_num(size, density=density, k=k,
                         name=f"{name} on a matrix of shape {tuple(w.shape)}")
        idx = jax.random.permutation(key, size)[:num]
        idx = jnp.sort(idx).astype(jnp.int32)
        return (SparseValues(jnp.zeros((num,), param_dtype)),
                SparseSupport(idx))

    def scatter(w, t, f, sign):
        ct = _lowrank.compute_dtype(w.dtype, t.values.dtype)
        flat = w.astype(ct).reshape(-1)
        vals = t.values.astype(ct)
        flat = flat.at[f.indices].add(vals if sign > 0 else -vals,
                                      indices_are_sorted=False, unique_indices=True)
        return flat.reshape(w.shape)

    def apply_matrix(w, t, f):
        return scatter(w, t, f, 1)

    def unapply_matrix(w, t, f, aux):
        return scatter(w, t, f, -1)

    def factored_matrix(w, t, f):
        n_out = w.shape[1]
        rows, cols = f.indices // n_out, f.indices % n_out

        def delta(x):
            # y[..., j] += x[..., i]·v for each (i·out + j, v): O(k) per token.
            ct = _lowrank.compute_dtype(x.dtype, t.values.dtype)
            vals = t.values.astype(ct).reshape((1,) * (x.ndim - 1) + (-1,))
            contrib = x[..., rows].astype(ct) * vals
            out = jnp.zeros(x.shape[:-1] + (n_out,), ct)
            return out.at[..., cols].add(contrib)

        return _protocol.FactoredTerms(delta=delta)

    adapter = _lift.lift_matrix(
        name=name,
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
    )

    def init(key, w, *, stats=None):
        shape = tuple(np.shape(w))
        if len(shape) >= 2:
            _check_layout(tree.resolve(dimension_numbers, shape, path=name), name)
        return adapter.init(key, w, stats=stats)

    return adapter._replace(init=init, relayout=lambda dims: sparse_delta(
        density, k=k, dimension_numbers=dims, param_dtype=param_dtype))


def sparse_to_compact(trainable: dict[str, Any], frozen: dict[str, Any]
                      ) -> dict[str, np.ndarray]:
    """Exports sparse deltas as a flat dict of host arrays (indices + values).

    Keys are ``"<path>/indices"`` (int32, ``(batch..., k)``) and
    ``"<path>/values"``; save it with ``np.savez`` or safetensors. Paths of a
    state that are not sparse deltas are skipped.

    Args:
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.

    Returns:
      ``{key: np.ndarray}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> p = {"w": jnp.zeros((4, 4))}
      >>> a = tree.assign(p, [tree.Rule(where="w", then=adapters.sparse_delta(k=2))])
      >>> s = adapters.init(a, jax.random.key(0), p)
      >>> sorted(adapters.sparse_to_compact(*s))
      ['w/indices', 'w/values']
    """
    out: dict[str, np.ndarray] = {}
    for path, t in trainable.items():
        f = frozen.get(path)
        if isinstance(t, SparseValues) and isinstance(f, SparseSupport):
            out[f"{path}/{_INDICES}"] = np.asarray(jax.device_get(f.indices))
            out[f"{path}/{_VALUES}"] = np.asarray(jax.device_get(t.values))
    return out


def sparse_from_compact(compact: dict[str, Any], params: Any
                        ) -> tuple[dict[str, _protocol.Adapter], _protocol.AdapterState]:
    """Loads exported sparse deltas, validating them against ``params``.

    The leading axes of each ``indices`` array are the leaf's batch axes (a
    stacked ``(L, in, out)`` kernel exported per layer has ``(L, k)``); the
    rest of the leaf is one flat row-major range.

    Args:
      compact: ``{"<path>/indices": ..., "<path>/values": ...}`` as written by
        ``sparse_to_compact`` (or ``peftjax.masks.lt_sft_export``).
      params: the base tree the deltas apply to.

    Returns:
      ``(assignment, AdapterState)`` ready for ``materialize``/``fold``.

    Raises:
      ValueError: a path that is not a leaf, a missing half, mismatched
        shapes, a non-integer index dtype, an index out of range or a
        duplicate index (each naming the path, shape and offending value).

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> p = {"w": jnp.zeros((2, 3))}
      >>> c = {"w/indices": np.array([5, 0], np.int32),
      ...      "w/values": np.array([1.0, 2.0], np.float32)}
      >>> a, s = sparse_from_compact(c, p)
      >>> from peftjax import adapters
      >>> adapters.fold(a, p, *s)["w"].tolist()
      [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    flat = tree.leaves_by_path(params)
    paths = sorted({key.rpartition("/")[0] for key in compact})
    assignment: dict[str, _protocol.Adapter] = {}
    trainable: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for path in paths:
        ik, vk = f"{path}/{_INDICES}", f"{path}/{_VALUES}"
        if ik not in compact or vk not in compact:
            raise ValueError(f"sparse_from_compact: {path!r} needs both {ik!r} and {vk!r}")
        if path not in flat:
            raise ValueError(f"sparse_from_compact: {path!r} is not a leaf of params")
        idx = np.asarray(compact[ik])
        val = np.asarray(compact[vk])
        leaf = flat[path]
        shape = tuple(np.shape(leaf))
        where = f"sparse_from_compact: {path!r} (leaf shape {shape}, dtype {leaf.dtype})"
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{where}: indices must be integers, got dtype {idx.dtype}")
        if idx.shape != val.shape or idx.ndim < 1:
            raise ValueError(
                f"{where}: indices shape {idx.shape} and values shape {val.shape} "
                "must be equal (batch..., k)"
            )
        nb = idx.ndim - 1
        if shape[:nb] != idx.shape[:nb]:
            raise ValueError(
                f"{where}: indices shape {idx.shape} does not match the leaf's "
                f"leading (batch) axes"
            )
        size = math.prod(shape[nb:])
        if size > _MAX_FLAT:
            raise ValueError(f"{where}: {size} entries per slice need int64 indices")
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            bad = idx[(idx < 0) | (idx >= size)].ravel()[0]
            raise ValueError(
                f"{where}: index {int(bad)} is out of range [0, {size})"
            )
        rows = idx.reshape(-1, idx.shape[-1])
        for r, row in enumerate(rows):
            uniq, counts = np.unique(row, return_counts=True)
            if (counts > 1).any():
                raise ValueError(
                    f"{where}: duplicate index {int(uniq[counts > 1][0])} in slice {r}"
                )
        if len(shape) - nb < 2:
            raise ValueError(
                f"{where}: sparse deltas target matrices (>= 2 non-batch axes)"
            )
        dims = tree.DimensionNumbers(
            reduction_axis=tuple(range(nb, len(shape) - 1)),
            output_axis=len(shape) - 1,
            batch_axis=tuple(range(nb)),
        )
        assignment[path] = sparse_delta(k=int(idx.shape[-1]), dimension_numbers=dims,
                                        param_dtype=val.dtype)
        trainable[path] = SparseValues(jnp.asarray(val))
        frozen[path] = SparseSupport(jnp.asarray(idx, jnp.int32))
    return assignment, _protocol.AdapterState(trainable=trainable, frozen=frozen)
