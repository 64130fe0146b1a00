# SPDX-License-Identifier: Apache-2.0
"""TIES-Merging: trim, elect sign, disjoint merge.

TIES-Merging: Resolving Interference When Merging Models. Yadav et al., 2023.
https://arxiv.org/abs/2306.01708

1. Trim (paper §3, step 1) ↔ ``trim``: keep the top ``density`` fraction of
   each task vector by magnitude. ``Trim.PER_TENSOR`` (PEFT, mergekit) keeps
   exactly ``int(density·n)`` entries of each leaf; ``Trim.GLOBAL`` (the
   paper's code, MergeLM) uses one threshold over all merged leaves of a task
   and keeps ``|τ| >= threshold`` (ties at the threshold may keep a few more).
2. Elect sign (step 2) ↔ ``elect_sign``: ``γ = sign(Σ_t w_t τ̂_t)`` from the
   weighted trimmed vectors (mergekit); a zero sum elects ``+``.
3. Disjoint merge (step 3) ↔ ``disjoint_merge``: the mean of the weighted
   entries whose sign agrees with γ, counting only non-zero agreeing entries
   (``/ max(count, 1)``).
4. ``θ = θ0 + λ·τ_merged``.

Exports: ``Trim``, ``trim``, ``elect_sign``, ``disjoint_merge``,
``combine_ties``, ``ties``.
"""

import enum
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.merge import _common

PyTree = Any


class Trim(enum.Enum):
    """Scope of TIES/DARE-TIES magnitude trimming.

    Attributes:
      PER_TENSOR: top ``int(density·n)`` entries of each leaf (PEFT, mergekit).
      GLOBAL: one magnitude threshold over all merged leaves of a task (the
        paper's implementation).
    """

    PER_TENSOR = "per_tensor"
    GLOBAL = "global"


def _topk_mask(x: jax.Array, k: int) -> jax.Array:
    flat = jnp.abs(x).reshape(-1)
    if k <= 0:
        return jnp.zeros(x.shape, bool)
    if k >= flat.size:
        return jnp.ones(x.shape, bool)
    _, idx = jax.lax.top_k(flat, k)
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(x.shape)


def trim(vector: PyTree, density: float, *, mode: Trim = Trim.PER_TENSOR,
         paths: set[str] | None = None) -> PyTree:
    """Keeps the largest-magnitude ``density`` fraction of a task vector.

    Args:
      vector: one task vector.
      density: fraction kept, in (0, 1] (static).
      mode: ``Trim.PER_TENSOR`` or ``Trim.GLOBAL``.
      paths: leaves taking part (others are returned unchanged); None = all.

    Returns:
      The trimmed task vector (zeros elsewhere).

    Example:
      >>> import jax.numpy as jnp
      >>> trim({"w": jnp.array([0.1, -3.0, 2.0, 0.5])}, 0.5)
      {'w': Array([ 0., -3.,  2.,  0.], dtype=float32)}
    """
    density = _common.check_fraction(density, "density", "trim")
    if not isinstance(mode, Trim):
        raise TypeError(f"trim: mode must be a Trim member, got {mode!r}")
    flat = tree.leaves_by_path(vector)
    paths = set(flat) if paths is None else paths
    if mode is Trim.PER_TENSOR:
        def one(p, x):
            if p not in paths:
                return x
            return jnp.where(_topk_mask(x, int(density * x.size)), x, 0)

        return tree.map_with_path(one, vector)
    allv = jnp.concatenate([jnp.abs(flat[p]).reshape(-1).astype(jnp.float32)
                            for p in flat if p in paths])
    k = int(density * allv.size)
    if k <= 0:
        thr = jnp.inf
    else:
        thr = jax.lax.top_k(allv, k)[0][-1]

    def one_global(p, x):
        if p not in paths:
            return x
        return jnp.where(jnp.abs(x).astype(jnp.float32) >= thr, x, 0)

    return tree.map_with_path(one_global, vector)


def elect_sign(weighted: Sequence[jax.Array]) -> jax.Array:
    """``sign(Σ_t v_t)`` with zero mapped to +1.

    Args:
      weighted: the weighted trimmed task vectors of one leaf.

    Returns:
      An array of ±1.

    Example:
      >>> import jax.numpy as jnp
      >>> elect_sign([jnp.array([1.0, -2.0, 0.0]), jnp.array([-3.0, 1.0, 0.0])])
      Array([-1., -1.,  1.], dtype=float32)
    """
    total = sum(weighted)
    return jnp.where(total >= 0, 1, -1).astype(total.dtype)


def disjoint_merge(weighted: Sequence[jax.Array], sign: jax.Array) -> jax.Array:
    """Mean of the non-zero entries whose sign agrees with ``sign``.

    Args:
      weighted: the weighted trimmed task vectors of one leaf.
      sign: the elected sign (±1).

    Returns:
      The merged leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> disjoint_merge([jnp.array([2.0, 0.0]), jnp.array([4.0, -1.0])],
      ...                jnp.array([1.0, 1.0]))
      Array([3., 0.], dtype=float32)
    """
    stacked = jnp.stack(list(weighted))
    agree = jnp.sign(stacked) == sign[None]
    count = jnp.sum(agree, axis=0).astype(stacked.dtype)
    return jnp.sum(jnp.where(agree, stacked, 0), axis=0) / jnp.maximum(count, 1)


def combine_ties(vectors: Sequence[PyTree], *, density: float,
                 weights: Sequence[Any] | None = None,
                 mode: Trim = Trim.PER_TENSOR,
                 paths: set[str] | None = None) -> PyTree:
    """Trims each task vector, elects signs and merges disjointly.

    Args:
      vectors: task vectors.
      density: fraction kept by trimming (static); 1 disables trimming.
      weights: per-task weights (default 1).
      mode: trimming scope.
      paths: leaves taking part in global trimming (None = all).

    Returns:
      The merged task vector.

    Example:
      >>> import jax.numpy as jnp
      >>> combine_ties([{"w": jnp.array([1.0, -1.0])},
      ...               {"w": jnp.array([3.0, 2.0])}], density=1.0)
      {'w': Array([2., 2.], dtype=float32)}
    """
    w = _common.check_weights(weights, len(vectors), "combine_ties")
    trimmed = [trim(v, density, mode=mode, paths=paths) for v in vectors]

    def one(_p, leaves):
        weighted = [jnp.asarray(wi, x.dtype) * x for wi, x in zip(w, leaves, strict=True)]
        return disjoint_merge(weighted, elect_sign(weighted))

    return _common.per_leaf(trimmed, one)


def ties(base: PyTree, finetuned: Sequence[PyTree], *, density: float = 0.2,
         weights: Sequence[Any] | None = None, scale: Any = 1.0,
         mode: Trim = Trim.PER_TENSOR, rules: Any = None) -> PyTree:
    """TIES-Merging of fine-tuned models into the base.

    Args:
      base: θ0.
      finetuned: the fine-tuned models θ_t.
      density: fraction of each task vector kept (paper: 0.2).
      weights: per-model weights (default 1).
      scale: λ (MergeLM default 1.0).
      mode: ``Trim.PER_TENSOR`` (default) or ``Trim.GLOBAL``.
      rules: rules selecting the merged leaves (None = every floating leaf).

    Returns:
      The merged tree in the base dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> ties({"w": jnp.zeros(2)}, [{"w": jnp.array([1.0, -2.0])}], density=1.0)
      {'w': Array([ 1., -2.], dtype=float32)}
    """
    _common.check_models(base, finetuned, "ties")
    paths = _common.selected(base, rules)
    taus = [_common.task_vector(f, base) for f in finetuned]
    merged = combine_ties(taus, density=density, weights=weights, mode=mode,
                          paths=paths)
    return _common.apply(base, merged, paths, scale)
