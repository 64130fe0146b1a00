# SPDX-License-Identifier: Apache-2.0
"""Exact conversion between unrolled and scanned (stacked) layer layouts.

Unrolled paths are ``layers/{i}/.../kernel``; scanned paths are
``layers/.../kernel`` with a leading layer axis. ``stack_layers`` and
``unstack_layers`` convert parameter trees (nested dicts, as given by
``nnx.to_pure_dict`` or Linen) and flat ``{path: value}`` dicts such as an
adapter state's ``trainable``/``frozen`` between the two, exactly (stacking is
a concatenation; no arithmetic).

Exports: ``stack_layers``, ``unstack_layers``.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def _is_flat(tree: Any) -> bool:
    return isinstance(tree, Mapping) and any(
        isinstance(k, str) and "/" in k for k in tree
    )


def _stack(items: list[Any], where: str) -> Any:
    structs = [jax.tree.structure(x) for x in items]
    for i, s in enumerate(structs[1:], start=1):
        if s != structs[0]:
            raise ValueError(
                f"stack_layers: layer {i} under {where!r} has structure {s}, "
                f"layer 0 has {structs[0]}; layers must be identical to stack"
            )
    shapes = [[(x.shape, x.dtype) for x in jax.tree.leaves(t)] for t in items]
    for i, s in enumerate(shapes[1:], start=1):
        if s != shapes[0]:
            raise ValueError(
                f"stack_layers: layer {i} under {where!r} has leaf shapes/dtypes "
                f"{s}, layer 0 has {shapes[0]}"
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


def _layer_indices(keys: list[Any], where: str) -> list[Any]:
    idx = []
    for k in keys:
        if isinstance(k, int) or (isinstance(k, str) and k.isdigit()):
            idx.append(k)
        else:
            raise ValueError(
                f"stack_layers: key {k!r} under {where!r} is not a layer index"
            )
    order = sorted(idx, key=int)
    if [int(k) for k in order] != list(range(len(order))):
        raise ValueError(
            f"stack_layers: layer indices under {where!r} are {sorted(map(int, idx))}"
            f"; expected 0..{len(order) - 1}"
        )
    return order


def _get(tree: Mapping, parts: list[str], where: str) -> Any:
    node = tree
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            raise ValueError(f"no subtree {where!r} in the given tree")
        node = node[p]
    return node


def _replace(tree: Mapping, parts: list[str], value: Any) -> dict:
    out = dict(tree)
    if len(parts) == 1:
        out[parts[0]] = value
    else:
        out[parts[0]] = _replace(tree[parts[0]], parts[1:], value)
    return out


def stack_layers(tree: Any, *, prefix: str = "layers") -> Any:
    """Converts the unrolled layout under ``prefix`` to the scanned layout.

    Args:
      tree: a nested dict with ``{prefix: {0: layer, 1: layer, ...}}`` (int or
        digit-string keys), or a flat dict keyed by canonical paths
        (``"layers/3/attn/q/kernel"``), e.g. ``AdapterState.trainable``.
      prefix: the path of the layer container, ``/``-separated.

    Returns:
      The same kind of tree with ``{prefix: stacked_layer}`` (nested) or keys
      ``"layers/attn/q/kernel"`` (flat) whose leaves gain a leading axis.

    Raises:
      ValueError: missing prefix, non-contiguous indices, or layers that differ
        in structure, shape or dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"layers": {0: {"w": jnp.zeros(2)}, 1: {"w": jnp.ones(2)}}}
      >>> stack_layers(t)["layers"]["w"].shape
      (2, 2)
    """
    if _is_flat(tree):
        pat = re.compile(re.escape(prefix) + r"/(\d+)/(.+)")
        groups: dict[str, dict[int, Any]] = {}
        out: dict[str, Any] = {}
        for k, v in tree.items():
            m = pat.fullmatch(k)
            if m is None:
                out[k] = v
            else:
                groups.setdefault(m.group(2), {})[int(m.group(1))] = v
        if not groups:
            raise ValueError(f"stack_layers: no path starts with {prefix!r}/<i>/")
        n = max(len(g) for g in groups.values())
        for rest, g in groups.items():
            if sorted(g) != list(range(n)):
                raise ValueError(
                    f"stack_layers: {prefix}/<i>/{rest} exists for layers "
                    f"{sorted(g)}, expected all of 0..{n - 1}"
                )
            out[f"{prefix}/{rest}"] = _stack(
                [g[i] for i in range(n)], f"{prefix}/<i>/{rest}"
            )
        return out
    parts = prefix.split("/")
    layers = _get(tree, parts, prefix)
    if not isinstance(layers, Mapping):
        raise ValueError(f"stack_layers: {prefix!r} is not a dict of layers")
    order = _layer_indices(list(layers), prefix)
    return _replace(tree, parts, _stack([layers[k] for k in order], prefix))


def unstack_layers(tree: Any, *, prefix: str = "layers",
                   index_type: type = int) -> Any:
    """Converts the scanned layout under ``prefix`` to the unrolled layout.

    Args:
      tree: a nested dict with ``{prefix: stacked_layer}`` or a flat dict with
        keys ``"layers/..."`` whose leaves have a leading layer axis.
      prefix: the path of the layer container, ``/``-separated.
      index_type: ``int`` (as ``nnx.to_pure_dict`` gives) or ``str`` for the
        layer keys of nested trees; flat keys are always strings.

    Returns:
      The unrolled tree; ``stack_layers(unstack_layers(t)) == t`` exactly.

    Raises:
      ValueError: leaves under ``prefix`` that disagree on the number of layers.

    Example:
      >>> import jax.numpy as jnp
      >>> t = unstack_layers({"layers/w": jnp.zeros((3, 2))})
      >>> sorted(t)
      ['layers/0/w', 'layers/1/w', 'layers/2/w']
    """

    def count(sub: Any, where: str) -> int:
        sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(sub)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"unstack_layers: leaves under {where!r} have leading sizes "
                f"{sorted(map(str, sizes))}; they must share one layer axis"
            )
        return sizes.pop()

    if _is_flat(tree):
        head = prefix + "/"
        stacked = {k: v for k, v in tree.items() if k.startswith(head)}
        if not stacked:
            raise ValueError(f"unstack_layers: no path starts with {head!r}")
        n = count(stacked, prefix)
        out: dict[str, Any] = {}
        for k, v in tree.items():
            if k in stacked:
                rest = k[len(head):]
                for i in range(n):
                    out[f"{head}{i}/{rest}"] = jax.tree.map(lambda x, i=i: x[i], v)
            else:
                out[k] = v
        return out
    parts = prefix.split("/")
    sub = _get(tree, parts, prefix)
    n = count(sub, prefix)
    layers = {index_type(i): jax.tree.map(lambda x, i=i: x[i], sub) for i in range(n)}
    return _replace(tree, parts, layers)
