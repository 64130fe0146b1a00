# SPDX-License-Identifier: Apache-2.0
"""Matrix views of kernels: ``DimensionNumbers`` with batch axes.

Every matrix method in peftjax (adapters, projectors) works on a kernel seen as
``(batch..., in, out)``. ``DimensionNumbers`` says which axes of a leaf are the
reduction (input) axes, the output axes and the batch axes (stacked layers,
experts). It reuses optax's vocabulary (``GaLoreDimensionNumbers``) and adds
``batch_axis``.

The default is Flax layout: 2-D ``(in, out)`` and 3-D stacked ``(L, in, out)``.
Any other rank (e.g. a head-split ``(embed, heads, head_dim)`` einsum kernel)
needs explicit dimension numbers, else a ``ValueError`` names the path.

Exports: ``DimensionNumbers``, ``resolve``, ``to_matrix``, ``from_matrix``,
``matrix_shape``, ``default_dimension_numbers``.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Axes = int | tuple[int, ...]


def _as_tuple(axes: Axes | Sequence[int]) -> tuple[int, ...]:
    if isinstance(axes, int):
        return (axes,)
    return tuple(int(a) for a in axes)


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
    """Which axes of a kernel are input, output and batch.

    Attributes:
      reduction_axis: the input (contracted) axis or axes; Flax ``(in, out)``
        kernels use ``0`` (or ``-2``), Equinox ``(out, in)`` uses ``1``.
      output_axis: the output axis or axes.
      batch_axis: leading axes over which the matrix method is applied
        independently (scanned layers ``(L, in, out)`` use ``0``).

    Example:
      >>> DimensionNumbers(reduction_axis=0, output_axis=(1, 2))  # (embed, h, d)
      DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2), batch_axis=())
    """

    reduction_axis: Axes = -2
    output_axis: Axes = -1
    batch_axis: Axes = ()

    def __post_init__(self):
        for name in ("reduction_axis", "output_axis", "batch_axis"):
            value = getattr(self, name)
            if not isinstance(value, (int, tuple, list)) or isinstance(value, bool):
                raise TypeError(
                    f"DimensionNumbers.{name} must be an int or a tuple of ints, "
                    f"got {value!r}"
                )
            object.__setattr__(self, name, _as_tuple(value))
        if not self.reduction_axis or not self.output_axis:
            raise ValueError(
                "DimensionNumbers needs at least one reduction axis and one "
                f"output axis, got {self}"
            )


@dataclasses.dataclass(frozen=True)
class ResolvedDims:
    """Non-negative axes of one concrete leaf plus the matrix sizes."""

    shape: tuple[int, ...]
    batch: tuple[int, ...]
    reduction: tuple[int, ...]
    output: tuple[int, ...]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.batch)

    @property
    def n_in(self) -> int:
        return math.prod(self.shape[a] for a in self.reduction)

    @property
    def n_out(self) -> int:
        return math.prod(self.shape[a] for a in self.output)

    @property
    def permutation(self) -> tuple[int, ...]:
        return self.batch + self.reduction + self.output

    @property
    def is_identity_layout(self) -> bool:
        return (
            self.permutation == tuple(range(len(self.shape)))
            and len(self.reduction) == 1
            and len(self.output) == 1
        )


def default_dimension_numbers(ndim: int) -> DimensionNumbers | None:
    """Returns the Flax-layout default for ``ndim``, or None if there is none.

    Args:
      ndim: the rank of the kernel.

    Returns:
      ``(in, out)`` for 2-D, ``(L, in, out)`` for 3-D, else None.

    Example:
      >>> default_dimension_numbers(3)
      DimensionNumbers(reduction_axis=(1,), output_axis=(2,), batch_axis=(0,))
    """
    if ndim == 2:
        return DimensionNumbers(reduction_axis=0, output_axis=1)
    if ndim == 3:
        return DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)
    return None


def resolve(
    dims: DimensionNumbers | None,
    shape: Sequence[int],
    *,
    path: str = "<leaf>",
) -> ResolvedDims:
    """Validates ``dims`` against a concrete shape and normalises the axes.

    Args:
      dims: dimension numbers, or None for the Flax default of the rank.
      shape: the leaf's shape.
      path: the leaf's path, used in error messages.

    Returns:
      A ``ResolvedDims`` with non-negative axes.

    Raises:
      ValueError: if the rank has no default and ``dims`` is None, if an axis is
        out of range, repeated, or if the axes do not cover the leaf exactly.

    Example:
      >>> resolve(None, (4, 3)).n_in, resolve(None, (4, 3)).n_out
      (4, 3)
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if dims is None:
        dims = default_dimension_numbers(ndim)
        if dims is None:
            raise ValueError(
                f"{path}: shape {shape} (rank {ndim}) has no default matrix view; "
                "only 2-D (in, out) and 3-D stacked (L, in, out) kernels have one. "
                "Pass dimension_numbers=DimensionNumbers(reduction_axis=..., "
                "output_axis=..., batch_axis=...) to the adapter or rule for this "
                "leaf."
            )

    def norm(axes: tuple[int, ...], name: str) -> tuple[int, ...]:
        out = []
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"{path}: {name}={a} is out of range for shape {shape}"
                )
            out.append(a % ndim)
        return tuple(out)

    batch = norm(dims.batch_axis, "batch_axis")
    red = norm(dims.reduction_axis, "reduction_axis")
    out = norm(dims.output_axis, "output_axis")
    allaxes = batch + red + out
    if len(set(allaxes)) != len(allaxes):
        raise ValueError(f"{path}: {dims} uses an axis twice for shape {shape}")
    if sorted(allaxes) != list(range(ndim)):
        missing = sorted(set(range(ndim)) - set(allaxes))
        raise ValueError(
            f"{path}: {dims} does not cover axes {missing} of shape {shape}; "
            "every axis must be a batch, reduction or output axis"
        )
    return ResolvedDims(shape=shape, batch=batch, reduction=red, output=out)


def matrix_shape(resolved: ResolvedDims) -> tuple[int, ...]:
    """Returns ``batch_shape + (n_in, n_out)`` of the matrix view."""
    return resolved.batch_shape + (resolved.n_in, resolved.n_out)


def to_matrix(w: jax.Array, resolved: ResolvedDims) -> jax.Array:
    """Transposes and reshapes ``w`` into its ``(batch..., in, out)`` view.

    Args:
      w: the leaf, with shape ``resolved.shape``.
      resolved: its resolved dimension numbers.

    Returns:
      The matrix view (a free reshape for the default layouts).

    Example:
      >>> import jax.numpy as jnp
      >>> r = resolve(DimensionNumbers(0, (1, 2)), (4, 2, 3))
      >>> to_matrix(jnp.zeros((4, 2, 3)), r).shape
      (4, 6)
    """
    if resolved.is_identity_layout:
        return w
    return jnp.transpose(w, resolved.permutation).reshape(matrix_shape(resolved))


def from_matrix(m: jax.Array, resolved: ResolvedDims) -> jax.Array:
    """Inverts ``to_matrix``.

    Args:
      m: the matrix view, shape ``batch_shape + (n_in, n_out)``.
      resolved: the dimension numbers it was made with.

    Returns:
      An array of shape ``resolved.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> r = resolve(DimensionNumbers(0, (1, 2)), (4, 2, 3))
      >>> from_matrix(jnp.zeros((4, 6)), r).shape
      (4, 2, 3)
    """
    if resolved.is_identity_layout:
        return m
    perm = resolved.permutation
    permuted_shape = tuple(resolved.shape[a] for a in perm)
    inverse = tuple(perm.index(i) for i in range(len(perm)))
    return jnp.transpose(m.reshape(permuted_shape), inverse)
