# SPDX-License-Identifier: Apache-2.0
"""Matrix-view presets for common kernel layouts (``peftjax.tree.dims``).

Each function returns the ``DimensionNumbers`` of one kernel layout, to pass
as ``dimension_numbers=`` to an adapter or GaLore/FRUGAL, or in a
``Layout(views=...)``; ``multi_head_attention`` returns a whole ``Layout``.

=================================  ==========================  ===================
layout                             kernel shape                view (in, out)
=================================  ==========================  ===================
``dense()``                        ``(in, out)`` (Flax)        ``(in, out)``
``transposed()``                   ``(out, in)`` (Equinox)     ``(in, out)``
``stacked(layers)``                ``(L..., in, out)``         per layer
``head_split()``                   ``(embed, heads, head_dim)``  ``(embed, heads·head_dim)``
``head_merge()``                   ``(heads, head_dim, embed)``  ``(heads·head_dim, embed)``
``linear_general(n_in, n_out)``    ``(batch..., in..., out...)``  flattened
``conv(spatial)``                  ``(spatial..., in, out)``   ``(prod(spatial)·in, out)``
``einsum(spec)``                   the kernel of ``spec``      contracted x kept
=================================  ==========================  ===================

Exports: ``dense``, ``transposed``, ``stacked``, ``head_split``,
``head_merge``, ``linear_general``, ``conv``, ``einsum``,
``multi_head_attention``.
"""

from peftjax.tree import _layouts, _matrix

_DN = _matrix.DimensionNumbers


def _count(n: object, name: str, least: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < least:
        raise ValueError(f"{name} must be an int >= {least}, got {n!r}")
    return n


def dense() -> _matrix.DimensionNumbers:
    """The Flax ``(in, out)`` view (Linen ``Dense``, NNX ``Linear``).

    Returns:
      ``DimensionNumbers(reduction_axis=0, output_axis=1)``.

    Example:
      >>> dense()
      DimensionNumbers(reduction_axis=(0,), output_axis=(1,), batch_axis=())
    """
    return _DN(reduction_axis=0, output_axis=1)


def transposed() -> _matrix.DimensionNumbers:
    """The torch/Equinox ``(out, in)`` layout, viewed as ``(in, out)``.

    Returns:
      ``DimensionNumbers(reduction_axis=1, output_axis=0)``.

    Example:
      >>> transposed()
      DimensionNumbers(reduction_axis=(1,), output_axis=(0,), batch_axis=())
    """
    return _DN(reduction_axis=1, output_axis=0)


def stacked(layers: int = 1) -> _matrix.DimensionNumbers:
    """Stacked layers ``(L..., in, out)``: one matrix per layer.

    Prefer declaring the container once (``tree.stacked("blocks")``); this is
    the same view for a single leaf.

    Args:
      layers: the number of leading layer axes.

    Returns:
      ``DimensionNumbers(reduction_axis=layers, output_axis=layers + 1,
      batch_axis=(0, ..., layers - 1))``.

    Example:
      >>> stacked()
      DimensionNumbers(reduction_axis=(1,), output_axis=(2,), batch_axis=(0,))
    """
    n = _count(layers, "stacked: layers", 1)
    return _DN(reduction_axis=n, output_axis=n + 1, batch_axis=tuple(range(n)))


def head_split() -> _matrix.DimensionNumbers:
    """A head-split projection ``(embed, heads, head_dim)`` (query/key/value).

    Flax's ``MultiHeadAttention`` (NNX) and ``MultiHeadDotProductAttention``
    (Linen) keep their query, key and value kernels this way; LoRA(r) on one
    trains ``r·(embed + heads·head_dim)`` parameters.

    Returns:
      ``DimensionNumbers(reduction_axis=0, output_axis=(1, 2))``.

    Example:
      >>> head_split()
      DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2), batch_axis=())
    """
    return _DN(reduction_axis=0, output_axis=(1, 2))


def head_merge() -> _matrix.DimensionNumbers:
    """A head-merge projection ``(heads, head_dim, embed)`` (the ``out`` kernel).

    Returns:
      ``DimensionNumbers(reduction_axis=(0, 1), output_axis=2)``.

    Example:
      >>> head_merge()
      DimensionNumbers(reduction_axis=(0, 1), output_axis=(2,), batch_axis=())
    """
    return _DN(reduction_axis=(0, 1), output_axis=2)


def linear_general(n_in: int = 1, n_out: int = 1, n_batch: int = 0
                   ) -> _matrix.DimensionNumbers:
    """Linen ``DenseGeneral`` / NNX ``LinearGeneral`` kernels.

    Their kernel is ``batch_shape + in_shape + out_shape`` (``batch_dims`` /
    ``batch_axis``, contracted ``axis``, ``features`` / ``out_features``).

    Args:
      n_in: how many contracted (input) axes, ``len(axis)``.
      n_out: how many output axes, ``len(features)``.
      n_batch: how many leading batch axes (each gets its own matrix).

    Returns:
      The view with the input axes flattened into ``in`` and the output axes
      into ``out``.

    Example:
      >>> linear_general(n_in=1, n_out=2)  # features=(heads, head_dim)
      DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2), batch_axis=())
    """
    n_in = _count(n_in, "linear_general: n_in", 1)
    n_out = _count(n_out, "linear_general: n_out", 1)
    n_batch = _count(n_batch, "linear_general: n_batch", 0)
    b = tuple(range(n_batch))
    red = tuple(range(n_batch, n_batch + n_in))
    out = tuple(range(n_batch + n_in, n_batch + n_in + n_out))
    return _DN(reduction_axis=red, output_axis=out, batch_axis=b)


def conv(spatial: int = 2) -> _matrix.DimensionNumbers:
    """A Flax convolution kernel ``(spatial..., in, out)`` (HWIO for 2-D).

    The view is ``(prod(spatial)·in, out)``: PEFT's LoRA for ``Conv2d`` is
    the same factorisation (``A`` carries the spatial window and the input
    channels, ``B`` is a 1x1 convolution), so ``lora(r)`` trains
    ``r·(kh·kw·in + out)`` parameters. Linen ``Conv`` and NNX ``Conv`` both
    use this layout (with ``feature_group_count > 1``, ``in`` is the channels
    per group). ``peftjax.adapters.lora_conv`` is LoRA under this view that
    the factored path runs as PEFT's conv + 1x1 conv.

    Args:
      spatial: the number of spatial axes (1, 2 or 3 for 1-D/2-D/3-D convs).

    Returns:
      ``DimensionNumbers(reduction_axis=(0, ..., spatial), output_axis=spatial + 1)``.

    Example:
      >>> conv()
      DimensionNumbers(reduction_axis=(0, 1, 2), output_axis=(3,), batch_axis=())
    """
    k = _count(spatial, "conv: spatial", 1)
    return _DN(reduction_axis=tuple(range(k + 1)), output_axis=k + 1)


def einsum(spec: str, *, kernel: int = 1) -> _matrix.DimensionNumbers:
    """The view of an einsum kernel (Linen/NNX ``Einsum``) from its equation.

    A kernel axis that is contracted with the input (in the input, not in the
    output) is a reduction axis; one that reaches the output but not the
    input is an output axis; one shared by input, kernel and output (experts,
    per-head weights) is a batch axis.

    Args:
      spec: the einsum equation, e.g. ``"btd,dhk->bthk"``.
      kernel: which operand is the kernel (Flax's ``Einsum`` passes it second).

    Returns:
      The kernel's ``DimensionNumbers``.

    Raises:
      ValueError: not a two-operand equation with an explicit output, or a
        kernel axis that is summed away or has no input/output role.

    Example:
      >>> einsum("btd,dhk->bthk")
      DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2), batch_axis=())
      >>> einsum("ebd,edf->ebf")  # per-expert kernels: e is a batch axis
      DimensionNumbers(reduction_axis=(1,), output_axis=(2,), batch_axis=(0,))
    """
    if not isinstance(spec, str) or "->" not in spec:
        raise ValueError(f"einsum: spec must be an equation with '->', got {spec!r}")
    lhs, out = spec.replace(" ", "").split("->")
    ops = lhs.split(",")
    if len(ops) != 2 or kernel not in (0, 1):
        raise ValueError(f"einsum: spec must have two operands (input, kernel) and "
                         f"kernel must be 0 or 1, got {spec!r}, kernel={kernel}")
    k_sub, x_sub = ops[kernel], ops[1 - kernel]
    if "." in k_sub or len(set(k_sub)) != len(k_sub):
        raise ValueError(f"einsum: the kernel subscripts {k_sub!r} of {spec!r} must "
                         "be distinct letters without '...'")
    red, outs, batch = [], [], []
    for axis, c in enumerate(k_sub):
        in_x, in_out = c in x_sub, c in out
        if in_x and in_out:
            batch.append(axis)
        elif in_x:
            red.append(axis)
        elif in_out:
            outs.append(axis)
        else:
            raise ValueError(f"einsum: kernel axis {axis} ({c!r}) of {spec!r} is "
                             "summed away; it is neither input nor output")
    if not red or not outs:
        raise ValueError(f"einsum: the kernel of {spec!r} needs a contracted axis "
                         f"and an output axis, got reduction {red}, output {outs}")
    return _DN(reduction_axis=tuple(red), output_axis=tuple(outs),
               batch_axis=tuple(batch))


def multi_head_attention(query_key_value: str = r"(?:.*/)?(?:query|key|value)/kernel",
                         out: str = r"(?:.*/)?out/kernel") -> _layouts.Layout:
    """A ``Layout`` for Flax's multi-head attention kernels (Linen and NNX).

    ``query``/``key``/``value`` kernels ``(embed, heads, head_dim)`` get
    ``head_split()``, the ``out`` kernel ``(heads, head_dim, embed)`` gets
    ``head_merge()``. Views apply only to 3-D kernels (per layer), so a 2-D
    ``out/kernel`` of a plain ``Dense`` keeps ``(in, out)``; the 2-D
    ``(heads, head_dim)`` biases are not matrices for GaLore/FRUGAL.

    Args:
      query_key_value: path regex of the projection kernels.
      out: path regex of the output kernel.

    Returns:
      ``Layout(views={query_key_value: head_split(), out: head_merge()})``;
      combine with ``tree.stacked(...)`` via ``|``.

    Example:
      >>> lay = multi_head_attention()
      >>> [d for _, d in lay.views][1]
      DimensionNumbers(reduction_axis=(0, 1), output_axis=(2,), batch_axis=())
    """
    return _layouts.Layout(views={query_key_value: head_split(), out: head_merge()})
