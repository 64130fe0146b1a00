# SPDX-License-Identifier: Apache-2.0
"""LN tuning: train the normalisation layers' own parameters.

Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning.
Zhao et al., 2023. https://arxiv.org/abs/2312.11420

The paper (Section 3) tunes only the LayerNorm (RMSNorm) gain and bias inside
each block; every other weight stays frozen. As an adapter on one norm leaf
(a scale ``γ`` or a bias ``β``) that is ``W' = V`` with ``V`` a trainable copy
of the leaf initialised to ``W``, which is what Hugging Face PEFT's
``tuners/ln_tuning`` does: it keeps a deep copy of the norm module, trains
the copy, and on merge swaps the copy in and keeps the original aside (unmerge
swaps back). Here ``fold`` returns the original leaf as its ``aux``, so
``unfold`` is exact in every dtype.

The adapter does not look at the leaf's shape: one rule such as
``r".*norm/(scale|bias)"`` puts it on every norm parameter, stacked layers
included. On a matmul kernel it is full fine-tuning of that kernel.

Exports: ``LNTuningParams``, ``ln_tuning``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _protocol


class LNTuningParams(NamedTuple):
    """Trainable copy of one norm parameter.

    Attributes:
      value: the trained leaf, the leaf's shape (``(d,)`` for a norm scale).
    """

    value: jax.Array


def ln_tuning(
    *,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """A trainable copy of a norm layer's scale or bias (LN tuning).

    ``W' = V`` with ``V = W`` at init, so the adapter is the identity at init.
    Trainable parameters per leaf: the leaf's size (``d`` for a norm scale of
    width ``d``; PEFT counts the same, one copy of each norm parameter).

    Args:
      dimension_numbers: accepted for a uniform interface; the copy is
        elementwise, so no view changes it (``tree.assign`` binds none).
      param_dtype: storage dtype of the trainable copy.

    Returns:
      An ``Adapter`` with trainable ``LNTuningParams`` and no frozen part.
      It has no factored form: the trained leaf is the whole parameter and a
      norm scale is no matmul operand, so ``W' = V`` is already the cheapest
      form; the factored path uses ``V`` directly (a ``d``-vector, with its
      one-time "no factored form" warning).

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = ln_tuning()
      >>> t, f = ad.init(jax.random.key(0), jnp.full((3,), 2.0))
      >>> ad.apply(jnp.ones((3,)), t._replace(value=t.value * 3), f)
      Array([6., 6., 6.], dtype=float32)

    References:
      Zhao et al., 2023, https://arxiv.org/abs/2312.11420
    """
    param_dtype = jnp.dtype(param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"ln_tuning: param_dtype must be floating, got {param_dtype}")

    def init(key, w, *, stats=None):
        del key
        if stats is not None:
            raise ValueError("ln_tuning takes no stats")
        dtype = getattr(w, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"ln_tuning: the leaf must be a floating array, got "
                            f"shape {np.shape(w)}, dtype {dtype}")
        return LNTuningParams(value=jnp.asarray(w).astype(param_dtype)), None

    def apply(w, t, f):
        if t.value.shape != np.shape(w):
            raise ValueError(f"ln_tuning: trainable value has shape "
                             f"{t.value.shape}, the leaf has shape {np.shape(w)}")
        return t.value.astype(w.dtype)

    def fold_aux(w, t, f):
        return w  # PEFT's merge keeps the original module aside

    def unapply(w, t, f, aux):
        if aux is None:
            raise ValueError("ln_tuning: unfold needs the aux returned by "
                             "fold(..., return_aux=True) (the original leaf)")
        return aux.astype(w.dtype)

    def build(dims):
        return _protocol.Adapter(
            init=init,
            apply=apply,
            unapply=unapply,
            fold_aux=fold_aux,
            name="ln_tuning",
            dimension_numbers=dims,
            relayout=build,
            elementwise=True,
        )

    return build(dimension_numbers)
