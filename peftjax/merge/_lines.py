# SPDX-License-Identifier: Apache-2.0
"""LiNeS: layer-increasing network scaling of task vectors.

LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging. Wang et al., 2024. https://arxiv.org/abs/2410.17146

The (merged) task vector of layer ``ℓ`` (0-based, ``L`` layers) is scaled by
``λ(ℓ) = α + β·ℓ/(L − 1)`` (paper Eq. 1 with 1-based ``(ℓ−1)/(L−1)``): shallow
layers keep little of the update (less forgetting of general features), deep
layers keep ``α + β``. ``L = 1`` gives ``α``. The layer index comes from the
path (``layers/{i}/...``, regex group 1 of ``layer_pattern``) or, for scanned
leaves (``layers/...`` with a leading layer axis, ``stacked_pattern``), from
the leading axis. Leaves outside the layers (embeddings, final norm, head)
are scaled by ``other_scale``, which defaults to ``α`` (the shallowest
factor, as the reference treats non-block parameters).

``θ = θ0 + λ ⊙ Σ_t w_t τ_t`` ↔ ``lines``; the factors ↔ ``layer_scales``.

Exports: ``layer_scales``, ``lines``.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.merge import _common, _task_vectors

PyTree = Any

LAYER_PATTERN = r"(?:.*/)?layers/(\d+)/.*"
STACKED_PATTERN = r"(?:.*/)?layers/(?!\d+/).*"


def layer_scales(num_layers: int, alpha: float, beta: float) -> np.ndarray:
    """Returns ``λ(ℓ) = α + β·ℓ/(L−1)`` for ``ℓ = 0..L−1``.

    Args:
      num_layers: L.
      alpha: α, the factor of the first layer.
      beta: β, added in full at the last layer.

    Returns:
      A float64 array of L factors.

    Example:
      >>> layer_scales(4, 0.2, 0.6).round(6).tolist()
      [0.2, 0.4, 0.6, 0.8]
    """
    if num_layers < 1:
        raise ValueError(f"layer_scales: num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        return np.array([alpha], np.float64)
    return alpha + beta * np.arange(num_layers, dtype=np.float64) / (num_layers - 1)


def lines(base: PyTree, finetuned: Sequence[PyTree], *, alpha: float, beta: float,
          weights: Sequence[Any] | None = None, num_layers: int | None = None,
          other_scale: float | None = None, layer_pattern: str = LAYER_PATTERN,
          stacked_pattern: str = STACKED_PATTERN, rules: Any = None) -> PyTree:
    """LiNeS merge: depth-scaled (summed) task vectors.

    Args:
      base: θ0.
      finetuned: fine-tuned models (one for editing, several for merging).
      alpha: α (static).
      beta: β (static).
      weights: per-model weights of the task-vector sum.
      num_layers: L; default: the number of layer indices in the paths, or the
        leading axis of scanned leaves.
      other_scale: the factor of non-layer leaves (default α).
      layer_pattern: regex whose group 1 is the layer index.
      stacked_pattern: regex of scanned leaves with a leading layer axis.
      rules: rules selecting the merged leaves.

    Returns:
      The merged tree in the base dtypes.

    Raises:
      ValueError: inconsistent layer counts.

    Example:
      >>> import jax.numpy as jnp
      >>> base = {"layers": {"w": jnp.zeros((4, 2))}}
      >>> out = lines(base, [{"layers": {"w": jnp.ones((4, 2))}}], alpha=0.2, beta=0.6)
      >>> [round(float(v), 4) for v in out["layers"]["w"][:, 0]]
      [0.2, 0.4, 0.6, 0.8]
    """
    _common.check_models(base, finetuned, "lines")
    paths = _common.selected(base, rules)
    flat = tree.leaves_by_path(base)
    idx = {p: int(m.group(1)) for p in paths
           if (m := re.fullmatch(layer_pattern, p))}
    stacked = {p for p in paths if p not in idx and re.fullmatch(stacked_pattern, p)}
    counts = {np.shape(flat[p])[0] for p in stacked if np.ndim(flat[p]) >= 1}
    if idx:
        counts.add(max(idx.values()) + 1)
    if num_layers is None:
        if len(counts) > 1:
            raise ValueError(f"lines: layer counts disagree {sorted(counts)}; pass "
                             "num_layers")
        num_layers = counts.pop() if counts else 1
    elif any(c > num_layers for c in counts):
        raise ValueError(f"lines: num_layers={num_layers} but the paths have "
                         f"{max(counts)} layers")
    scales = layer_scales(num_layers, alpha, beta)
    other = alpha if other_scale is None else other_scale
    taus = [_common.task_vector(f, base) for f in finetuned]
    summed = _task_vectors.combine_linear(taus, weights=weights)

    def one(p, x):
        if p not in paths:
            return x
        if p in idx:
            return x * jnp.asarray(scales[idx[p]], x.dtype)
        if p in stacked:
            s = jnp.asarray(scales[: x.shape[0]], x.dtype)
            return x * s.reshape((-1,) + (1,) * (x.ndim - 1))
        return x * jnp.asarray(other, x.dtype)

    return _common.apply(base, tree.map_with_path(one, summed), paths, 1.0)
