# SPDX-License-Identifier: Apache-2.0
"""Meshes with data, fsdp and tensor axes, and the shardings every step needs.

A ``jax.sharding.Mesh`` with the axis names ``("data", "fsdp", "tensor")`` and
``AxisType.Auto`` axes (GSPMD-style: ``jit`` propagates shardings and
``with_sharding_constraint`` works; ``jax.make_mesh``'s default explicit axes
would make it raise). The batch axis of the inputs is split over ``data`` and
``fsdp`` together: FSDP is data parallelism whose parameters, gradients and
optimizer state are also split over ``fsdp``.

Exports: ``AXES``, ``BATCH_AXES``, ``make_mesh``, ``batch_sharding``,
``replicated``, ``refresh_sharding``.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Returns a ``(data, fsdp, tensor)`` mesh with ``AxisType.Auto`` axes.

    Args:
      data: devices along the pure data-parallel axis (parameters replicated).
      fsdp: devices along the fully-sharded data-parallel axis (batch split,
        parameters, gradients and optimizer state sharded).
      tensor: devices along the tensor-parallel axis (matrices split along
        their input or output axis, Megatron style).
      devices: the devices to lay out, in order; default ``jax.devices()``
        (all processes' devices on a multi-host run), which must then number
        exactly ``data * fsdp * tensor``.

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``("data", "fsdp", "tensor")``.

    Raises:
      ValueError: a non-positive size, or a size product that does not match
        the number of devices.

    Example:
      >>> import jax
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> dict(mesh.shape)
      {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {size!r}")
    n = math.prod(sizes.values())
    devs = list(jax.devices() if devices is None else devices)
    if len(devs) != n:
        hint = (
            ""
            if devices is not None
            else f"; pass devices=jax.devices()[:{n}] to use a subset"
        )
        raise ValueError(
            f"make_mesh: data={data} x fsdp={fsdp} x tensor={tensor} = {n} devices, "
            f"but {len(devs)} devices were given{hint}"
        )
    return jax.make_mesh(
        (data, fsdp, tensor),
        AXES,
        axis_types=(AxisType.Auto,) * len(AXES),
        devices=devs,
    )


def _batch_entry(mesh: Any) -> Any:
    names = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return names if names else None


def batch_sharding(mesh: Any, ndim: int = 2) -> NamedSharding:
    """Returns the sharding of a batch: leading axis split over data and fsdp.

    Args:
      mesh: a mesh from ``make_mesh`` (any mesh; its ``data``/``fsdp`` axes, if
        present, split the batch).
      ndim: the rank of the batch arrays (e.g. 2 for tokens ``(B, T)``).

    Returns:
      ``NamedSharding(mesh, P(("data", "fsdp"), None, ...))``; the global
      batch size must be divisible by ``data * fsdp``.

    Example:
      >>> import jax
      >>> batch_sharding(make_mesh(devices=jax.devices()[:1])).spec
      P(('data', 'fsdp'), None)
    """
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"batch_sharding: ndim must be a positive int, got {ndim!r}")
    return NamedSharding(
        mesh, PartitionSpec(_batch_entry(mesh), *([None] * (ndim - 1)))
    )


def replicated(mesh: Any) -> NamedSharding:
    """Returns the fully replicated sharding on ``mesh`` (scalars, losses, keys).

    Args:
      mesh: any mesh.

    Returns:
      ``NamedSharding(mesh, P())``.

    Example:
      >>> import jax
      >>> replicated(make_mesh(devices=jax.devices()[:1])).spec
      P()
    """
    return NamedSharding(mesh, PartitionSpec())


def refresh_sharding(mesh: Any) -> NamedSharding:
    """Returns the slice-axis sharding that spreads GaLore/FRUGAL refreshes.

    Pass it as ``refresh_sharding=`` to ``peftjax.optim.galore`` or ``frugal``:
    the ``(layers, in, out)`` gradient slices of a stacked leaf are padded to
    a multiple of the mesh size and split over every mesh axis, so each device
    runs the SVDs of its own layers (``L/n`` instead of ``L``) and never holds
    more than its layers' gradients.

    Args:
      mesh: the training mesh.

    Returns:
      ``NamedSharding(mesh, P(mesh.axis_names))``.

    Example:
      >>> import jax
      >>> refresh_sharding(make_mesh(devices=jax.devices()[:1])).spec
      P(('data', 'fsdp', 'tensor'),)
    """
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
