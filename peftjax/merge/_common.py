# SPDX-License-Identifier: Apache-2.0
"""Shared plumbing of the merge methods: validation, selection, task vectors.

Every merge method has a *vector core* over task vectors (``combine_*``) and a
params-level wrapper ``θ = θ0 + scale·combine(τ_1..τ_T)``. Leaves that the
rules do not select (and non-floating leaves, which must agree across models)
keep the base value. Task vectors are computed in float32 (or the leaf dtype
when wider) and merged leaves are cast back to the base dtype.

Exports (private to ``peftjax.merge``): ``check_models``, ``selected``,
``vector_dtype``, ``task_vector``, ``apply``, ``check_weights``.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree

PyTree = Any


def vector_dtype(dtype: Any) -> np.dtype:
    """float32 for narrower floats, else the dtype itself."""
    d = jnp.dtype(dtype)
    return d if d.itemsize >= 4 else jnp.dtype(jnp.float32)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                          jnp.floating)


def check_models(base: PyTree, models: Sequence[PyTree], fn: str,
                 *, min_models: int = 1) -> None:
    """Raises unless every model has ``base``'s paths and shapes."""
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise TypeError(f"{fn}: pass the fine-tuned models as a list, got "
                        f"{type(models).__name__}")
    if len(models) < min_models:
        raise ValueError(f"{fn}: needs at least {min_models} fine-tuned models, got "
                         f"{len(models)}")
    ref = tree.flatten(base)
    for i, m in enumerate(models):
        got = tree.flatten(m)
        rp, gp = [p for p, _ in ref], [p for p, _ in got]
        if rp != gp:
            missing = sorted(set(rp) - set(gp))[:10]
            extra = sorted(set(gp) - set(rp))[:10]
            raise ValueError(
                f"{fn}: model {i} has a different tree from the base: missing "
                f"{missing}, extra {extra}"
            )
        for (p, a), (_, b) in zip(ref, got, strict=True):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"{fn}: {p!r} has shape {np.shape(b)} in model {i} but "
                    f"{np.shape(a)} in the base"
                )


def check_weights(weights: Sequence[float] | None, n: int, fn: str) -> list[Any]:
    """Returns per-model weights (default 1) after validating their count."""
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"{fn}: got {len(weights)} weights for {n} models")
    return weights


def selected(base: PyTree, rules: Any) -> set[str]:
    """Paths taking part: floating leaves matched by ``rules`` (all if None)."""
    flat = tree.flatten(base)
    floats = {p for p, x in flat if _is_float(x)}
    if rules is None:
        return floats
    chosen = tree.mask(base, rules)
    picked = {p for p, v in tree.flatten(chosen) if v}
    non_float = sorted(picked - floats)
    if non_float:
        raise ValueError(f"rules select non-floating leaves {non_float[:10]}; only "
                         "floating-point leaves can be merged")
    return picked


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """Returns ``finetuned - base`` per floating leaf (float32 or wider).

    Args:
      finetuned: the fine-tuned parameters.
      base: the base parameters (same paths and shapes).

    Returns:
      A tree of task vectors; non-floating leaves become zeros of their dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> task_vector({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})
      {'w': Array([1., 1.], dtype=float32)}
    """
    check_models(base, [finetuned], "task_vector")

    def sub(f, b):
        if not _is_float(b):
            return jnp.zeros_like(b)
        dt = vector_dtype(b.dtype)
        return f.astype(dt) - b.astype(dt)

    return jax.tree.map(sub, finetuned, base)


def apply(base: PyTree, vector: PyTree, paths: set[str], scale: Any = 1.0
          ) -> PyTree:
    """Returns ``base + scale·vector`` on ``paths``, cast to the base dtypes."""
    flat_v = tree.leaves_by_path(vector)

    def one(p: str, b: Any) -> Any:
        if p not in paths:
            return b
        dt = vector_dtype(b.dtype)
        return (b.astype(dt) + jnp.asarray(scale, dt) * flat_v[p].astype(dt)
                ).astype(b.dtype)

    return tree.map_with_path(one, base)


def per_leaf(vectors: Sequence[PyTree], fn: Callable[[str, list[Any]], Any]
             ) -> PyTree:
    """Maps ``fn(path, [leaf of each vector])`` over aligned task vectors."""
    flats = [tree.leaves_by_path(v) for v in vectors]
    return tree.map_with_path(lambda p, _: fn(p, [f[p] for f in flats]),
                                vectors[0])


def check_fraction(value: Any, name: str, fn: str, *, allow_zero: bool = False
                   ) -> float:
    """Validates a static fraction in (0, 1] (or [0, 1])."""
    v = float(value)
    lo_ok = v >= 0 if allow_zero else v > 0
    if not (lo_ok and v <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{fn}: {name} must be in {interval}, got {value}")
    return v
