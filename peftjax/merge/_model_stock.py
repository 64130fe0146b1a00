# SPDX-License-Identifier: Apache-2.0
"""Model Stock: interpolate towards the base by the angle between fine-tunes.

Model Stock: All we need is just a few fine-tuned models. Jang et al., 2024.
https://arxiv.org/abs/2403.19522

Per leaf (paper Eq. 4–5, as mergekit implements it; the official code is not
released): ``cos θ`` is the mean pairwise cosine between the offsets
``θ_i − θ0`` (norm product clamped at 1e-6, cosine clipped to [−1, 1]);
``t = N·cos θ / (1 + (N − 1)·cos θ)`` ↔ ``interpolation_ratio``;
``θ = t·mean_i θ_i + (1 − t)·θ0`` ↔ ``model_stock``.

Exports: ``interpolation_ratio``, ``model_stock``.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peftjax.merge import _common

PyTree = Any


def interpolation_ratio(offsets: Sequence[jax.Array]) -> jax.Array:
    """Returns Model Stock's ``t`` for the offsets of one leaf.

    Args:
      offsets: ``θ_i − θ0`` of N >= 2 models.

    Returns:
      The scalar ratio ``t``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(interpolation_ratio([jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])]))
      0.0
    """
    n = len(offsets)
    flat = [o.reshape(-1).astype(jnp.float32) for o in offsets]
    norms = [jnp.sqrt(jnp.sum(f * f)) for f in flat]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = jnp.maximum(norms[i] * norms[j], 1e-6)
            cos.append(jnp.clip(jnp.sum(flat[i] * flat[j]) / denom, -1.0, 1.0))
    c = sum(cos) / len(cos)
    return n * c / (1 + (n - 1) * c)


def model_stock(base: PyTree, finetuned: Sequence[PyTree], *, rules: Any = None
                ) -> PyTree:
    """Model Stock merge of N >= 2 fine-tuned models.

    Args:
      base: θ0 (the pre-trained model).
      finetuned: N >= 2 fine-tuned models.
      rules: rules selecting the merged leaves.

    Returns:
      The merged tree in the base dtypes.

    Raises:
      ValueError: fewer than two fine-tuned models.

    Example:
      >>> import jax.numpy as jnp
      >>> model_stock({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}])
      {'w': Array([1., 1.], dtype=float32)}
    """
    _common.check_models(base, finetuned, "model_stock", min_models=2)
    paths = _common.selected(base, rules)
    taus = [_common.task_vector(f, base) for f in finetuned]

    def one(p, leaves):
        if p not in paths:
            return leaves[0]
        t = interpolation_ratio(leaves)
        mean = sum(leaves) / len(leaves)
        return t.astype(mean.dtype) * mean

    merged = _common.per_leaf(taus, one)
    return _common.apply(base, merged, paths, 1.0)
