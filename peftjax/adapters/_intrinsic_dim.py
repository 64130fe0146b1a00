# SPDX-License-Identifier: Apache-2.0
"""Intrinsic dimension: train a d-dim vector in a fixed random subspace.

Measuring the Intrinsic Dimension of Objective Landscapes. Li, Farkhoor,
Liu & Yosinski, ICLR 2018. https://arxiv.org/abs/1804.08838

Section 2 of the paper: ``θ^(D) = θ_0^(D) + P θ^(d)`` (Eq. 2) with a frozen
random ``P (D, d)`` and only ``θ^(d)`` trained, started at 0 (so the model
starts at ``θ_0``). The paper's projections (its Section 2 and S5): dense
Gaussian ``P`` with columns normalised to unit length, a sparse random ``P``
(Li, Hastie & Church 2006: entries ``±√s`` with probability ``1/(2s)`` each,
0 otherwise, ``s = √D``) and the Fastfood transform (Le, Sarlós & Smola
2013; ``adapters.said`` documents it). Here ``D`` counts the entries of
every adapted matrix (one ``θ_d`` shared by all of them, ``adapters.Shared``)
and each matrix reads its own rows of ``P``: ``ΔW_i = reshape(P_i θ_d)``.

Nothing of ``P`` is stored: each matrix's block is regenerated inside
``apply`` from ``seed`` and the matrix's index (frozen int32, assigned by
``adapters.init`` over the whole assignment in path order, each stacked
leaf's layers in turn). Dense and sparse blocks are drawn ``chunk`` columns
at a time (a ``lax.scan`` with rematerialisation), so memory stays at
``in·out·chunk``. Deviation from the paper: the dense columns are scaled by
``1/√D`` (unit norm in expectation) instead of being normalised exactly,
which would need a pass over all of ``P`` at init; the sparse entries are
scaled the same way (``±√(s/D)``). JAX's generator does not reproduce the
authors' (TensorFlow / torch) draws.

Factored form: none cheaper than the weight space: the delta is a dense
``(in, out)`` block of ``P θ_d`` (generating it costs ``2·in·out·d`` FLOPs
for dense and sparse projections, ``O(L log L)`` with ``L = 2^⌈log2(in·out)⌉``
for Fastfood), so ``FactoredTerms.delta`` forms it once and adds
``x @ ΔW`` (``2·in·out`` FLOPs per row).

Exports: ``IntrinsicParams``, ``IntrinsicProjection``, ``intrinsic_dim``,
``fastfood``, ``fastfood_vars``, ``fastfood_transform``, ``projection_matrix``,
``walsh_hadamard``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol, _shared

PROJECTIONS = ("dense", "sparse", "fastfood")
# Largest dense/sparse block (entries) drawn at once: in·out·chunk ≤ this.
_BLOCK = 1 << 22


class IntrinsicParams(NamedTuple):
    """Trainable parameters of one leaf.

    Attributes:
      theta_d: ``Shared(vector name)``: the one vector ``θ_d (d,)`` of the
        whole model, stored in ``AdapterState.trainable["@shared"]``.
    """

    theta_d: Any


class IntrinsicProjection(NamedTuple):
    """Frozen per-matrix data from which ``P``'s block is regenerated.

    Attributes:
      index: int32 ``()``, the matrix's index over the assignment (its block
        of ``P`` is drawn from ``fold_in(key(seed), index)``).
      scale: ``()``, ``1/√D`` (dense, sparse) or 1 (Fastfood).
      density: ``()``, the sparse projection's ``1/s = 1/√D`` (1 otherwise).
    """

    index: jax.Array
    scale: jax.Array
    density: jax.Array


def walsh_hadamard(x: jax.Array) -> jax.Array:
    """Unnormalised Walsh-Hadamard transform ``H x`` along the last axis.

    Args:
      x: ``(..., L)`` with ``L`` a power of two.

    Returns:
      ``H_L x`` (Sylvester ordering, entries ±1, no ``1/√L``), ``O(L log L)``.

    Example:
      >>> import jax.numpy as jnp
      >>> walsh_hadamard(jnp.array([1.0, 0.0, 0.0, 0.0]))
      Array([1., 1., 1., 1.], dtype=float32)
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"walsh_hadamard: length {n} is not a power of two")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(lead + (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
        h *= 2
    return x


def _fastfood_length(size: int) -> int:
    return 1 << max(0, math.ceil(math.log2(size)))


@functools.partial(jax.jit, static_argnames=("size", "dtype"))
def fastfood_vars(size: int, key: jax.Array, dtype: Any = jnp.float32) -> tuple:
    """Draws the Fastfood diagonals and permutation for an output of ``size``.

    Args:
      size: the output length ``D``; the transform length is
        ``L = 2^⌈log2 D⌉``.
      key: a PRNG key.
      dtype: dtype of the diagonals.

    Returns:
      ``(B (L,) ±1, Π (L,) int32 permutation, G (L,) N(0, 1))``.

    Example:
      >>> import jax
      >>> [x.shape for x in fastfood_vars(6, jax.random.key(0))]
      [(8,), (8,), (8,)]
    """
    n = _fastfood_length(size)
    kb, kp, kg = jax.random.split(key, 3)
    return (jax.random.rademacher(kb, (n,), dtype),
            jax.random.permutation(kp, n).astype(jnp.int32),
            jax.random.normal(kg, (n,), dtype))


def fastfood_transform(theta: jax.Array, size: int, bb: jax.Array, perm: jax.Array,
                       gg: jax.Array) -> jax.Array:
    """``V θ`` with ``V = H G Π H B`` given its diagonals and permutation.

    ``θ (d,)`` is zero-padded to ``L = len(B)``, multiplied by ``B``,
    Hadamard-transformed, permuted (``v[Π]``), scaled by ``G`` and
    transformed again; the first ``size`` entries are divided by
    ``√(L·ΣG²)·√(size/L)`` (the normalisation of the intrinsic-dimension
    authors' code).

    Args:
      theta: ``(d,)`` with ``d ≤ L``.
      size: the output length (``≤ L``).
      bb: ``(L,)`` ±1.
      perm: ``(L,)`` a permutation of ``range(L)``.
      gg: ``(L,)`` Gaussian diagonal.

    Returns:
      ``(size,)`` in the wider of ``theta``'s and ``gg``'s dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> one = jnp.ones(2)
      >>> fastfood_transform(jnp.array([1.0]), 2, one, jnp.arange(2), one)
      Array([1., 0.], dtype=float32)
    """
    n = bb.shape[-1]
    d = theta.shape[-1]
    if d > n:
        raise ValueError(f"fastfood: the vector's length {d} exceeds the transform "
                         f"length {n} of an output of size {size}")
    ct = _lowrank.compute_dtype(theta.dtype, gg.dtype)
    gg = gg.astype(ct)
    v = jnp.pad(theta.astype(ct), (0, n - d)) * bb.astype(ct)
    v = walsh_hadamard(v)[perm] * gg
    v = walsh_hadamard(v)[:size]
    return v / (jnp.sqrt(n * jnp.sum(gg * gg)) * math.sqrt(size / n))


def fastfood(theta: jax.Array, size: int, key: jax.Array) -> jax.Array:
    """The Fastfood projection ``V θ`` (``V = H G Π H B``) of a ``d`` vector to ``size``.

    ``fastfood_transform`` with ``fastfood_vars(size, key)``: ``B, Π, G``
    are drawn from ``key`` (never stored).

    Args:
      theta: ``(d,)`` with ``d ≤ 2^⌈log2 size⌉``.
      size: the output length ``D``.
      key: a PRNG key.

    Returns:
      ``(size,)``, computed in at least float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> fastfood(jnp.ones(3), 6, jax.random.key(0)).shape
      (6,)
    """
    ct = _lowrank.compute_dtype(theta.dtype, jnp.float32)
    return fastfood_transform(theta.astype(ct), size, *fastfood_vars(size, key, ct))


def _chunk_size(size: int, d: int) -> int:
    return max(1, min(d, _BLOCK // max(size, 1)))


@functools.partial(jax.jit, static_argnames=("kind", "size", "chunk", "ct"))
def _columns(kind: str, key: jax.Array, start: Any, size: int, chunk: int,
             density: jax.Array, ct: Any) -> jax.Array:
    """Columns ``start .. start+chunk`` of ``P_i``: ``(size, chunk)``."""
    k = jax.random.fold_in(key, start)
    if kind == "dense":
        return jax.random.normal(k, (size, chunk), ct)
    u = jax.random.uniform(k, (size, chunk), ct)
    half = jnp.asarray(density, ct) / 2
    sign = jnp.where(u < half, -1.0, 0.0) + jnp.where(u >= 1 - half, 1.0, 0.0)
    return sign.astype(ct) * jax.lax.rsqrt(jnp.asarray(density, ct))


def projection_matrix(kind: str, key: jax.Array, size: int, d: int,
                      density: Any = 1.0, dtype: Any = jnp.float32) -> jax.Array:
    """A matrix's block ``P_i (size, d)`` of a dense or sparse projection, unscaled.

    What ``intrinsic_dim`` regenerates ``chunk`` columns at a time inside
    ``apply`` (for analysis and tests; ``apply`` never forms it whole).

    Args:
      kind: ``"dense"`` (N(0, 1)) or ``"sparse"`` (``±1/√ρ`` with probability
        ``ρ/2`` each, 0 otherwise).
      key: the matrix's key (``fold_in(key(seed), index)``).
      size: ``in·out``.
      d: the subspace dimension.
      density: ``ρ`` (sparse only).
      dtype: dtype of the draws.

    Returns:
      ``(size, d)``.

    Example:
      >>> import jax
      >>> projection_matrix("dense", jax.random.key(0), 6, 3).shape
      (6, 3)
    """
    if kind not in ("dense", "sparse"):
        raise ValueError(f"projection_matrix: kind must be 'dense' or 'sparse', "
                         f"got {kind!r}")
    chunk = _chunk_size(size, d)
    cols = [_columns(kind, key, s, size, chunk, density, dtype)
            for s in range(0, d, chunk)]
    return jnp.concatenate(cols, axis=1)[:, :d]


def _random_block(kind: str, key: jax.Array, theta: jax.Array, size: int,
                  density: jax.Array) -> jax.Array:
    """``P_i θ`` drawn ``chunk`` columns at a time (rematerialised under grad)."""
    d = theta.shape[-1]
    ct = _lowrank.compute_dtype(theta.dtype, jnp.float32)
    chunk = _chunk_size(size, d)
    if chunk == d:  # one block: no loop
        return _columns(kind, key, 0, size, d, density, ct) @ theta.astype(ct)
    nchunks = -(-d // chunk)
    th = jnp.pad(theta.astype(ct), (0, nchunks * chunk - d)).reshape(nchunks, chunk)
    starts = jnp.arange(nchunks, dtype=jnp.int32) * chunk

    @jax.checkpoint
    def body(acc, xs):
        t, start = xs  # padded entries of θ are 0: they add nothing
        return acc + _columns(kind, key, start, size, chunk, density, ct) @ t, None

    out, _ = jax.lax.scan(body, jnp.zeros((size,), ct), (th, starts))
    return out


@functools.partial(jax.jit, static_argnames=("kind", "seed", "size"))
def _block(kind: str, seed: int, theta: jax.Array, f: IntrinsicProjection,
           size: int) -> jax.Array:
    """This matrix's ``P_i θ`` (flat, ``size`` entries), in at least float32.

    Jitted (inlined under an outer ``jit``): run eagerly, the transform's
    many small operations compile as one program.
    """
    key = jax.random.fold_in(jax.random.key(seed), f.index)
    if kind == "fastfood":
        ct = _lowrank.compute_dtype(theta.dtype, jnp.float32)
        return fastfood(theta.astype(ct), size, key)
    return _random_block(kind, key, theta, size, f.density) * f.scale.astype(
        _lowrank.compute_dtype(theta.dtype, jnp.float32))


def _check_common(fn: str, dimension: Any, seed: Any, vector: Any) -> None:
    if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension <= 0:
        raise ValueError(f"{fn}: dimension must be a positive int, got {dimension!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{fn}: seed must be an int, got {seed!r}")
    if not isinstance(vector, str) or not vector or vector.startswith("@"):
        raise ValueError(f"{fn}: vector must be a non-empty name, got {vector!r}")


def build(
    *,
    fn: str,
    kind: str,
    dimension: int,
    seed: int,
    vector: str,
    said: bool,
    dimension_numbers: tree.DimensionNumbers | None,
    param_dtype: Any,
    params_type: Any,
    hyperparameters: tuple[tuple[str, Any], ...],
) -> _protocol.Adapter:
    """The adapter shared by ``intrinsic_dim`` and ``said`` (``said``: with ``λ_i``)."""
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        del key  # P comes from seed and the matrix index
        if stats is not None:
            raise ValueError(f"{fn} takes no stats")
        n_in, n_out = w.shape
        if kind == "fastfood" and dimension > _fastfood_length(n_in * n_out):
            raise ValueError(
                f"{fn}: dimension={dimension} exceeds the Fastfood length "
                f"{_fastfood_length(n_in * n_out)} of the matrix (in={n_in}, "
                f"out={n_out}); lower dimension or leave this matrix out")
        extra = {"lam": jnp.ones((), param_dtype)} if said else {}
        t = params_type(theta_d=_shared.Shared(vector), **extra)
        return t, IntrinsicProjection(index=jnp.zeros((), jnp.int32),
                                      scale=jnp.ones((), jnp.float32),
                                      density=jnp.ones((), jnp.float32))

    def delta(w, t, f):
        n_in, n_out = w.shape
        ct = _lowrank.compute_dtype(w.dtype, t.theta_d.dtype)
        d = _block(kind, seed, t.theta_d, f, n_in * n_out).reshape(n_in, n_out)
        if said:
            d = d * t.lam.astype(d.dtype)
        return ct, d.astype(ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        del aux
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return _protocol.FactoredTerms(
            delta=lambda x: x.astype(_lowrank.compute_dtype(x.dtype, ct)) @ d)

    def init_vector(key, leaves):
        del key  # θ_d starts at 0 (the model starts at θ_0)
        total = 0
        counts = {}
        for path, (w, _, f) in leaves.items():
            batch = tuple(f.index.shape)
            m = math.prod(batch)
            counts[path] = (batch, m)
            total += math.prod(_shared._leaf_shape(w))
        new, at = {}, 0
        for path, (_, t, _) in leaves.items():
            batch, m = counts[path]
            index = jnp.arange(at, at + m, dtype=jnp.int32).reshape(batch)
            at += m
            scale = 1.0 if kind == "fastfood" else 1.0 / math.sqrt(total)
            density = 1.0 / math.sqrt(total) if kind == "sparse" else 1.0
            new[path] = (t, IntrinsicProjection(
                index=index, scale=jnp.full(batch, scale, jnp.float32),
                density=jnp.full(batch, min(1.0, density), jnp.float32)))
        return _shared.SharedParts(
            trainable={vector: jnp.zeros((dimension,), param_dtype)}, leaves=new)

    return _lift.lift_matrix(
        name=f"{fn}(dimension={dimension}, projection={kind!r}, seed={seed}, "
             f"vector={vector!r})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        factored_matrix=factored_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=hyperparameters,
        shared=_shared.SharedInit(
            group=vector, config=(fn, kind, dimension, seed, param_dtype.name),
            init=init_vector),
    )


def intrinsic_dim(
    dimension: int,
    *,
    projection: str = "dense",
    seed: int = 0,
    vector: str = "intrinsic",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """Random-subspace training: ``W_i' = W_i + reshape(P_i θ_d)`` with one shared ``θ_d``.

    The identity at init (``θ_d = 0``). Trainable parameters: ``d =
    dimension`` in all, whatever the number of matrices. Exact inverse
    (``unfold``): yes (up to rounding). Factored form: ``x @ ΔW`` with the
    delta formed once (no cheaper form exists: ``2·in·out`` FLOPs per row).
    ``adapters.init`` numbers the matrices over the whole assignment; on one
    leaf alone use ``adapters.unshare``.

    Args:
      dimension: ``d``, the length of ``θ_d``.
      projection: ``"dense"`` (Gaussian, columns of expected unit norm),
        ``"sparse"`` (very sparse ±1, density ``1/√D``) or ``"fastfood"``
        (``H G Π H B`` per matrix; needs ``d ≤ 2^⌈log2(in·out)⌉``).
      seed: the projection's seed (``P`` is regenerated, never stored).
      vector: the name of the shared vector; leaves whose adapters name the
        same vector share it (and one numbering of their matrices).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``θ_d``.

    Returns:
      An ``Adapter`` with trainable ``IntrinsicParams`` (a ``Shared``
      placeholder) and frozen ``IntrinsicProjection``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"q": jnp.zeros((6, 4)), "v": jnp.zeros((6, 4))}
      >>> a = tree.assign(params, [tree.Rule(where="q|v", then=intrinsic_dim(5))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> adapters.num_trainable(s.trainable), int(s.frozen["v"].index)
      (5, 1)

    References:
      Li et al., 2018, https://arxiv.org/abs/1804.08838
    """
    _check_common("intrinsic_dim", dimension, seed, vector)
    if projection not in PROJECTIONS:
        raise ValueError(f"intrinsic_dim: projection must be one of {PROJECTIONS}, "
                         f"got {projection!r}")
    return build(fn="intrinsic_dim", kind=projection, dimension=dimension, seed=seed,
                 vector=vector, said=False, dimension_numbers=dimension_numbers,
                 param_dtype=param_dtype, params_type=IntrinsicParams,
                 hyperparameters=(("dimension", dimension), ("projection", projection),
                                  ("seed", seed), ("vector", vector)))
