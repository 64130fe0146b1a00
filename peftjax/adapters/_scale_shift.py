# SPDX-License-Identifier: Apache-2.0
"""(IA)³ and SSF: learned scales (and shifts) as weight reparametrisations.

(IA)³: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning. Liu et al., 2022. https://arxiv.org/abs/2205.05638
SSF: Scaling & Shifting Your Features. Lian et al., 2022.
https://arxiv.org/abs/2210.08823

Expressed on a Flax kernel ``W (in, out)`` (``y = x W + b``):

* output side (IA)³ (attention k/v): ``y = l ⊙ (xW + b)`` ↔
  ``W' = W·diag(l)``, ``b' = l ⊙ b`` with ``l (out,)``;
* input side (IA)³ (feed-forward down projection): ``y = (l ⊙ x) W + b`` ↔
  ``W' = diag(l)·W``, bias unchanged, ``l (in,)``;
* SSF after a linear layer: ``y = γ ⊙ (xW + b) + β`` ↔ ``W' = W·diag(γ)``,
  ``b' = γ ⊙ b + β`` (SSF's re-parametrisation, paper Eq. 4).

The bias is the kernel's sibling leaf (``.../bias``) and is reparametrised by
the same trainable vectors. ``unfold`` is exact while every scale is
non-zero.

Exports: ``Side``, ``ScaleParams``, ``ScaleShiftParams``, ``scale_shift``,
``ia3``, ``ssf``.
"""

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class Side(enum.Enum):
    """Where a learned scale acts.

    Attributes:
      OUTPUT: scales the layer's output units (``l (out,)``).
      INPUT: scales the layer's input features (``l (in,)``).
    """

    OUTPUT = "output"
    INPUT = "input"


class ScaleParams(NamedTuple):
    """Trainable (IA)³ vector.

    Attributes:
      scale: ``(out,)`` for ``Side.OUTPUT``, ``(in,)`` for ``Side.INPUT``.
    """

    scale: jax.Array


class ScaleShiftParams(NamedTuple):
    """Trainable SSF vectors.

    Attributes:
      scale: ``(out,)`` (γ).
      shift: ``(out,)`` (β), added to the sibling bias.
    """

    scale: jax.Array
    shift: jax.Array


def scale_shift(
    *,
    side: Side = Side.OUTPUT,
    shift: bool = False,
    init_std: float = 0.0,
    bias_name: str = "bias",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """A learned scale (and optional shift) on a kernel and its bias.

    Trainable parameters per matrix: ``out`` (or ``in`` for ``Side.INPUT``),
    plus ``out`` with ``shift=True``.

    Args:
      side: ``Side.OUTPUT`` or ``Side.INPUT``.
      shift: also learn a shift β added to the sibling bias (SSF); requires a
        bias leaf and ``Side.OUTPUT``.
      init_std: scale ``~ N(1, init_std²)``, shift ``~ N(0, init_std²)``; 0
        gives the exact identity.
      bias_name: last path component of the sibling bias leaf.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the vectors.

    Returns:
      An ``Adapter`` with trainable ``ScaleParams`` or ``ScaleShiftParams``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = scale_shift(side=Side.INPUT)
      >>> t, _ = ad.init(jax.random.key(0), jnp.ones((3, 2)))
      >>> t.scale
      Array([1., 1., 1.], dtype=float32)

    References:
      Liu et al., 2022, https://arxiv.org/abs/2205.05638 ; Lian et al., 2022,
      https://arxiv.org/abs/2210.08823
    """
    if not isinstance(side, Side):
        raise TypeError(f"scale_shift: side must be a Side member, got {side!r}")
    if shift and side is not Side.OUTPUT:
        raise ValueError("scale_shift: shift=True needs side=Side.OUTPUT")
    if init_std < 0:
        raise ValueError(f"scale_shift: init_std must be >= 0, got {init_std}")
    param_dtype = jnp.dtype(param_dtype)
    axis = 0 if side is Side.INPUT else 1  # Flax (in, out)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("scale_shift takes no stats")
        n = w.shape[axis]
        ks, kb = jax.random.split(key)
        scale = 1.0 + init_std * jax.random.normal(ks, (n,), jnp.float32)
        if not shift:
            return ScaleParams(scale=scale.astype(param_dtype)), None
        beta = init_std * jax.random.normal(kb, (n,), jnp.float32)
        return ScaleShiftParams(scale.astype(param_dtype), beta.astype(param_dtype)), None

    def ct(w, t):
        return _lowrank.compute_dtype(w.dtype, t.scale.dtype)

    def expand(v):
        return v[None, :] if axis == 1 else v[:, None]

    def apply_matrix(w, t, f):
        c = ct(w, t)
        return w.astype(c) * expand(t.scale.astype(c))

    def unapply_matrix(w, t, f, aux):
        c = ct(w, t)
        return w.astype(c) / expand(t.scale.astype(c))

    bias = None
    if side is Side.OUTPUT:

        def bias_apply(b, t, f):
            c = _lowrank.compute_dtype(b.dtype, t.scale.dtype)
            out = b.astype(c) * t.scale.astype(c)
            return out + t.shift.astype(c) if shift else out

        def bias_unapply(b, t, f):
            c = _lowrank.compute_dtype(b.dtype, t.scale.dtype)
            out = b.astype(c) - t.shift.astype(c) if shift else b.astype(c)
            return out / t.scale.astype(c)

        bias = _protocol.BiasHook(name=bias_name, apply=bias_apply,
                              unapply=bias_unapply, required=shift)

    def factored_matrix(w, t, f):
        c = ct(w, t)
        if side is Side.INPUT:
            return _protocol.FactoredTerms(in_scale=t.scale.astype(c))
        return _protocol.FactoredTerms(out_scale=t.scale.astype(c))

    kind = "ssf" if shift else f"ia3(side={side.value})"
    return _lift.lift_matrix(
        name=f"scale_shift[{kind}, init_std={init_std}]",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        bias=bias,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
    )


def ia3(side: Side = Side.OUTPUT, **kwargs: Any) -> _protocol.Adapter:
    """(IA)³: a learned scale initialised to 1 (identity at init).

    Args:
      side: ``Side.OUTPUT`` for attention k/v, ``Side.INPUT`` for the
        feed-forward down projection (as (IA)³ does).
      **kwargs: ``bias_name``, ``dimension_numbers``, ``param_dtype``.

    Returns:
      ``scale_shift(side=side)``.

    Example:
      >>> ia3(Side.INPUT)
      scale_shift[ia3(side=input), init_std=0.0]
    """
    return scale_shift(side=side, shift=False, init_std=0.0, **kwargs)


def ssf(*, zero_init: bool = False, **kwargs: Any) -> _protocol.Adapter:
    """SSF scale-and-shift of a linear layer's output, folded into W and b.

    Args:
      zero_init: ``γ = 1, β = 0`` exactly instead of SSF's ``N(1, 0.02²)`` /
        ``N(0, 0.02²)`` (not an identity at init).
      **kwargs: ``bias_name``, ``dimension_numbers``, ``param_dtype``.

    Returns:
      ``scale_shift(side=Side.OUTPUT, shift=True, init_std=0.02 or 0)``.

    Example:
      >>> ssf(zero_init=True)
      scale_shift[ssf, init_std=0.0]
    """
    return scale_shift(side=Side.OUTPUT, shift=True,
                       init_std=0.0 if zero_init else 0.02, **kwargs)
