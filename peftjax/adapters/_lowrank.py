# SPDX-License-Identifier: Apache-2.0
"""Low-rank algebra shared by the additive adapters.

``LowRank`` names a delta ``scale · left @ [core @] right``; ``low_rank``
applies it to activations without forming the product; ``low_rank_forms``
derives an adapter's weight-space, inverse and factored forms from its
factors. ``compute_dtype`` picks the dtype every term is computed in.

Exports: ``compute_dtype``, ``LowRank``, ``low_rank``, ``low_rank_forms``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.adapters._protocol import FactoredTerms


def compute_dtype(*dtypes: Any) -> np.dtype:
    """Returns the wider of floating dtypes without implicit promotion.

    Works under ``jax_numpy_dtype_promotion="strict"``: the widest itemsize
    wins; bfloat16 with float16 gives float32.

    Args:
      *dtypes: floating dtypes.

    Returns:
      The dtype to compute in.

    Example:
      >>> import jax.numpy as jnp
      >>> compute_dtype(jnp.bfloat16, jnp.float32)
      dtype('float32')
    """
    ds = [jnp.dtype(d) for d in dtypes]
    widest = max(ds, key=lambda d: d.itemsize)
    same = {d for d in ds if d.itemsize == widest.itemsize}
    if len(same) > 1:
        return jnp.dtype(jnp.float32) if widest.itemsize < 4 else widest
    return widest


class LowRank(NamedTuple):
    """An additive delta ``scale · left @ [core @] right`` of one matrix.

    Attributes:
      left: ``(in, r)``.
      right: ``(r, out)``.
      scale: a Python float folded into the product.
      core: optional ``(r, r)`` between the factors (LoRA-XS).
    """

    left: jax.Array
    right: jax.Array
    scale: float = 1.0
    core: jax.Array | None = None


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, s: float,
             core: jax.Array | None = None) -> jax.Array:
    """Returns ``s·(x@a)@b`` (or ``s·((x@a)@core)@b``) without forming ``a@b``.

    Computed in the wider of ``x``'s and the factors' dtypes.

    Args:
      x: ``(..., in)``.
      a: ``(in, r)``.
      b: ``(r, out)``.
      s: the scale.
      core: optional ``(r, r)``.

    Returns:
      ``(..., out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> low_rank(jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4)), 0.5)[0, 0]
      Array(1.5, dtype=float32)
    """
    ct = compute_dtype(x.dtype, a.dtype)
    h = x.astype(ct) @ a.astype(ct)
    if core is not None:
        h = h @ core.astype(ct)
    return (h * jnp.asarray(s, ct)) @ b.astype(ct)


def low_rank_forms(factors: Callable[[Any, Any], LowRank]) -> dict[str, Callable]:
    """Derives the weight-space, inverse and factored forms of an additive adapter.

    Args:
      factors: ``(trainable, frozen) -> LowRank`` for one matrix.

    Returns:
      ``apply_matrix``, ``unapply_matrix`` and ``factored_matrix`` keyword
      arguments for ``lift_matrix``: ``W ± delta`` in the wider dtype, and
      ``x@W + low_rank(x, ...)`` without forming the delta.

    Example:
      >>> import jax.numpy as jnp
      >>> forms = low_rank_forms(lambda t, f: LowRank(t[0], t[1], 2.0))
      >>> w = jnp.zeros((2, 2))
      >>> forms["apply_matrix"](w, (jnp.ones((2, 1)), jnp.ones((1, 2))), None)
      Array([[2., 2.],
             [2., 2.]], dtype=float32)
    """

    def delta(w, t, f):
        lr = factors(t, f)
        ct = compute_dtype(w.dtype, lr.left.dtype)
        left = lr.left.astype(ct)
        if lr.core is not None:
            left = left @ lr.core.astype(ct)
        return ct, (left @ lr.right.astype(ct)) * jnp.asarray(lr.scale, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        lr = factors(t, f)
        return FactoredTerms(
            delta=lambda x: low_rank(x, lr.left, lr.right, lr.scale, core=lr.core))

    return {"apply_matrix": apply_matrix, "unapply_matrix": unapply_matrix,
            "factored_matrix": factored_matrix}
