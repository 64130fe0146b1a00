# SPDX-License-Identifier: Apache-2.0
"""Reset or seed the optimizer state of individual slots (sparse regrowth).

When drop-and-regrow (``peftjax.masks.regrow``) moves a slot of a sparse
delta to a new position, its optimizer moments belong to the old position.
SpIEL (Ansell et al., 2024, https://arxiv.org/abs/2401.16405, reference
``update_optimizer``) overwrites them: zero, or seeded from accumulated
gradients. ``reset_slots`` does this on any optax state: it walks the state's
NamedTuples (through ``optax.chain`` tuples, ``optax.partition``/``masked``
inner states) and rewrites every field whose value is shaped like the params
(same key paths and shapes as ``changed``; ``MaskedNode`` holes allowed).
Scalar fields such as ``count`` are left alone.

Exports: ``reset_slots``.
"""

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _by_path(tree: PyTree) -> dict:
    return {kp: x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params_shaped(value: Any, changed: dict) -> bool:
    leaves = jax.tree_util.tree_flatten_with_path(value)[0]
    if not leaves:
        return False
    for kp, x in leaves:
        c = changed.get(kp)
        if c is None or tuple(jnp.shape(x)) != tuple(jnp.shape(c)):
            return False
    return True


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def reset_slots(opt_state: PyTree, changed: PyTree,
                seeds: dict[str, PyTree] | None = None) -> PyTree:
    """Zeroes (or seeds) the optimizer state at changed slots; pure and jittable.

    For every params-shaped field ``f`` of every state NamedTuple:
    ``f' = where(changed, seeds[f] if f in seeds else 0, f)``. Other slots
    and non-params fields (``count``, schedules, PRNG keys) are untouched.

    Args:
      opt_state: any optax state (``chain``, ``partition``, ``masked``,
        ``inject_hyperparams`` included).
      changed: a tree of bools with the params' structure and shapes
        (e.g. ``{path: SparseValues(values=changed_mask)}``).
      seeds: optional ``{field_name: tree shaped like the params}``; e.g.
        ``{"mu": ..., "nu": ..., "slot_count": ...}`` for ``sft_adamw``.

    Returns:
      The new state, same structure, shapes and dtypes.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = optax.adam(0.1)
      >>> p = {"w": jnp.ones(3)}
      >>> _, s = opt.update({"w": jnp.ones(3)}, opt.init(p))
      >>> s = reset_slots(s, {"w": jnp.array([False, True, False])})
      >>> s[0].mu["w"].tolist()
      [0.10000000149011612, 0.0, 0.10000000149011612]
    """
    cmap = _by_path(changed)
    seeds = seeds or {}
    smaps = {name: _by_path(t) for name, t in seeds.items()}

    def rewrite(value: Any, name: str) -> Any:
        smap = smaps.get(name)

        def one(kp, x):
            new = jnp.zeros_like(x) if smap is None else smap[kp].astype(x.dtype)
            return jnp.where(cmap[kp], new, x)

        return jax.tree_util.tree_map_with_path(one, value)

    def walk(node: Any) -> Any:
        if _is_namedtuple(node):
            out = {}
            for name in node._fields:
                v = getattr(node, name)
                out[name] = rewrite(v, name) if _params_shaped(v, cmap) else walk(v)
            return type(node)(**out)
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v) for v in node)
        if isinstance(node, dict):
            return type(node)((k, walk(v)) for k, v in node.items())
        return node

    return walk(opt_state)
