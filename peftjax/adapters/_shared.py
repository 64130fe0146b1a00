# SPDX-License-Identifier: Apache-2.0
"""Arrays shared by the adapters of several leaves (one array, one gradient).

Some methods train one array that every adapted matrix reads: VB-LoRA's
vector bank, UniLoRA's vector ``θ_d``, TinyLoRA's tied vectors. Such an array
lives once in the state, under the reserved key ``SHARED`` (``"@shared"``):
``AdapterState.trainable[SHARED] = {name: array}`` (frozen shared arrays
likewise in ``AdapterState.frozen[SHARED]``). A leaf's parameter NamedTuple
holds the placeholder ``Shared(name)`` in its place: a pytree node with no
children, so optimizers, ``jax.grad`` and checkpoints see only the one real
array, and its gradient is the sum over every leaf that uses it.

``resolve_shared`` swaps each placeholder for the array, broadcast over the
leaf's batch (stacked-layer) axes, so per-matrix math sees a plain array. The
tree verbs (``materialize``, ``fold``, ``unfold``) and ``factored.transform``
call it once at their start, inside the differentiated function.

An adapter declares its shared arrays with ``Adapter.shared =
SharedInit(group, config, init)``: ``adapters.init`` runs the per-leaf inits,
then each group's ``init`` once, with every leaf of the group in assignment
order (it may also fill in per-leaf arrays that depend on all of them, such as
UniLoRA's global index assignment).

``unshare`` turns such an adapter into one with a private copy per leaf.

Exports: ``SHARED``, ``Shared``, ``SharedInit``, ``SharedParts``,
``resolve_shared``, ``unshare``.
"""

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree

SHARED = "@shared"


@jax.tree_util.register_pytree_node_class
class Shared:
    """Placeholder for the shared array ``name`` inside a leaf's parameters.

    A pytree node with no children (the name is static aux data): it holds no
    array, so nothing is trained, stored or counted twice. In
    ``trainable[path]`` it stands for ``trainable[SHARED][name]``, in
    ``frozen[path]`` for ``frozen[SHARED][name]``.

    Args:
      name: the shared array's name (a non-empty string).

    Example:
      >>> import jax
      >>> s = Shared("bank")
      >>> s, jax.tree.leaves({"x": s}), s == Shared("bank")
      (Shared('bank'), [], True)
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise TypeError(f"Shared: name must be a non-empty str, got {name!r}")
        self.name = name

    def tree_flatten(self) -> tuple[tuple[()], str]:
        return (), self.name

    @classmethod
    def tree_unflatten(cls, name: str, children: Any) -> "Shared":
        del children
        return cls(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shared) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Shared", self.name))

    def __repr__(self) -> str:
        return f"Shared({self.name!r})"


class SharedParts(NamedTuple):
    """What a ``SharedInit.init`` returns.

    Attributes:
      trainable: ``{name: array}`` shared trainable arrays.
      frozen: ``{name: array}`` shared frozen arrays.
      leaves: ``{path: (trainable, frozen)}`` replacing per-leaf parameters
        that depend on the whole group (same structure, shapes and dtypes as
        the per-leaf init made); paths not listed keep theirs.
    """

    trainable: Mapping[str, Any] = {}
    frozen: Mapping[str, Any] = {}
    leaves: Mapping[str, tuple[Any, Any]] = {}


class SharedInit(NamedTuple):
    """How an adapter's shared arrays are made (``Adapter.shared``).

    Attributes:
      group: leaves whose adapters have the same ``group`` are initialised
        together (one call of ``init``).
      config: the hyperparameters that shape the shared arrays (hashable);
        must be equal over a group.
      init: ``(key, {path: (w, trainable, frozen)}) -> SharedParts``, given
        every leaf of the group in assignment order with its per-leaf init.
    """

    group: str
    config: Hashable
    init: Callable[[jax.Array, dict[str, tuple[Any, Any, Any]]], SharedParts]

    def shapes(self, members: Mapping[str, tuple[Any, Any]]) -> SharedParts:
        """The group's ``SharedParts`` as ``jax.ShapeDtypeStruct`` (nothing computed).

        Args:
          members: ``{path: (adapter, leaf)}`` of every leaf of the group, in
            assignment order (leaves may be ``jax.ShapeDtypeStruct``).

        Returns:
          ``init``'s ``SharedParts`` with abstract arrays.

        Example:
          >>> import jax.numpy as jnp
          >>> from peftjax import adapters
          >>> ad = adapters.vblora(2, num_vectors=6, vector_length=4)
          >>> ad.shared.shapes({"w": (ad, jnp.zeros((8, 4)))}).trainable["vblora"].shape
          (6, 4)
        """
        leaves = {}
        for path, (adapter, leaf) in members.items():
            spec = jax.ShapeDtypeStruct(_leaf_shape(leaf), leaf.dtype)
            t, f = jax.eval_shape(lambda k, w, a=adapter: a.init(k, w),
                                  jax.random.key(0), spec)
            leaves[path] = (spec, t, f)
        return jax.eval_shape(self.init, jax.random.key(0), leaves)


def is_shared(x: Any) -> bool:
    return isinstance(x, Shared)


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(np.shape(leaf)) if shape is None else tuple(shape)


def _batch_shape(adapter: Any, leaf: Any, path: str) -> tuple[int, ...]:
    """The leaf's batch (stacked-layer) shape under the adapter's view."""
    if adapter.elementwise:
        return ()
    return tuple(tree.resolve(adapter.dimension_numbers, _leaf_shape(leaf),
                              path=path).batch_shape)


def _fill(part: Any, arrays: Mapping[str, Any], batch: tuple[int, ...], path: str,
          which: str) -> Any:
    def one(x: Any) -> Any:
        if not is_shared(x):
            return x
        if x.name not in arrays:
            raise ValueError(
                f"{which}[{path!r}] refers to the shared array {x.name!r}, but "
                f"{which}[{SHARED!r}] has only {sorted(arrays)}")
        value = arrays[x.name]
        if not batch:
            return value
        return jnp.broadcast_to(value, batch + tuple(np.shape(value)))

    return jax.tree.map(one, part, is_leaf=is_shared)


def resolve_shared(
    assignment: Mapping[str, Any],
    flat_params: Mapping[str, Any],
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replaces every ``Shared`` placeholder by its array.

    Call it inside the differentiated function (the tree verbs and
    ``factored.transform`` do): the returned per-leaf parameters all refer to
    the one traced array, so its gradient sums over the leaves. A placeholder
    on a stacked leaf becomes the array broadcast over the leaf's batch axes
    (``batch_shape + array.shape``), so per-matrix math sees the whole array.

    Args:
      assignment: ``{path: Adapter}``.
      flat_params: ``{path: leaf}`` of the base tree (for the batch shapes).
      trainable: ``AdapterState.trainable`` (may hold ``SHARED``).
      frozen: ``AdapterState.frozen`` (may hold ``SHARED``).

    Returns:
      ``(trainable, frozen)`` keyed by the assigned paths only, with no
      placeholders; the inputs themselves when there is nothing shared.

    Raises:
      ValueError: a placeholder names an array the state lacks.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import adapters
      >>> ad = adapters.lora(1)
      >>> t = {"w": (Shared("v"),), SHARED: {"v": jnp.ones(2)}}
      >>> rt, rf = resolve_shared({"w": ad}, {"w": jnp.ones((3, 2))}, t, {"w": None})
      >>> rt
      {'w': (Array([1., 1.], dtype=float32),)}
    """
    if SHARED not in trainable and SHARED not in frozen:
        return dict(trainable), dict(frozen)
    t_arrays = trainable.get(SHARED, {})
    f_arrays = frozen.get(SHARED, {})
    out_t: dict[str, Any] = {}
    out_f: dict[str, Any] = {}
    for path, adapter in assignment.items():
        batch = _batch_shape(adapter, flat_params[path], path)
        out_t[path] = _fill(trainable[path], t_arrays, batch, path, "trainable")
        out_f[path] = _fill(frozen[path], f_arrays, batch, path, "frozen")
    return out_t, out_f


def unshare(adapter: Any) -> Any:
    """The same adapter with its shared arrays held per leaf (a private copy each).

    ``init`` runs the adapter's per-leaf init, then its ``SharedInit`` on this
    leaf alone, and puts the arrays into the leaf's own parameters (on a
    stacked leaf, one copy per layer): nothing goes under ``SHARED``. Use it
    for one bank per matrix, or to call ``init``/``apply`` on a single leaf.

    Args:
      adapter: an ``Adapter`` whose ``shared`` is set.

    Returns:
      An ``Adapter`` with ``shared=None`` and plain arrays in place of the
      ``Shared`` placeholders.

    Raises:
      TypeError: the adapter shares nothing.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters
      >>> ad = unshare(adapters.vblora(2, num_vectors=6, vector_length=4))
      >>> t, _ = ad.init(jax.random.key(0), jnp.zeros((8, 4)))
      >>> t.bank.shape
      (6, 4)
    """
    hook = adapter.shared
    if not isinstance(hook, SharedInit):
        raise TypeError(f"unshare: {adapter!r} has no shared arrays")

    def init(key: jax.Array, w: Any, *, stats: Any = None) -> tuple[Any, Any]:
        k_leaf, k_shared = jax.random.split(key)
        kw = {} if stats is None else {"stats": stats}
        t, f = adapter.init(k_leaf, w, **kw)
        parts = hook.init(k_shared, {"leaf": (w, t, f)})
        t, f = parts.leaves.get("leaf", (t, f))
        batch = _batch_shape(adapter, w, "leaf")
        return (_fill(t, parts.trainable, batch, "leaf", "trainable"),
                _fill(f, parts.frozen, batch, "leaf", "frozen"))

    relayout = None
    if adapter.relayout is not None:
        def relayout(dims: Any) -> Any:
            return unshare(adapter.relayout(dims))

    return adapter._replace(init=init, shared=None, name=f"unshare({adapter.name})",
                            relayout=relayout)


def _groups(assignment: Mapping[str, Any]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for path, adapter in assignment.items():
        if adapter.shared is None:
            continue
        if not isinstance(adapter.shared, SharedInit):
            raise TypeError(
                f"{adapter!r} on {path!r}: Adapter.shared must be a SharedInit, got "
                f"{type(adapter.shared).__name__}")
        groups.setdefault(adapter.shared.group, []).append(path)
    for group, paths in groups.items():
        configs = {assignment[p].shared.config for p in paths}
        if len(configs) > 1:
            by = {p: assignment[p].shared.config for p in paths}
            raise ValueError(
                f"the adapters sharing {group!r} disagree on its hyperparameters "
                f"{by}; give adapters with different shared arrays different names")
    return groups


def init_shared(
    assignment: Mapping[str, Any],
    key: jax.Array,
    flat: Mapping[str, Any],
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    path_key: Callable[[jax.Array, str], jax.Array],
) -> None:
    """Runs every group's ``SharedInit.init``; updates the dicts in place."""
    shared_t: dict[str, Any] = {}
    shared_f: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for group, paths in _groups(assignment).items():
        hook = assignment[paths[0]].shared
        leaves = {p: (flat[p], trainable[p], frozen[p]) for p in paths}
        parts = hook.init(path_key(key, f"{SHARED}/{group}"), leaves)
        for kind, got, into in (("trainable", parts.trainable, shared_t),
                                ("frozen", parts.frozen, shared_f)):
            for name, value in got.items():
                if name in owner:
                    raise ValueError(
                        f"init: the shared array {name!r} ({kind}) is made by both "
                        f"group {owner[name]!r} and group {group!r}")
                owner[name] = group
                into[name] = value
        for p, (t, f) in parts.leaves.items():
            if p not in leaves:
                raise ValueError(f"init: group {group!r} returned parameters for "
                                 f"{p!r}, which is not one of its leaves")
            trainable[p], frozen[p] = t, f
    if shared_t:
        trainable[SHARED] = shared_t
    if shared_f:
        frozen[SHARED] = shared_f


def check_shared(
    assignment: Mapping[str, Any],
    flat: Mapping[str, Any],
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any],
    fn: str,
) -> None:
    """Checks the ``SHARED`` entries against what the groups' inits make."""
    groups = _groups(assignment)
    want: dict[str, dict[str, Any]] = {"trainable": {}, "frozen": {}}
    for paths in groups.values():
        parts = assignment[paths[0]].shared.shapes(
            {p: (assignment[p], flat[p]) for p in paths})
        want["trainable"].update(parts.trainable)
        want["frozen"].update(parts.frozen)
    for kind, part in (("trainable", trainable), ("frozen", frozen)):
        got = part.get(SHARED, {})
        if not isinstance(got, Mapping):
            raise TypeError(f"{fn}: {kind}[{SHARED!r}] must be a dict {{name: array}}, "
                            f"got {type(got).__name__}")
        need = want[kind]
        if set(got) != set(need):
            raise ValueError(
                f"{fn}: {kind}[{SHARED!r}] has the shared arrays {sorted(got)}, but "
                f"the assigned adapters need {sorted(need)} (was the state made for "
                "another rule set?)")
        for name, spec in need.items():
            g = got[name]
            g_shape = _leaf_shape(g)
            g_dtype = getattr(g, "dtype", None)
            g_dtype = jnp.dtype(np.asarray(g).dtype if g_dtype is None else g_dtype)
            if g_shape != tuple(spec.shape) or g_dtype != jnp.dtype(spec.dtype):
                raise ValueError(
                    f"{fn}: the shared array {kind}[{SHARED!r}][{name!r}] has shape "
                    f"{g_shape} and dtype {g_dtype.name}, but the assigned adapters "
                    f"make shape {tuple(spec.shape)}, dtype {jnp.dtype(spec.dtype).name}")
