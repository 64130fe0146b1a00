# SPDX-License-Identifier: Apache-2.0
"""The tree-level verbs: adapters over a whole parameter pytree.

They lift per-leaf ``Adapter``s over a tree with an *assignment*
``{path: Adapter}`` produced by ``peftjax.tree.assign``:

* ``init(assignment, key, params) -> AdapterState(trainable, frozen)``, both
  flat dicts keyed by canonical path; per-leaf keys fold in a stable CRC32 of
  the path (``path_key``), so adding a rule never changes another leaf's
  initialisation;
* ``materialize(assignment, params, trainable, frozen) -> params'``, the
  portable forward path: a tree shaped like ``params`` with adapted leaves in
  their base dtype;
* ``fold`` (fold the adapters into the base weights, cast back to each base
  dtype: the export form, PEFT's ``merge_and_unload``) and ``unfold`` (its
  exact inverse, where one exists);
* ``num_trainable``.

Memory note for ``materialize`` inside a loss: backpropagating through
``W + s·A@B`` forms a weight-shaped cotangent and the full ``x^T·dy`` matmul
for every adapted matrix (frozen, closed-over leaves get none). The factored
path of ``peftjax.factored`` avoids both.

Exports: ``init``, ``materialize``, ``fold``, ``unfold``, ``num_trainable``.
"""

import math
from typing import Any

import jax
import numpy as np

from peftjax import tree
from peftjax.adapters._lift import describe_leaf, path_key
from peftjax.adapters._protocol import Adapter, AdapterState
from peftjax.adapters._shared import init_shared, resolve_shared
from peftjax.adapters._validate import bias_targets, check_assignment, check_state, sibling

PyTree = Any


def init(
    assignment: dict[str, Adapter],
    key: jax.Array,
    params: PyTree,
    *,
    stats: dict[str, Any] | None = None,
) -> AdapterState:
    """Initialises every assigned adapter.

    Args:
      assignment: ``{path: Adapter}``, from ``peftjax.tree.assign``.
      key: a PRNG key (``jax.random.key``); leaf keys fold in a CRC32 of the
        path, so adding a rule never changes other leaves.
      params: the base parameter tree.
      stats: optional ``{path: statistics}`` for data-driven initialisers.

    Returns:
      ``AdapterState(trainable, frozen)``, both dicts keyed by path.

    Raises:
      ValueError / TypeError: naming the path, shape, dtype and adapter for a
        leaf the adapter cannot take (1-D, integer, rank too large, ...).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> a = tree.assign(params, [tree.Rule(where=".*kernel",
      ...                                    then=adapters.lora(rank=2))])
      >>> state = adapters.init(a, jax.random.key(0), params)
      >>> state.trainable["dense/kernel"].a.shape
      (4, 2)
    """
    flat = tree.leaves_by_path(params)
    check_assignment(assignment, flat, "init")
    bias_targets(assignment, flat)
    stats = stats or {}
    extra = [p for p in stats if p not in assignment]
    if extra:
        raise ValueError(f"init: stats given for unassigned paths {extra[:10]}")
    trainable: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for path, adapter in assignment.items():
        leaf = flat[path]
        try:
            kw = {"stats": stats[path]} if path in stats else {}
            t, f = adapter.init(path_key(key, path), leaf, **kw)
        except (ValueError, TypeError) as e:
            raise type(e)(
                f"init: {adapter!r} on {path!r} ({describe_leaf(leaf)}): {e}"
            ) from e
        trainable[path] = t
        frozen[path] = f
    init_shared(assignment, key, flat, trainable, frozen, path_key)
    return AdapterState(trainable=trainable, frozen=frozen)


def _apply_all(assignment, params, trainable, frozen, fn: str, *,
               check_dropout: bool, deterministic: bool) -> PyTree:
    flat = tree.leaves_by_path(params)
    check_assignment(assignment, flat, fn)
    check_state(assignment, flat, trainable, frozen, fn)
    trainable, frozen = resolve_shared(assignment, flat, trainable, frozen)
    bias_of = bias_targets(assignment, flat)
    if check_dropout and not deterministic:
        with_dropout = {p: a.dropout for p, a in assignment.items() if a.dropout}
        if with_dropout:
            raise ValueError(
                f"{fn}: adapters with input dropout {with_dropout} cannot be "
                "applied in weight space; dropout on the adapter input is applied "
                "only by the factored path (peftjax.factored). Pass "
                "deterministic=True to materialise without dropout (evaluation), "
                "or build the adapter with dropout=0.0"
            )

    def one(path: str, w: Any) -> Any:
        if path in assignment:
            return assignment[path].apply(w, trainable[path], frozen[path])
        if path in bias_of:
            k = bias_of[path]
            hook = assignment[k].bias
            extra = (flat[k],) if hook.kernel else ()
            return hook.apply(np.shape(flat[k]), w, trainable[k], frozen[k], *extra)
        return w

    return tree.map_with_path(one, params)


def materialize(
    assignment: dict[str, Adapter],
    params: PyTree,
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    deterministic: bool = False,
) -> PyTree:
    """Returns ``params`` with every assigned leaf replaced by ``apply(...)``.

    This is the portable forward path: use it inside the loss and feed the
    result to any model. Un-assigned leaves are passed through by identity;
    adapted leaves keep their base dtype (the adapter term is computed in the
    wider of the base and adapter dtypes, then cast).

    Cost: gradients through ``W + s·A@B`` form a weight-shaped cotangent per
    adapted matrix; see ``peftjax.factored`` for the factored path.

    Args:
      assignment: ``{path: Adapter}``.
      params: the base tree (dict, Linen params, ``nnx.State``, Equinox).
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.
      deterministic: must be True when an adapter has input dropout: dropout on
        the adapter input cannot be expressed as a weight, so ``materialize``
        refuses to silently ignore it.

    Returns:
      A tree with the structure of ``params``.

    Raises:
      ValueError: state from another tree, or dropout without
        ``deterministic=True``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> bool((adapters.materialize(a, params, *s)["w"] == params["w"]).all())
      True
    """
    return _apply_all(assignment, params, trainable, frozen, "materialize",
                      check_dropout=True, deterministic=deterministic)


def fold(
    assignment: dict[str, Adapter],
    params: PyTree,
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    return_aux: bool = False,
) -> Any:
    """Folds the adapters into the base weights (the export form).

    Equivalent to ``materialize(..., deterministic=True)``: each folded leaf
    keeps its base dtype. Inputs are never modified or donated.

    Args:
      assignment: ``{path: Adapter}``.
      params: the base tree.
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.
      return_aux: also return ``{path: aux}`` for adapters whose exact
        ``unfold`` needs it (DoRA's per-column norms).

    Returns:
      The folded tree, or ``(folded, aux)`` when ``return_aux``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> adapters.fold(a, params, *s)["w"].dtype
      dtype(bfloat16)
    """
    folded = _apply_all(assignment, params, trainable, frozen, "fold",
                        check_dropout=False, deterministic=True)
    if not return_aux:
        return folded
    flat = tree.leaves_by_path(params)
    trainable, frozen = resolve_shared(assignment, flat, trainable, frozen)
    aux = {
        p: a.fold_aux(flat[p], trainable[p], frozen[p])
        for p, a in assignment.items()
        if a.fold_aux is not None
    }
    return folded, aux


def unfold(
    assignment: dict[str, Adapter],
    folded: PyTree,
    trainable: dict[str, Any],
    frozen: dict[str, Any],
    *,
    aux: dict[str, Any] | None = None,
) -> PyTree:
    """Removes folded adapters from the weights, where that is exact.

    Exact for LoRA, rsLoRA, LoRA-XS and scale-shift with non-zero scales; DoRA
    needs the ``aux`` norms that ``fold(..., return_aux=True)`` returned.

    Args:
      assignment: ``{path: Adapter}``.
      folded: the folded tree (``fold``'s output).
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.
      aux: ``{path: aux}`` from ``fold(..., return_aux=True)``.

    Returns:
      The base tree (within the dtype's rounding).

    Raises:
      TypeError: for an adapter with no exact inverse, or DoRA without ``aux``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> m = adapters.fold(a, params, *s)
      >>> bool((adapters.unfold(a, m, *s)["w"] == params["w"]).all())
      True
    """
    flat = tree.leaves_by_path(folded)
    check_assignment(assignment, flat, "unfold")
    check_state(assignment, flat, trainable, frozen, "unfold")
    trainable, frozen = resolve_shared(assignment, flat, trainable, frozen)
    bias_of = bias_targets(assignment, flat)
    aux = aux or {}
    for path, adapter in assignment.items():
        if adapter.unapply is None:
            raise TypeError(
                f"unfold: {adapter!r} on {path!r} has no exact inverse; keep the "
                "base weights instead of unfolding"
            )
        if adapter.fold_aux is not None and path not in aux:
            raise TypeError(
                f"unfold: {adapter!r} on {path!r} needs the aux that "
                "fold(..., return_aux=True) returned (e.g. DoRA's column norms)"
            )
        if adapter.bias is not None and sibling(path, adapter.bias.name) in bias_of:
            if adapter.bias.unapply is None:
                raise TypeError(
                    f"unfold: the bias reparametrisation of {adapter!r} on "
                    f"{path!r} has no exact inverse"
                )

    def one(path: str, w: Any) -> Any:
        if path in assignment:
            a = assignment[path]
            return a.unapply(w, trainable[path], frozen[path], aux.get(path))
        if path in bias_of:
            k = bias_of[path]
            hook = assignment[k].bias
            extra = ()
            if hook.kernel:  # the unfolded kernel W0
                extra = (assignment[k].unapply(flat[k], trainable[k], frozen[k],
                                               aux.get(k)),)
            return hook.unapply(np.shape(flat[k]), w, trainable[k], frozen[k], *extra)
        return w

    return tree.map_with_path(one, folded)


def num_trainable(trainable: PyTree) -> int:
    """Counts the scalars in a trainable pytree.

    Args:
      trainable: e.g. ``AdapterState.trainable``.

    Returns:
      The number of trainable parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> num_trainable({"w": (jnp.ones((4, 2)), jnp.ones((2, 3)))})
      14
    """
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(trainable))
