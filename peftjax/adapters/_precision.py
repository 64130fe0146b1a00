# SPDX-License-Identifier: Apache-2.0
"""Mixed precision: a bfloat16 base and activations, float32 trainables.

Mixed Precision Training. Micikevicius et al., 2018.
https://arxiv.org/abs/1710.03740 (float32 master weights, low-precision
forward and backward passes).

The recipe, as ``experiments/`` runs it with ``--dtype=bf16``:

* **Adapter methods** (LoRA, DoRA, LoRA-XS, PiSSA, ...): build the model
  with a bfloat16 compute ``dtype`` (peftjax's Llama:
  ``load_llama(..., dtype=jnp.bfloat16)``; it keeps RMSNorm, the attention
  softmax and the logits in float32) and cast the frozen base with
  ``cast_floating(params, jnp.bfloat16)``. Adapter parameters keep their
  ``param_dtype`` (float32): ``materialize`` adds the low-rank term in
  float32 and casts ``W + ΔW`` to the base dtype, so the gradient reaching
  the factors, and the optimizer state built from them, are float32. The
  base never changes, so it needs no float32 master copy: its memory halves.
* **Optimizer-side methods** (full fine-tuning, GaLore, FRUGAL, LISA): the
  trainable tree is a float32 master copy of the parameters; the loss sees
  ``cast_floating(master, jnp.bfloat16)`` computed *inside* the
  differentiated function (a bfloat16 compute ``dtype`` casts each kernel at
  its use to the same effect), so gradients come back through the cast in
  float32 and updates too small for bfloat16 (relative size below 2⁻⁸)
  still accumulate in the master copy.

``keep`` leaves chosen leaves in their dtype (e.g. ``r".*norm/scale"``).

Exports: ``cast_floating``.
"""

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from peftjax.tree import map_with_path


def _is_floating(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def cast_floating(tree: Any, dtype: Any, *, keep: str | None = None) -> Any:
    """Casts every floating-point leaf of ``tree`` to ``dtype``.

    Integer, boolean and PRNG-key leaves and non-array leaves are returned
    as they are, and so are floating leaves already in ``dtype`` (no copy).
    Differentiable: used inside a loss on a float32 master copy, the
    gradient comes back in float32.

    Args:
      tree: any pytree (a parameter dict, an adapter state).
      dtype: a floating dtype (``jnp.bfloat16``, ``jnp.float32``, ...).
      keep: a regex; floating leaves whose canonical path matches it
        (``re.fullmatch``) keep their dtype.

    Returns:
      A tree of the same structure.

    Raises:
      ValueError: ``dtype`` is not a floating dtype, or ``keep`` matches no
        floating leaf (the message lists some paths).
      TypeError: ``keep`` is not a string.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones(2)},
      ...      "ids": jnp.arange(2)}
      >>> out = cast_floating(t, jnp.bfloat16, keep=r".*norm/scale")
      >>> out["w"].dtype, out["norm"]["scale"].dtype, out["ids"].dtype
      (dtype(bfloat16), dtype('float32'), dtype('int32'))
    """
    try:
        target = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"cast_floating: dtype={dtype!r} is not a dtype") from e
    if not jnp.issubdtype(target, jnp.floating):
        raise ValueError(f"cast_floating: dtype={target} is not a floating dtype")
    if keep is not None and not isinstance(keep, str):
        raise TypeError(f"cast_floating: keep must be a regex string or None, "
                        f"got {type(keep).__name__}")
    pattern = None if keep is None else re.compile(keep)
    kept: list[str] = []
    floating: list[str] = []

    def cast(path: str, x: Any) -> Any:
        if not _is_floating(x):
            return x
        floating.append(path)
        if pattern is not None and pattern.fullmatch(path):
            kept.append(path)
            return x
        if x.dtype == target:
            return x
        if isinstance(x, np.ndarray):
            return np.asarray(x, target)
        return x.astype(target)

    out = map_with_path(cast, tree)
    if pattern is not None and not kept:
        raise ValueError(f"cast_floating: keep={keep!r} matches no floating leaf; "
                         f"floating paths include {floating[:5]}")
    return out
