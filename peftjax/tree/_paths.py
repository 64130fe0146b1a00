# SPDX-License-Identifier: Apache-2.0
"""Canonical ``/``-joined leaf paths for any parameter pytree.

A leaf's path is its key path joined by ``/`` with no leading slash
(``layers/3/attn/q_proj/kernel``). Raw dicts, Linen ``params``, ``nnx.State``
(directly or through ``nnx.to_pure_dict``) and Equinox modules of the same
model give the same paths: the trailing ``value`` attribute that flattening an
``nnx.State`` produces is stripped.

Exports: ``Path``, ``canonical``, ``flatten``, ``paths``, ``map_with_path``,
``leaves_by_path``, ``replace_leaves``.
"""

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import jax

Path = str
PyTree = Any

# Key-path entries whose name is dropped from canonical paths: NNX
# ``Variable``/``VariableState`` flatten to ``.../value`` (and older
# ``raw_value``); the parameter itself is what the user means.
_STRIPPED_ATTRS = ("value", "raw_value")


def _entry_name(entry: Any) -> str:
    """Returns the path component of one key-path entry."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    # Custom key types (e.g. flax's) print their key with ``str``.
    key = getattr(entry, "key", None)
    return str(key) if key is not None else str(entry)


def _is_variable_attr(entry: Any) -> bool:
    return (
        isinstance(entry, jax.tree_util.GetAttrKey)
        and entry.name in _STRIPPED_ATTRS
    )


def canonical(keypath: tuple[Any, ...]) -> Path:
    """Joins a JAX key path into the canonical ``/``-separated path.

    Args:
      keypath: a key path as returned by ``jax.tree.flatten_with_path``.

    Returns:
      The path string, e.g. ``"params/Dense_0/kernel"``. A trailing NNX
      ``value`` attribute is removed so that ``nnx.State`` and
      ``nnx.to_pure_dict`` agree.

    Example:
      >>> import jax.numpy as jnp
      >>> [canonical(kp) for kp, _ in
      ...  jax.tree.flatten_with_path({"a": {"b": jnp.zeros(2)}})[0]]
      ['a/b']
    """
    entries = list(keypath)
    while entries and _is_variable_attr(entries[-1]):
        entries.pop()
    return "/".join(_entry_name(e) for e in entries)


def flatten(tree: PyTree, *, is_leaf: Callable[[Any], bool] | None = None
            ) -> list[tuple[Path, Any]]:
    """Flattens ``tree`` into ``(path, leaf)`` pairs in tree order.

    Args:
      tree: any pytree (dict, Linen params, ``nnx.State``, Equinox module).
      is_leaf: optional predicate forwarded to ``jax.tree.flatten_with_path``.

    Returns:
      A list of ``(path, leaf)`` pairs.

    Raises:
      ValueError: if two leaves map to the same canonical path (for example an
        int key ``0`` next to a str key ``"0"``); the message names both.

    Example:
      >>> import jax.numpy as jnp
      >>> [p for p, _ in flatten({"w": jnp.ones(2), "b": {"0": jnp.ones(1)}})]
      ['b/0', 'w']
    """
    pairs, _ = jax.tree.flatten_with_path(tree, is_leaf=is_leaf)
    out: list[tuple[Path, Any]] = []
    seen: dict[Path, tuple[Any, ...]] = {}
    for keypath, leaf in pairs:
        path = canonical(keypath)
        if path in seen:
            raise ValueError(
                f"two leaves share the canonical path {path!r}: key paths "
                f"{jax.tree_util.keystr(seen[path])} and "
                f"{jax.tree_util.keystr(keypath)}; rename one of the keys "
                "(e.g. an int key next to the same str key)"
            )
        seen[path] = keypath
        out.append((path, leaf))
    return out


def paths(tree: PyTree) -> list[Path]:
    """Returns the canonical paths of all leaves of ``tree`` in tree order.

    Args:
      tree: any parameter pytree.

    Returns:
      The list of paths.

    Example:
      >>> import jax.numpy as jnp
      >>> paths({"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
      ['dense/bias', 'dense/kernel']
    """
    return [p for p, _ in flatten(tree)]


def leaves_by_path(tree: PyTree) -> dict[Path, Any]:
    """Returns a flat ``{path: leaf}`` dict of ``tree``.

    Args:
      tree: any parameter pytree.

    Returns:
      A dict in tree order.

    Example:
      >>> import jax.numpy as jnp
      >>> list(leaves_by_path({"a": jnp.ones(1), "b": [jnp.ones(1)]}))
      ['a', 'b/0']
    """
    return dict(flatten(tree))


def map_with_path(fn: Callable[[Path, Any], Any], tree: PyTree) -> PyTree:
    """Maps ``fn(path, leaf)`` over ``tree``, keeping its structure.

    Args:
      fn: a function of the canonical path and the leaf.
      tree: any pytree.

    Returns:
      A tree with the same structure as ``tree``.

    Example:
      >>> import jax.numpy as jnp
      >>> map_with_path(lambda p, x: p, {"a": jnp.ones(1)})
      {'a': 'a'}
    """
    flatten(tree)  # validates that canonical paths are unique
    return jax.tree.map_with_path(lambda kp, x: fn(canonical(kp), x), tree)


def replace_leaves(tree: PyTree, leaves: Mapping[Path, Any]) -> PyTree:
    """Returns ``tree`` with the leaves at the given paths replaced.

    Args:
      tree: any pytree.
      leaves: ``{path: new_leaf}``; every path must be a leaf path of
        ``tree`` (the new leaf may have another shape or dtype).

    Returns:
      A tree with the structure of ``tree``; leaves not named are passed
      through by identity.

    Raises:
      ValueError: a path of ``leaves`` is not in ``tree`` (the nearest
        paths are listed).

    Example:
      >>> import jax.numpy as jnp
      >>> replace_leaves({"a": 1, "b": {"c": 2}}, {"b/c": 3})
      {'a': 1, 'b': {'c': 3}}
    """
    known = paths(tree)
    present = set(known)
    missing = [p for p in leaves if p not in present]
    if missing:
        near = difflib.get_close_matches(missing[0], known, n=5)
        raise ValueError(
            f"replace_leaves: paths not in the tree: {missing[:10]}; nearest "
            f"to {missing[0]!r}: {near}"
        )
    return map_with_path(lambda p, x: leaves[p] if p in leaves else x, tree)
