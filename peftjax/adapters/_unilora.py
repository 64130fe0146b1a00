# SPDX-License-Identifier: Apache-2.0
"""UniLoRA: every LoRA entry of every adapted matrix read from one vector.

Uni-LoRA: One Vector is All You Need. Li et al., 2025.
https://arxiv.org/abs/2506.00799

The paper flattens all LoRA parameters of the model into ``θ_D (D,)`` and
reconstructs them from one trainable ``θ_d (d,)`` through a fixed isometric
projection ``θ_D = P θ_d``: each of the ``D`` entries belongs to one of ``d``
groups, and ``P`` has one non-zero per row, ``1/√n_j`` for the ``n_j``
members of group ``j``. Hugging Face PEFT (``tuners/unilora``), which this
module follows, assigns the groups with a balanced shuffle instead of
independent draws (each group gets ``⌊D/d⌋`` or ``⌈D/d⌉`` entries):
``np.random.default_rng(proj_seed)`` draws the ``D mod d`` extra groups
(``choice(d, D mod d, replace=False)``) and shuffles
``[repeat(arange(d), D div d), extras]``; the shuffled vector is cut, module
by module in the model's module order, into ``indices_A (r, in)`` then
``indices_B (out, r)`` (row-major, torch layout). Then
``A = θ_d[indices_A] · scales_A``, ``B = θ_d[indices_B] · scales_B`` and
``ΔW = B @ A`` (no scaling); ``θ_d`` starts ``U(±init_theta_d_bound)``
(``init_weights=False``: ``N(0, 1)``). Not the identity at init.
``unilora_indices`` reproduces that assignment with NumPy, bit for bit.

On a Flax kernel ``W (in, out)`` the update is ``ΔWᵀ = a @ b`` with ``a = Aᵀ
(in, r)`` and ``b = Bᵀ (r, out)``; the frozen indices and scales are kept
in that layout. ``θ_d`` is ONE trainable array shared by every leaf
(``adapters.Shared``), ``AdapterState.trainable["@shared"][vector]``; the
indices depend on every adapted matrix, so ``adapters.init`` assigns them
once for the whole assignment, in its (path) order, each stacked leaf's layers
in turn. (PEFT files name modules in the model's module order: the PEFT
reader re-assigns them in that order.) The factored path computes ``x@W +
(x@a)@b`` (the LoRA form; ``a`` and ``b`` are gathers of ``θ_d``).

Exports: ``UniLoRAParams``, ``UniLoRAIndices``, ``unilora``,
``unilora_indices``.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _shared


class UniLoRAParams(NamedTuple):
    """Trainable UniLoRA parameters of one leaf.

    Attributes:
      theta_d: ``Shared(vector name)``: the one vector ``θ_d (d,)`` shared by
        all leaves, stored in ``AdapterState.trainable["@shared"]``.
    """

    theta_d: Any


class UniLoRAIndices(NamedTuple):
    """Frozen positions in ``θ_d`` and normalisation of one matrix (Flax layout).

    Attributes:
      indices_a: ``(in, r)`` int32, PEFT's ``unilora_indices_A`` transposed.
      indices_b: ``(r, out)`` int32, PEFT's ``unilora_indices_B`` transposed.
      scales_a: ``(in, r)``, ``1/√n`` of each entry's group.
      scales_b: ``(r, out)``.
    """

    indices_a: jax.Array
    indices_b: jax.Array
    scales_a: jax.Array
    scales_b: jax.Array


def unilora_indices(shapes: Sequence[tuple[int, int, int]], theta_d_length: int,
                    proj_seed: int = 42) -> list[tuple[np.ndarray, ...]]:
    """PEFT's UniLoRA index assignment for matrices in module order.

    Args:
      shapes: ``(rank, n_in, n_out)`` of every adapted matrix, in the order
        PEFT visits the modules (``model.modules()``).
      theta_d_length: ``d``.
      proj_seed: PEFT's ``proj_seed``.

    Returns:
      Per matrix ``(indices_a (in, r), indices_b (r, out), scales_a (in, r),
      scales_b (r, out))`` as NumPy arrays (int32 indices, float32 scales),
      Flax layout.

    Example:
      >>> ia, ib, sa, sb = unilora_indices([(2, 3, 4)], 5)[0]
      >>> ia.shape, ib.shape, sorted(set(np.round(sa.ravel() ** -2).tolist()))
      ((3, 2), (2, 4), [2.0, 3.0])
    """
    d = int(theta_d_length)
    if d <= 0:
        raise ValueError(f"unilora_indices: theta_d_length must be positive, got {d}")
    sizes = [(int(r), int(i), int(o)) for r, i, o in shapes]
    total = sum(r * (i + o) for r, i, o in sizes)
    base, extra = divmod(total, d)
    rng = np.random.default_rng(int(proj_seed))
    data = np.repeat(np.arange(d), base)
    if extra:
        data = np.concatenate([data, rng.choice(d, size=extra, replace=False)])
    rng.shuffle(data)
    counts = np.bincount(data, minlength=d)
    inv = np.zeros(d, np.float32)
    used = counts > 0
    inv[used] = np.float32(1.0) / np.sqrt(counts[used].astype(np.float32))
    out, at = [], 0
    for r, n_in, n_out in sizes:
        ia = data[at:at + r * n_in].reshape(r, n_in).T
        at += r * n_in
        ib = data[at:at + n_out * r].reshape(n_out, r).T
        at += n_out * r
        out.append((ia.astype(np.int32), ib.astype(np.int32), inv[ia], inv[ib]))
    return out


def unilora(
    rank: int = 4,
    *,
    theta_d_length: int = 256,
    proj_seed: int = 42,
    init_theta_d_bound: float = 0.02,
    init_weights: bool = True,
    vector: str = "unilora",
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """UniLoRA adapter: ``W' = W + a @ b`` with every entry a scaled entry of ``θ_d``.

    Defaults are PEFT's (``UniLoraConfig``). Not the identity at init.
    Trainable parameters: ``d = theta_d_length`` in all, whatever the number
    of matrices (per matrix: none of its own). Exact inverse (``unfold``):
    yes. Factored form: ``(x@a)@b``. The indices are assigned by
    ``adapters.init`` over the whole assignment (``init`` on one leaf alone
    leaves them zero; ``adapters.unshare`` gives a leaf its own vector).

    Args:
      rank: ``r``.
      theta_d_length: ``d``, the length of the shared vector.
      proj_seed: seed of the index assignment.
      init_theta_d_bound: ``θ_d`` starts ``U(±bound)`` (``init_weights``).
      init_weights: False: ``θ_d`` starts ``N(0, 1)``.
      vector: the name of the shared vector; leaves whose adapters name the
        same vector share it and one index assignment.
      dropout: adapter-input dropout (factored path only).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``θ_d`` and the scales.

    Returns:
      An ``Adapter`` with trainable ``UniLoRAParams`` (a ``Shared``
      placeholder) and frozen ``UniLoRAIndices``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"q": jnp.zeros((6, 4)), "v": jnp.zeros((6, 4))}
      >>> a = tree.assign(params, [tree.Rule(where="q|v",
      ...                                    then=unilora(2, theta_d_length=7))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> adapters.num_trainable(s.trainable), s.frozen["v"].indices_a.shape
      (7, (6, 2))

    References:
      Li et al., 2025, https://arxiv.org/abs/2506.00799
    """
    rank = _lora.check_rank(rank, "unilora")
    if isinstance(theta_d_length, bool) or not isinstance(theta_d_length, int) or (
            theta_d_length <= 0):
        raise ValueError(f"unilora: theta_d_length must be a positive int, got "
                         f"{theta_d_length!r}")
    if not isinstance(vector, str) or not vector or vector.startswith("@"):
        raise ValueError(f"unilora: vector must be a non-empty name, got {vector!r}")
    bound = float(init_theta_d_bound)
    if init_weights and not bound > 0:
        raise ValueError(f"unilora: init_theta_d_bound must be positive, got {bound}")
    param_dtype = jnp.dtype(param_dtype)
    seed = int(proj_seed)

    def init_matrix(key, w, stats):
        del key  # the indices come from proj_seed over all leaves
        if stats is not None:
            raise ValueError("unilora takes no stats")
        n_in, n_out = w.shape
        return UniLoRAParams(theta_d=_shared.Shared(vector)), UniLoRAIndices(
            indices_a=jnp.zeros((n_in, rank), jnp.int32),
            indices_b=jnp.zeros((rank, n_out), jnp.int32),
            scales_a=jnp.zeros((n_in, rank), param_dtype),
            scales_b=jnp.zeros((rank, n_out), param_dtype))

    def factors(t, f):
        theta = t.theta_d
        return _lowrank.LowRank(left=theta[f.indices_a] * f.scales_a.astype(theta.dtype),
                                right=theta[f.indices_b] * f.scales_b.astype(theta.dtype))

    def init_vector(key, leaves):
        # Every layer of every leaf, in order: one matrix each.
        shapes, where = [], []
        for path, (_, _, f) in leaves.items():
            batch = f.indices_a.shape[:-2]
            n_in, n_out = f.indices_a.shape[-2], f.indices_b.shape[-1]
            for i in range(math.prod(batch)):
                shapes.append((f.indices_a.shape[-1], n_in, n_out))
                where.append((path, batch, i))
        mats = unilora_indices(shapes, theta_d_length, seed)
        per: dict[str, list] = {}
        for (path, _, _), m in zip(where, mats, strict=True):
            per.setdefault(path, []).append(m)
        new = {}
        for path, (_, t, _) in leaves.items():
            batch = leaves[path][2].indices_a.shape[:-2]
            parts = [np.stack(x).reshape(batch + x[0].shape) for x in zip(*per[path],
                                                                          strict=True)]
            new[path] = (t, UniLoRAIndices(
                jnp.asarray(parts[0]), jnp.asarray(parts[1]),
                jnp.asarray(parts[2], param_dtype), jnp.asarray(parts[3], param_dtype)))
        if init_weights:
            theta = jax.random.uniform(key, (theta_d_length,), jnp.float32, -bound, bound)
        else:
            theta = jax.random.normal(key, (theta_d_length,), jnp.float32)
        return _shared.SharedParts(trainable={vector: theta.astype(param_dtype)},
                                   leaves=new)

    return _lift.lift_matrix(
        name=(f"unilora(rank={rank}, theta_d_length={theta_d_length}, "
              f"proj_seed={seed}, vector={vector!r})"),
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("theta_d_length", theta_d_length),
                         ("proj_seed", seed), ("init_theta_d_bound", bound),
                         ("init_weights", bool(init_weights)), ("vector", vector)),
        shared=_shared.SharedInit(
            group=vector,
            config=("unilora", theta_d_length, seed, bound, bool(init_weights),
                    param_dtype.name),
            init=init_vector),
        **_lowrank.low_rank_forms(factors),
    )
