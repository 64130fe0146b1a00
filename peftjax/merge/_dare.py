# SPDX-License-Identifier: Apache-2.0
"""DARE: drop and rescale task vectors before merging.

Language Models are Super Mario: Absorbing Abilities from Homologous Models as
a Free Lunch. Yu et al., 2024. https://arxiv.org/abs/2311.03099

Drop-and-rescale (paper Eq. 2) ↔ ``drop_and_rescale``: ``m ~ Bernoulli(d)``,
``τ̃ = m ⊙ τ / d`` with density ``d = 1 − p``; unbiased in expectation
(PEFT and MergeLM rescale by ``1/d``; mergekit's L1-norm matching is not used).
Then ``Combine.LINEAR`` (dare_linear: task arithmetic) or ``Combine.TIES``
(dare_ties: TIES sign election and disjoint merge, no trimming).

Exports: ``Combine``, ``drop_and_rescale``, ``combine_dare``, ``dare``.
"""

import enum
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.merge import _common, _task_vectors, _ties

PyTree = Any


class Combine(enum.Enum):
    """How DARE combines the rescaled task vectors.

    Attributes:
      LINEAR: weighted sum (``dare_linear``).
      TIES: TIES sign election + disjoint merge (``dare_ties``).
    """

    LINEAR = "linear"
    TIES = "ties"


def drop_and_rescale(vector: PyTree, density: float, key: jax.Array, *,
                     paths: set[str] | None = None) -> PyTree:
    """Keeps each entry with probability ``density`` and divides by it.

    Args:
      vector: one task vector.
      density: keep probability ``1 − p`` in (0, 1] (static).
      key: PRNG key; each leaf folds in a CRC32 of its path.
      paths: leaves taking part (None = all).

    Returns:
      The dropped and rescaled task vector.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = drop_and_rescale({"w": jnp.ones(4)}, 1.0, jax.random.key(0))
      >>> v["w"]
      Array([1., 1., 1., 1.], dtype=float32)
    """
    density = _common.check_fraction(density, "density", "drop_and_rescale")

    def one(p, x):
        if paths is not None and p not in paths:
            return x
        k = jax.random.fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF)
        keep = jax.random.bernoulli(k, density, x.shape)
        return jnp.where(keep, x / jnp.asarray(density, x.dtype), 0)

    return tree.map_with_path(one, vector)


def combine_dare(vectors: Sequence[PyTree], *, density: float, key: jax.Array,
                 weights: Sequence[Any] | None = None,
                 combine: Combine = Combine.LINEAR,
                 paths: set[str] | None = None) -> PyTree:
    """Drops and rescales each task vector (own key each), then combines.

    Args:
      vectors: task vectors.
      density: keep probability (static).
      key: PRNG key (task ``t`` uses ``fold_in(key, t)``).
      weights: per-task weights.
      combine: ``Combine.LINEAR`` or ``Combine.TIES``.
      paths: leaves taking part (None = all).

    Returns:
      The merged task vector.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> combine_dare([{"w": jnp.ones(2)}], density=1.0, key=jax.random.key(0))
      {'w': Array([1., 1.], dtype=float32)}
    """
    if not isinstance(combine, Combine):
        raise TypeError(f"combine_dare: combine must be a Combine member, got "
                        f"{combine!r}")
    dropped = [drop_and_rescale(v, density, jax.random.fold_in(key, t), paths=paths)
               for t, v in enumerate(vectors)]
    if combine is Combine.LINEAR:
        return _task_vectors.combine_linear(dropped, weights=weights)
    return _ties.combine_ties(dropped, density=1.0, weights=weights, paths=paths)


def dare(base: PyTree, finetuned: Sequence[PyTree], *, density: float,
         key: jax.Array, weights: Sequence[Any] | None = None, scale: Any = 1.0,
         combine: Combine = Combine.LINEAR, rules: Any = None) -> PyTree:
    """DARE merge: drop-and-rescale every task vector, then combine.

    Args:
      base: θ0.
      finetuned: fine-tuned models.
      density: keep probability ``1 − p`` (static).
      key: PRNG key (seeded, reproducible).
      weights: per-model weights.
      scale: λ.
      combine: ``Combine.LINEAR`` (dare_linear) or ``Combine.TIES`` (dare_ties).
      rules: rules selecting the merged leaves (None = every floating leaf).

    Returns:
      The merged tree in the base dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> dare({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}], density=1.0,
      ...      key=jax.random.key(0))
      {'w': Array([1., 1.], dtype=float32)}
    """
    _common.check_models(base, finetuned, "dare")
    paths = _common.selected(base, rules)
    taus = [_common.task_vector(f, base) for f in finetuned]
    merged = combine_dare(taus, density=density, key=key, weights=weights,
                          combine=combine, paths=paths)
    return _common.apply(base, merged, paths, scale)
