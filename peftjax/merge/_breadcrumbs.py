# SPDX-License-Identifier: Apache-2.0
"""Model Breadcrumbs: drop both tails of each task vector row.

Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks.
Davari & Belilovsky, 2023. https://arxiv.org/abs/2312.06795

The official masking (``TaskVectorMiddleKeep``), row-wise along the last axis
of every leaf with ``ndim >= 1``: drop the top ``int(L·γ)`` entries of each
row by ``|τ|`` (outliers, ``L`` = last-axis length), then keep only the next
``int(L·β)`` largest and zero the rest ↔ ``breadcrumb_mask``. Scalars are
untouched. Merge: ``θ = θ0 + α·Σ_t w_t τ̃_t`` (paper's search starts at
``α = 0.2, β = 0.15, γ = 0.006``).

Exports: ``breadcrumb_mask``, ``combine_breadcrumbs``, ``breadcrumbs``.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.merge import _common, _task_vectors

PyTree = Any


def breadcrumb_mask(x: jax.Array, density: float, gamma: float) -> jax.Array:
    """Row-wise mask keeping ranks ``[int(Lγ), int(Lγ) + int(Lβ))`` by ``|x|``.

    Args:
      x: one leaf of a task vector (``ndim >= 1``).
      density: β, fraction of each row kept after the outliers.
      gamma: γ, fraction of each row dropped as outliers.

    Returns:
      A bool mask of ``x``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> row = jnp.array([10, 5, 4, 3, 2, 1, .5, .1, .05, .01])
      >>> row[breadcrumb_mask(row, density=0.3, gamma=0.1)]
      Array([5., 4., 3.], dtype=float32)
    """
    if x.ndim == 0:
        return jnp.ones((), bool)
    n = x.shape[-1]
    lo = int(n * gamma)
    hi = lo + int(n * density)
    order = jnp.argsort(-jnp.abs(x), axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return (ranks >= lo) & (ranks < hi)


def combine_breadcrumbs(vectors: Sequence[PyTree], *, density: float = 0.15,
                        gamma: float = 0.006, weights: Sequence[Any] | None = None,
                        paths: set[str] | None = None) -> PyTree:
    """Masks both tails of every task vector row, then sums with weights.

    Args:
      vectors: task vectors.
      density: β (static).
      gamma: γ (static).
      weights: per-task weights.
      paths: leaves taking part (None = all).

    Returns:
      The merged task vector.

    Example:
      >>> import jax.numpy as jnp
      >>> v = {"w": jnp.array([[4.0, 3.0, 2.0, 1.0]])}
      >>> combine_breadcrumbs([v], density=0.5, gamma=0.25)["w"]
      Array([[0., 3., 2., 0.]], dtype=float32)
    """
    density = _common.check_fraction(density, "density", "breadcrumbs")
    gamma = _common.check_fraction(gamma, "gamma", "breadcrumbs", allow_zero=True)
    if density + gamma > 1:
        raise ValueError(f"breadcrumbs: density + gamma must be <= 1, got "
                         f"{density} + {gamma}")

    def masked(v):
        def one(p, x):
            if paths is not None and p not in paths:
                return x
            return jnp.where(breadcrumb_mask(x, density, gamma), x, 0)

        return tree.map_with_path(one, v)

    return _task_vectors.combine_linear([masked(v) for v in vectors],
                                        weights=weights)


def breadcrumbs(base: PyTree, finetuned: Sequence[PyTree], *, density: float = 0.15,
                gamma: float = 0.006, weights: Sequence[Any] | None = None,
                scale: Any = 1.0, rules: Any = None) -> PyTree:
    """Model Breadcrumbs merge: ``θ0 + α·Σ_t w_t mask(τ_t) ⊙ τ_t``.

    Args:
      base: θ0.
      finetuned: fine-tuned models.
      density: β, kept fraction per row after the outliers.
      gamma: γ, outlier fraction dropped per row.
      weights: per-model weights.
      scale: α.
      rules: rules selecting the merged leaves.

    Returns:
      The merged tree in the base dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> breadcrumbs({"w": jnp.zeros(4)}, [{"w": jnp.array([4.0, 3, 2, 1])}],
      ...             density=0.5, gamma=0.25)
      {'w': Array([0., 3., 2., 0.], dtype=float32)}
    """
    _common.check_models(base, finetuned, "breadcrumbs")
    paths = _common.selected(base, rules)
    taus = [_common.task_vector(f, base) for f in finetuned]
    merged = combine_breadcrumbs(taus, density=density, gamma=gamma,
                                 weights=weights, paths=paths)
    return _common.apply(base, merged, paths, scale)
