# SPDX-License-Identifier: Apache-2.0
"""Matrix views of kernels: ``DimensionNumbers`` with batch axes.

Every matrix method in peftjax (adapters, projectors) works on a kernel seen as
``(batch..., in, out)``. ``DimensionNumbers`` says which axes of a leaf are the
reduction (input) axes, the output axes and the batch axes (stacked layers,
experts). It reuses optax's vocabulary (``GaLoreDimensionNumbers``) and adds
``batch_axis``.

A 2-D leaf has one Flax view, ``(in, out)``, and that is the only default
here. A leaf of rank >= 3 is never guessed: ``(L, in, out)`` stacked layers,
a head-split ``(embed, heads, head_dim)`` kernel and an HWIO convolution all
look alike. Its view comes from explicit dimension numbers, or from a
``peftjax.tree.Layout`` (stacked layer containers) when the whole tree is
known; ``resolve(None, ...)`` of such a leaf is a ``ValueError`` naming the
path, the shape and the likely views as ``DimensionNumbers(...)`` expressions.

Exports: ``DimensionNumbers``, ``ResolvedDims``, ``resolve``, ``to_matrix``,
``from_matrix``, ``matrix_shape``, ``default_dimension_numbers``,
``suggested_views``, ``no_view_error``.
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

    @property
    def ndim(self) -> int:
        """The rank of the leaves this view fits (every axis is named once)."""
        return len(self.batch_axis) + len(self.reduction_axis) + len(self.output_axis)

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
    """Non-negative axes of one concrete leaf plus the matrix sizes.

    What ``resolve`` returns and ``to_matrix`` / ``from_matrix`` take: the
    leaf's ``shape`` and its ``batch``, ``reduction`` (input) and ``output``
    axes, each a tuple of non-negative ints that together cover every axis
    once. ``batch_shape``, ``n_in`` and ``n_out`` give the sizes of the
    ``(batch..., n_in, n_out)`` matrix view.

    Example:
      >>> r = resolve(DimensionNumbers(reduction_axis=1, output_axis=2,
      ...                              batch_axis=0), (5, 4, 3))
      >>> r.batch_shape, r.n_in, r.n_out
      ((5,), 4, 3)
    """

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

    Only a 2-D ``(in, out)`` kernel has a default. A leaf of rank >= 3 needs
    explicit dimension numbers or a declared ``peftjax.tree.Layout`` (stacked
    layers); nothing guesses between ``(L, in, out)`` and ``(embed, heads,
    head_dim)``.

    Args:
      ndim: the rank of the kernel.

    Returns:
      ``DimensionNumbers(reduction_axis=0, output_axis=1)`` for 2-D, else None.

    Example:
      >>> default_dimension_numbers(2)
      DimensionNumbers(reduction_axis=(0,), output_axis=(1,), batch_axis=())
      >>> default_dimension_numbers(3) is None
      True
    """
    if ndim == 2:
        return DimensionNumbers(reduction_axis=0, output_axis=1)
    return None


def suggested_views(shape: Sequence[int], n_layer: int = 0) -> list[str]:
    """Returns the likely views of a leaf as copy-pasteable expressions.

    Args:
      shape: the leaf's shape (rank >= 3 after the layer axes).
      n_layer: leading layer axes already declared as stacked (shifts the
        suggested axes and adds them as ``batch_axis``).

    Returns:
      ``DimensionNumbers(...)`` expressions, each with what it means.

    Example:
      >>> suggested_views((16, 4, 8))[0].split(" for ")[0]
      'DimensionNumbers(reduction_axis=0, output_axis=(1, 2))'
    """
    shape = tuple(int(s) for s in shape)
    k = len(shape) - n_layer
    lead = tuple(range(n_layer))

    def fmt(axes: tuple[int, ...]) -> str:
        axes = tuple(a + n_layer for a in axes)
        return str(axes[0]) if len(axes) == 1 else str(axes)

    def expr(red, out, batch=()) -> str:
        b = lead + tuple(a + n_layer for a in batch)
        text = f"DimensionNumbers(reduction_axis={fmt(red)}, output_axis={fmt(out)}"
        if b:
            text += f", batch_axis={b[0] if len(b) == 1 else b}"
        return text + ")"

    out = []
    if k == 3:
        out.append(expr((0,), (1, 2)) + " for (embed, heads, head_dim), a head-split "
                   "query/key/value kernel")
        out.append(expr((0, 1), (2,)) + " for (heads, head_dim, embed), a "
                   "head-merge output kernel, or (width, in, out), a 1-D conv kernel")
        out.append(expr((1,), (2,), (0,)) + " for (layers, in, out), stacked "
                   "layers (or declare the container with tree.stacked(prefix))")
    elif k >= 4:
        spatial = tuple(range(k - 1))
        out.append(expr(spatial, (k - 1,)) + f" for a {k - 2}-D conv kernel "
                   "(spatial..., in, out), HWIO")
        out.append(expr((k - 2,), (k - 1,), tuple(range(k - 2))) + " for "
                   f"{k - 2} stacked axes (..., in, out)")
    return out


def no_view_error(path: str, shape: Sequence[int], n_layer: int = 0,
                  note: str = "") -> ValueError:
    """The error for a leaf of rank >= 3 whose matrix view was not declared.

    Args:
      path: the leaf's path.
      shape: its shape.
      n_layer: leading axes already known to be stacked layers.
      note: an extra sentence (e.g. why a container was not taken as stacked).

    Returns:
      A ``ValueError`` naming the path, the shape and the likely views.

    Example:
      >>> print(str(no_view_error("attn/query/kernel", (16, 4, 8)))[:56])
      attn/query/kernel: shape (16, 4, 8) (rank 3) has no defa
    """
    shape = tuple(int(s) for s in shape)
    lines = [
        f"{path}: shape {shape} (rank {len(shape)}) has no default matrix view; a "
        "kernel of rank >= 3 is only viewed as stacked layers when the tree "
        "declares it. Likely views:"
    ]
    lines += [f"  {s}" for s in suggested_views(shape, n_layer)]
    lines.append(
        "Pass one as dimension_numbers= to the adapter (or GaLore/FRUGAL) for this "
        "leaf, use a preset of peftjax.tree.dims, or declare the tree's layout "
        "once: tree.assign(params, rules, layout=tree.stacked(\"<prefix>\")) for "
        "stacked layers, tree.Layout(views={<path regex>: <DimensionNumbers>})."
    )
    if note:
        lines.append(note)
    return ValueError("\n".join(lines))


def resolve(
    dims: DimensionNumbers | None,
    shape: Sequence[int],
    *,
    path: str = "<leaf>",
) -> ResolvedDims:
    """Validates ``dims`` against a concrete shape and normalises the axes.

    Args:
      dims: dimension numbers, or None for the Flax default (2-D only).
      shape: the leaf's shape.
      path: the leaf's path, used in error messages.

    Returns:
      A ``ResolvedDims`` with non-negative axes.

    Raises:
      ValueError: if ``dims`` is None and the leaf is not 2-D (for rank >= 3
        the message lists the likely views), if an axis is out of range,
        repeated, or if the axes do not cover the leaf exactly.

    Example:
      >>> resolve(None, (4, 3)).n_in, resolve(None, (4, 3)).n_out
      (4, 3)
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if dims is None:
        dims = default_dimension_numbers(ndim)
        if dims is None and ndim >= 3:
            raise no_view_error(path, shape)
        if dims is None:
            raise ValueError(
                f"{path}: shape {shape} (rank {ndim}) is not a matrix; only a 2-D "
                "(in, out) kernel has a default matrix view"
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
