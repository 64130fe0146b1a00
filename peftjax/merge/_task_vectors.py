# SPDX-License-Identifier: Apache-2.0
"""Task vectors and task arithmetic.

Editing Models with Task Arithmetic. Ilharco et al., 2023.
https://arxiv.org/abs/2212.04089

``τ_t = θ_t − θ0``; ``θ = θ0 + λ·Σ_t w_t τ_t`` (divided by ``Σ_t w_t`` with
``normalize=True``, mergekit's option). A negative weight forgets a task.

Exports: ``task_vector``, ``combine_linear``, ``task_arithmetic``.
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from peftjax.merge import _common

PyTree = Any
task_vector = _common.task_vector


def combine_linear(vectors: Sequence[PyTree], *, weights: Sequence[Any] | None = None,
                   normalize: bool = False) -> PyTree:
    """Returns ``Σ_t w_t τ_t`` (over ``Σ w_t`` when ``normalize``).

    Args:
      vectors: task vectors with identical structure.
      weights: one weight per vector (default 1); may be traced arrays.
      normalize: divide by the sum of weights.

    Returns:
      The combined task vector.

    Example:
      >>> import jax.numpy as jnp
      >>> combine_linear([{"w": jnp.ones(2)}, {"w": jnp.full(2, 3.0)}],
      ...                weights=[1.0, 0.5])
      {'w': Array([2.5, 2.5], dtype=float32)}
    """
    w = _common.check_weights(weights, len(vectors), "combine_linear")

    def one(_p, leaves):
        out = sum(jnp.asarray(wi, x.dtype) * x for wi, x in zip(w, leaves, strict=True))
        if normalize:
            out = out / jnp.asarray(sum(w), out.dtype)
        return out

    return _common.per_leaf(vectors, one)


def task_arithmetic(base: PyTree, finetuned: Sequence[PyTree], *,
                    weights: Sequence[Any] | None = None, scale: Any = 1.0,
                    normalize: bool = False, rules: Any = None) -> PyTree:
    """Task arithmetic: ``θ0 + scale·Σ_t w_t (θ_t − θ0)``.

    Args:
      base: the base parameters θ0.
      finetuned: fine-tuned parameter trees θ_t.
      weights: per-model weights (default 1; negative forgets a task).
      scale: λ.
      normalize: divide the sum by ``Σ w_t``.
      rules: ``peftjax.tree`` rules selecting the merged leaves (payload
        True); others keep the base. None merges every floating leaf.

    Returns:
      The merged tree, in the base dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> task_arithmetic(base, [{"w": jnp.ones(2)}])
      {'w': Array([1., 1.], dtype=float32)}
    """
    _common.check_models(base, finetuned, "task_arithmetic")
    paths = _common.selected(base, rules)
    taus = [_common.task_vector(f, base) for f in finetuned]
    combined = combine_linear(taus, weights=weights, normalize=normalize)
    return _common.apply(base, combined, paths, scale)
