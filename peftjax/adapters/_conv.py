# SPDX-License-Identifier: Apache-2.0
"""LoRA on convolution kernels: ``conv(x, W) + s·conv1x1(conv(x, A), B)``.

LoRA: Low-Rank Adaptation of Large Language Models. Hu et al., 2021.
https://arxiv.org/abs/2106.09685 (the conv form is Hugging Face PEFT's
``lora.Conv1d``/``Conv2d``/``Conv3d``: ``lora_A`` is a conv with the base
layer's kernel size, ``lora_B`` a 1x1 conv).

A Flax ``nn.Conv``/``nnx.Conv`` kernel is ``(k_1, ..., k_n, in, out)`` (HWIO
for 2-D). Seen as the matrix ``(k_1·...·k_n·in, out)`` (reduction axes
``0..n``, output axis ``n+1``), LoRA's ``W' = W + s·A@B`` with ``A (k·in, r)``
and ``B (r, out)`` is exactly PEFT's conv LoRA: ``A`` reshaped to
``(k_1, ..., k_n, in, r)`` is the kernel of ``lora_A`` and ``B`` the kernel
of the 1x1 ``lora_B``, because a convolution is linear in its kernel:

    conv(x, W + s·reshape(A@B)) = conv(x, W) + s·conv1x1(conv(x, A), B).

``materialize``/``fold`` use the left side (plain LoRA under that view);
the factored path (``peftjax.factored``) computes the right side for every
``conv_general_dilated`` that consumes the kernel, with the base conv's
strides, padding, dilations and feature groups, and never forms ``reshape(A@B)``
nor its cotangent.

Paper Eq. (3) ↔ ``lora_conv``'s ``apply`` (under the conv matrix view).

Exports: ``lora_conv``, ``conv_dimension_numbers``, ``LowRankDelta``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lora, _lowrank, _protocol


class LowRankDelta(NamedTuple):
    """A ``FactoredTerms.delta`` that also exposes its factors.

    Calling it on ``x (..., in)`` returns ``scale·(x@a[@core])@b`` like any
    low-rank delta; ``peftjax.factored`` reads the factors to run the delta of a
    convolution kernel as two convolutions.

    Attributes:
      a: ``(in, r)``.
      b: ``(r, out)``.
      scale: a Python float.
      core: optional ``(r, r)`` between the factors.

    Example:
      >>> import jax.numpy as jnp
      >>> d = LowRankDelta(jnp.ones((3, 1)), jnp.ones((1, 2)), 0.5)
      >>> d(jnp.ones((1, 3)))
      Array([[1.5, 1.5]], dtype=float32)
    """

    a: jax.Array
    b: jax.Array
    scale: float = 1.0
    core: jax.Array | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return _lowrank.low_rank(x, self.a, self.b, self.scale, core=self.core)


def conv_dimension_numbers(spatial_dims: int) -> tree.DimensionNumbers:
    """The matrix view of a Flax conv kernel ``(k_1, ..., k_n, in, out)``.

    Args:
      spatial_dims: ``n``: 1 for ``Conv1d``-like kernels ``(k, in, out)``, 2 for
        HWIO ``(kh, kw, in, out)``, 3 for ``(kd, kh, kw, in, out)``.

    Returns:
      ``DimensionNumbers(reduction_axis=(0, ..., n), output_axis=n + 1)``.

    Example:
      >>> conv_dimension_numbers(2)
      DimensionNumbers(reduction_axis=(0, 1, 2), output_axis=(3,), batch_axis=())
    """
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or (
            spatial_dims < 1):
        raise ValueError(
            f"conv_dimension_numbers: spatial_dims must be a positive int, got "
            f"{spatial_dims!r}")
    return tree.DimensionNumbers(
        reduction_axis=tuple(range(spatial_dims + 1)), output_axis=spatial_dims + 1)


def lora_conv(
    rank: int,
    *,
    spatial_dims: int = 2,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    init: _lora.LoRAInit = _lora.LoRAInit.KAIMING_UNIFORM,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """LoRA on a conv kernel, factored as PEFT's ``lora_A`` conv + 1x1 ``lora_B``.

    For a Flax kernel ``W (k_1, ..., k_n, in, out)`` (``n = spatial_dims``):
    ``a: (k_1·...·k_n·in, r)``, ``b: (r, out)`` and
    ``W' = W + s·reshape(a@b, W.shape)``, i.e. ``lora`` under
    ``conv_dimension_numbers(n)``. In the factored path a convolution with
    the kernel becomes ``conv(x, W) + s·conv1x1(conv(dropout(x), A), B)`` with
    ``A = reshape(a, (k_1, ..., k_n, in, r))`` (see the module docstring).
    Trainable parameters: ``r·(k_1·...·k_n·in + out)``.

    Conventions, as PEFT's ``_ConvNd`` (peft 0.21): ``A`` kaiming-uniform with
    ``a=sqrt(5)`` over its fan-in ``k·in`` (``U(±1/sqrt(k·in))``), ``B = 0``;
    ``s = alpha/r`` (``alpha/sqrt(r)`` with rsLoRA); dropout on the input of
    ``lora_A``. Torch layouts convert as ``W = weight.permute(2, 3, 1, 0)``
    (OIHW to HWIO), ``a = lora_A.weight.permute(2, 3, 1, 0).reshape(-1, r)``
    and ``b = lora_B.weight[:, :, 0, 0].T`` (2-D; likewise for 1-D/3-D).

    Where peftjax deliberately differs from PEFT:

    * Feature groups (``feature_group_count = g > 1``; the kernel is
      ``(k..., in/g, out)``): peftjax adapts that kernel itself, so merging is
      exact, and the factored form shares ``A`` across the ``g`` groups
      (``conv(x, [A]*g, groups=g)``) followed by a grouped 1x1 conv with ``B``.
      PEFT instead makes ``lora_A`` an ungrouped conv over all ``in``
      channels and ``lora_B`` a grouped 1x1 conv (``r % g == 0``), a delta that
      is not a kernel of the base's shape, so PEFT refuses to merge it; such
      an adapter has no peftjax equivalent.
    * Dilation: PEFT's ``lora_A`` does not take the base's dilation (with
      ``dilation > 1`` its unmerged forward fails to add to the base output);
      peftjax's ``A`` uses the base conv's dilation, which is what PEFT's
      merge computes.

    Args:
      rank: ``r`` (static; ``<= min(k·in, out)``).
      spatial_dims: number of spatial axes of the kernel (1, 2 or 3; the kernel
        must have ``spatial_dims + 2`` axes).
      alpha: ``lora_alpha`` (PEFT's default 8).
      scaling: a ``Scaling`` member (``alpha/r`` by default).
      init: a ``LoRAInit`` member (PEFT's kaiming-uniform ``A``, ``B = 0``).
      param_dtype: storage dtype of ``a`` and ``b``.
      dropout: dropout rate on the conv input of the adapter branch (factored
        path only; ``materialize`` needs ``deterministic=True``).

    Returns:
      An ``Adapter`` with trainable ``LoRAParams(a, b)`` and frozen None.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, bad ``spatial_dims``; at init, a kernel of
        another rank (naming its shape) or ``rank > min(k·in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lora_conv(2)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((3, 3, 4, 6)))
      >>> t.a.shape, t.b.shape
      ((36, 2), (2, 6))
    """
    dn = conv_dimension_numbers(spatial_dims)
    base = _lora.lora(rank, alpha=alpha, scaling=scaling, init=init,
                      dimension_numbers=dn, param_dtype=param_dtype, dropout=dropout)
    s = _lora.scaling_value(scaling, alpha, rank)
    name = (f"lora_conv(rank={rank}, spatial_dims={spatial_dims}, alpha={alpha}, "
            f"scaling={scaling.value})")

    def check(w: Any) -> None:
        shape = tuple(jnp.shape(w))
        if len(shape) != spatial_dims + 2:
            raise ValueError(
                f"{name} needs a {spatial_dims + 2}-D conv kernel (k..., in, out), "
                f"got shape {shape}, dtype {getattr(w, 'dtype', None)}; set "
                "spatial_dims to the kernel's number of spatial axes")

    def init_leaf(key: jax.Array, w: jax.Array, *, stats: Any = None):
        check(w)
        return base.init(key, w, stats=stats)

    def terms(w: jax.Array, t: _lora.LoRAParams, f: Any) -> _protocol.FactoredTerms:
        return _protocol.FactoredTerms(delta=LowRankDelta(t.a, t.b, s))

    return base._replace(
        init=init_leaf, name=name,
        factored=_protocol.FactoredForm(dimension_numbers=dn, terms=terms,
                                    apply=base.factored.apply))
