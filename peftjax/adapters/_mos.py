# SPDX-License-Identifier: Apache-2.0
"""MoS: LoRA factors assembled from global pools of shards (Mixture of Shards).

MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of
Shards. Wang, Chen, Chen, Dong, Xue, Jiang, Kong & Wu, ICLR 2025.
https://arxiv.org/abs/2410.00938

Section 3 of the paper: every low-rank vector (a row of ``A (r, in)``, a
column of ``B (out, r)``) is cut into ``l`` shards (vector sharding) and
each shard is taken from a pool shared by all layers (inter-layer sharing);
each layer selects its shards with a fixed MoE-like routing (subset
selection), ``A`` and ``B`` select independently (pair dissociation), and
part of each layer's rank uses shards of its own (shard privatisation);
``ΔW = (α/r) · B A`` as in LoRA. The authors' code (``modules/Tied_LoRA.py``,
``ft_mode="mos"``), which this module follows: for ``L`` adapted matrices
of one shape, with equivalent rank ``R`` (``valid_param_lora_r``) and
private rank ``p`` (``valid_param_private_r``), the pool has ``R·L·l``
shards; the first ``(R-p)·L·l`` are public and matrix ``k`` owns the
``p·l`` shards after them from ``k·p·l``; its ``r·l`` shard indices are
``randperm(public)[:(r-p)·l]`` followed by its private ones, drawn again for
``B``; index ``j·l + i`` is shard ``i`` of rank vector ``j``. The pool of
``A`` starts kaiming-uniform with fan-in ``in`` (bound ``1/√in``), that of
``B`` at zero, so ``ΔW = 0`` at init. The trainable count is LoRA's at rank
``R``: ``R·L·(in + out)``.

Here each adapted shape ``(in, out)`` has its own public pools
``trainable["@shared"]["<pool>_<in>x<out>_a"]`` ``(public_shards, in/l)``
and ``..._b`` ``(public_shards, out/l)`` (the authors keep one pool per
projection type: give each type its own ``pool`` name for that), and each
matrix keeps its private shards in its own parameters (``private_a (p·l,
in/l)``, ``private_b (p·l, out/l)``) instead of in the pool: the same
model, and a stacked leaf's layers stay independent. The public indices are
drawn with ``np.random.default_rng(seed)`` over the assignment (path order,
each stacked leaf's layers in turn), not torch's ``randperm``.

Factored form: ``(α/r)·(x@a)@b``, the LoRA form (``a = Aᵀ (in, r)``,
``b = Bᵀ (r, out)`` gathered from the pools): ``2·r·(in+out)`` FLOPs per row.

Exports: ``MoSParams``, ``MoSIndices``, ``mos``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _shared


class MoSParams(NamedTuple):
    """Trainable MoS parameters of one matrix.

    Attributes:
      pool_a: ``Shared``: the public shards of ``A`` ``(public_shards, in/l)``.
      pool_b: ``Shared``: the public shards of ``B`` ``(public_shards, out/l)``.
      private_a: ``(p·l, in/l)``, this matrix's own shards of ``A``.
      private_b: ``(p·l, out/l)``, this matrix's own shards of ``B``.
    """

    pool_a: Any
    pool_b: Any
    private_a: jax.Array
    private_b: jax.Array


class MoSIndices(NamedTuple):
    """Frozen shard selection of one matrix (public part).

    Attributes:
      indices_a: ``(r-p, l)`` int32: shard ``i`` of ``A``'s row ``j`` is
        ``pool_a[indices_a[j, i]]``.
      indices_b: ``(r-p, l)`` int32, likewise for ``B``'s columns.
    """

    indices_a: jax.Array
    indices_b: jax.Array


def _check_int(label: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"mos: {label} must be an int >= {low}, got {v!r}")
    return v


def mos(
    rank: int = 8,
    *,
    pool_rank: int = 2,
    private_rank: int = 1,
    num_shards: int = 4,
    alpha: float = 16.0,
    public_shards: int | None = None,
    seed: int = 0,
    pool: str = "mos",
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """MoS adapter: ``W' = W + (α/r)·a @ b`` with factors made of pooled shards.

    The identity at init (``B``'s shards start at 0). Trainable parameters:
    per shape, ``public_shards·(in+out)/l`` shared, plus ``p·(in+out)`` per
    matrix; with the default ``public_shards = (R-p)·L·l`` (``L`` matrices
    of that shape in the assignment) that is LoRA's count at rank ``R =
    pool_rank``: ``R·L·(in+out)``. Each matrix draws ``(r-p)·l`` distinct
    public shards, so the pool needs at least that many (``(R-p)·L ≥ r-p``
    by default; ``ValueError`` otherwise). Exact inverse (``unfold``): yes. Factored
    form: ``(α/r)·(x@a)@b`` (LoRA's, ``2·r·(in+out)`` FLOPs per row). The
    defaults are this library's (the authors' scripts take every one as an
    argument; their LoRA alpha is 16). On one leaf alone use
    ``adapters.unshare``.

    Args:
      rank: ``r``, the active rank of each matrix.
      pool_rank: ``R``, the equivalent rank of the trainable parameters (the
        authors' ``valid_param_lora_r``).
      private_rank: ``p ≤ min(r, R)``, the rank of each matrix's private
        shards (``valid_param_private_r``).
      num_shards: ``l``, shards per low-rank vector (``num_chunk_per_vec``);
        it must divide ``in`` and ``out``.
      alpha: LoRA's ``α`` (scale ``α/r``).
      public_shards: the public pool's size per shape; None: ``(R-p)·L·l``.
      seed: seed of the shard selection.
      pool: the name of the pools; leaves whose adapters name the same pool
        share it (one pool pair per adapted shape).
      dropout: adapter-input dropout (factored path only).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the shards.

    Returns:
      An ``Adapter`` with trainable ``MoSParams`` (the public pools as
      ``Shared`` placeholders) and frozen ``MoSIndices``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"l0": jnp.zeros((8, 4)), "l1": jnp.zeros((8, 4))}
      >>> ad = mos(3, pool_rank=2, private_rank=1, num_shards=2)
      >>> a = tree.assign(params, [tree.Rule(where="l.", then=ad)])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> s.trainable["@shared"]["mos_8x4_a"].shape, s.frozen["l0"].indices_a.shape
      ((4, 4), (2, 2))
      >>> adapters.num_trainable(s.trainable)  # R·L·(in+out) = 2·2·12
      48

    References:
      Wang et al., 2025, https://arxiv.org/abs/2410.00938
    """
    rank = _lora.check_rank(rank, "mos")
    pool_rank = _check_int("pool_rank", pool_rank, 1)
    private_rank = _check_int("private_rank", private_rank, 0)
    num_shards = _check_int("num_shards", num_shards, 1)
    if private_rank > min(rank, pool_rank):
        raise ValueError(f"mos: private_rank={private_rank} exceeds rank={rank} or "
                         f"pool_rank={pool_rank}")
    if public_shards is not None:
        public_shards = _check_int("public_shards", public_shards, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"mos: seed must be an int, got {seed!r}")
    if not isinstance(pool, str) or not pool or pool.startswith("@"):
        raise ValueError(f"mos: pool must be a non-empty name, got {pool!r}")
    param_dtype = jnp.dtype(param_dtype)
    scale = float(alpha) / rank
    n_pub, n_priv = rank - private_rank, private_rank * num_shards

    def names(n_in, n_out):
        return f"{pool}_{n_in}x{n_out}_a", f"{pool}_{n_in}x{n_out}_b"

    def bound(n_in):
        # kaiming_uniform(a=√5) with fan-in in: gain √(1/3), bound gain·√(3/in).
        return 1.0 / math.sqrt(n_in)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("mos takes no stats")
        n_in, n_out = w.shape
        for side, n in (("input", n_in), ("output", n_out)):
            if n % num_shards:
                raise ValueError(
                    f"mos: the {side} size {n} of the matrix (in={n_in}, out={n_out}) "
                    f"is not a multiple of num_shards={num_shards}")
        na, nb = names(n_in, n_out)
        b = bound(n_in)
        pa = jax.random.uniform(key, (n_priv, n_in // num_shards), jnp.float32, -b, b)
        return MoSParams(
            pool_a=_shared.Shared(na), pool_b=_shared.Shared(nb),
            private_a=pa.astype(param_dtype),
            private_b=jnp.zeros((n_priv, n_out // num_shards), param_dtype),
        ), MoSIndices(indices_a=jnp.zeros((n_pub, num_shards), jnp.int32),
                      indices_b=jnp.zeros((n_pub, num_shards), jnp.int32))

    def factors(t, f):
        ct = _lowrank.compute_dtype(t.private_a.dtype, t.pool_a.dtype)
        n_in = t.private_a.shape[-1] * num_shards
        n_out = t.private_b.shape[-1] * num_shards
        # Rank vector j = its l shards in order (index j·l + i in the authors' mask).
        rows_a = jnp.concatenate([
            t.pool_a.astype(ct)[f.indices_a].reshape(n_pub, n_in),
            t.private_a.astype(ct).reshape(private_rank, n_in)])       # A (r, in)
        rows_b = jnp.concatenate([
            t.pool_b.astype(ct)[f.indices_b].reshape(n_pub, n_out),
            t.private_b.astype(ct).reshape(private_rank, n_out)])      # Bᵀ (r, out)
        return _lowrank.LowRank(left=rows_a.T, right=rows_b, scale=scale)

    def init_pools(key, leaves):
        shapes: dict[tuple[int, int], list[tuple[str, tuple[int, ...]]]] = {}
        for path, (_, _, f) in leaves.items():
            batch = tuple(f.indices_a.shape[:-2])
            n_in = leaves[path][1].private_a.shape[-1] * num_shards
            n_out = leaves[path][1].private_b.shape[-1] * num_shards
            shapes.setdefault((n_in, n_out), []).append((path, batch))
        rng = np.random.default_rng(seed)
        trainable, new = {}, {}
        for s_i, ((n_in, n_out), members) in enumerate(shapes.items()):
            count = sum(math.prod(b) for _, b in members)
            size = ((pool_rank - private_rank) * count * num_shards
                    if public_shards is None else public_shards)
            if n_pub * num_shards > size:
                raise ValueError(
                    f"mos: matrices (in={n_in}, out={n_out}) need {n_pub * num_shards} "
                    f"distinct public shards each (rank - private_rank = {n_pub}, "
                    f"num_shards={num_shards}), but the pool has {size}; raise "
                    "pool_rank or public_shards, or lower rank")
            for path, batch in members:
                ia, ib = [], []
                for _ in range(math.prod(batch)):
                    ia.append(rng.permutation(size)[:n_pub * num_shards])
                    ib.append(rng.permutation(size)[:n_pub * num_shards])
                shape = batch + (n_pub, num_shards)
                new[path] = (leaves[path][1], MoSIndices(
                    indices_a=jnp.asarray(np.reshape(ia, shape), jnp.int32),
                    indices_b=jnp.asarray(np.reshape(ib, shape), jnp.int32)))
            na, nb = names(n_in, n_out)
            b = bound(n_in)
            pa = jax.random.uniform(jax.random.fold_in(key, s_i),
                                    (size, n_in // num_shards), jnp.float32, -b, b)
            trainable[na] = pa.astype(param_dtype)
            trainable[nb] = jnp.zeros((size, n_out // num_shards), param_dtype)
        return _shared.SharedParts(trainable=trainable, leaves=new)

    return _lift.lift_matrix(
        name=(f"mos(rank={rank}, pool_rank={pool_rank}, private_rank={private_rank}, "
              f"num_shards={num_shards}, pool={pool!r})"),
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("pool_rank", pool_rank),
                         ("private_rank", private_rank), ("num_shards", num_shards),
                         ("alpha", float(alpha)), ("public_shards", public_shards),
                         ("seed", seed), ("pool", pool)),
        shared=_shared.SharedInit(
            group=pool,
            config=("mos", rank, pool_rank, private_rank, num_shards, public_shards,
                    seed, param_dtype.name),
            init=init_pools),
        **_lowrank.low_rank_forms(factors),
    )
