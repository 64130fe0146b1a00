# SPDX-License-Identifier: Apache-2.0
"""The initialiser protocol and the tree-level ``run`` of ``peftjax.inits``.

A data-driven initialiser (PiSSA, OLoRA, LoRA-GA, CorDA, LoRA-SB) is an
``Initializer``: per leaf it turns ``(key, w, stats)`` into a new base weight
(the residual, or ``w`` itself for LoRA-SB) and the state of an ordinary
adapter of ``peftjax.adapters`` (``lora`` or ``lora_xs``). Training then uses
the adapter exactly as any other: ``adapters.materialize``, ``factored.transform``,
``train.trainer`` (``init(key, result.params, state=result.state)``).

The per-matrix math is written once for a Flax ``(in, out)`` matrix and lifted
over batch axes (stacked layers) with ``jax.vmap`` through the leaf's
``DimensionNumbers``, as ``adapters.lift_matrix`` does.

Exports: ``Initializer``, ``InitResult``, ``run``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree

PyTree = Any

GRADIENT = "gradient"
COVARIANCE = "covariance"


class Initializer(NamedTuple):
    """A per-leaf data-driven initialiser.

    Attributes:
      init: ``(key, w, stats) -> (w_new, trainable, frozen)`` on the whole
        leaf (batch axes handled); ``w_new`` has ``w``'s shape and dtype.
      adapter: the ``peftjax.adapters`` adapter whose state ``init`` returns
        (``lora(rank, ...)`` or ``lora_xs(rank, ...)``).
      stats: ``"gradient"`` (a leaf-shaped array), ``"covariance"`` (a
        ``(batch..., in, in)`` array) or None (no statistics).
      modifies_base: True when ``w_new != w`` (the residual replaces the base).
      rank: ``r``.
      alpha: ``lora_alpha`` of ``adapter``.
      scaling: the ``adapters.Scaling`` member of ``adapter``.
      dimension_numbers: the leaf's matrix view (None: Flax defaults).
      param_dtype: the adapter factors' dtype.
      name: readable description.
      relayout: ``dims -> Initializer``, the same initialiser with another
        matrix view (``tree.assign`` uses it for stacked and declared leaves).
      exact_residual: ``w_new == w − s·a₀@b₀`` when ``modifies_base`` (False
        for LoftQ, whose base is the quantised ``Q``: ``to_lora`` refuses it).
    """

    init: Callable[..., tuple[Any, Any, Any]]
    adapter: _adapters.Adapter
    stats: str | None
    modifies_base: bool
    rank: int
    alpha: float
    scaling: _adapters.Scaling
    dimension_numbers: tree.DimensionNumbers | None
    param_dtype: Any
    name: str
    relayout: Callable[..., "Initializer"] | None = None
    exact_residual: bool = True

    def __repr__(self) -> str:
        return self.name

    def with_dimension_numbers(self, dims: tree.DimensionNumbers) -> "Initializer":
        """Returns this initialiser viewing its leaf through ``dims``.

        Args:
          dims: the leaf's matrix view.

        Returns:
          The same initialiser (and adapter) with ``dims`` as the view.

        Example:
          >>> from peftjax import inits, tree
          >>> ini = inits.pissa(rank=2).with_dimension_numbers(tree.dims.stacked())
          >>> ini.adapter.dimension_numbers.batch_axis
          (0,)
        """
        if self.relayout is None:
            raise TypeError(f"{self.name} has a fixed matrix view "
                            f"{self.dimension_numbers}; build it with "
                            "dimension_numbers= instead")
        return self.relayout(dims)


class InitResult(NamedTuple):
    """What ``inits.run`` returns.

    Attributes:
      params: the base tree to train over: residual weights at the paths of
        inits that modify the base, every other leaf unchanged (identity).
      assignment: ``{path: Adapter}`` for ``adapters.materialize`` /
        ``factored.transform`` / ``train.trainer``.
      state: ``adapters.AdapterState(trainable, frozen)`` keyed by path. Keep
        ``state.trainable`` of the init: ``to_lora`` needs it for export.
    """

    params: PyTree
    assignment: dict[str, _adapters.Adapter]
    state: _adapters.AdapterState


def describe(x: Any) -> str:
    """Returns ``"shape (..), dtype .."`` of an array for error messages."""
    return f"shape {tuple(np.shape(x))}, dtype {getattr(x, 'dtype', type(x).__name__)}"


def check_finite(x: Any, what: str) -> None:
    """Raises ``ValueError`` if a concrete ``x`` has NaN/inf (tracers pass)."""
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(jax.device_get(x))
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{what} has {bad} non-finite values ({describe(x)})")


def vmapped(fn: Callable, n: int) -> Callable:
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


def lift(
    name: str,
    init_matrix: Callable[..., tuple[Any, Any, Any]],
    dimension_numbers: tree.DimensionNumbers | None,
    stats_kind: str | None,
) -> Callable[..., tuple[Any, Any, Any]]:
    """Lifts ``(key, w (in, out), stats) -> (w_new, trainable, frozen)``.

    ``stats`` is the leaf-shaped gradient (viewed as a matrix like ``w``), the
    ``(batch..., in, in)`` covariance, or None. Keys are split per batch slice.
    """

    def init(key: jax.Array, w: Any, stats: Any = None):
        if not jnp.issubdtype(getattr(w, "dtype", np.dtype(object)), jnp.floating):
            raise TypeError(f"{name} needs a floating-point matrix leaf, got {describe(w)}")
        r = tree.resolve(dimension_numbers, np.shape(w), path="leaf")
        m = tree.to_matrix(w, r)
        s = None
        if stats_kind is not None:
            if stats is None:
                raise ValueError(
                    f"{name} needs {stats_kind} statistics for this leaf and got "
                    "none; compute them with inits.accumulate_gradients / "
                    "inits.collect_covariances and pass stats={path: ...}")
            if stats_kind == GRADIENT:
                if tuple(np.shape(stats)) != tuple(np.shape(w)):
                    raise ValueError(
                        f"{name}: the gradient statistic has {describe(stats)} but "
                        f"the leaf has {describe(w)}; pass the accumulated "
                        "full-weight gradient of this leaf")
                s = tree.to_matrix(jnp.asarray(stats), r)
            else:
                want = r.batch_shape + (r.n_in, r.n_in)
                if tuple(np.shape(stats)) != want:
                    raise ValueError(
                        f"{name}: the covariance has {describe(stats)}, expected "
                        f"{want} = batch + (in, in) for the leaf's {describe(w)}")
                s = jnp.asarray(stats)
            check_finite(stats, f"{name}: the {stats_kind} statistic")
        elif stats is not None:
            raise ValueError(f"{name} takes no statistics, got {describe(stats)}")
        nb = len(r.batch)
        if nb:
            keys = jax.random.split(key, math.prod(r.batch_shape)).reshape(r.batch_shape)
            # One slice after another: a vmapped SVD can deadlock jaxlib's
            # batched CPU LAPACK on small machines (see adapters map_slices).
            if s is None:
                out = _adapters.map_slices(lambda k, x: init_matrix(k, x, None), nb)(keys, m)
            else:
                out = _adapters.map_slices(init_matrix, nb)(keys, m, s)
        else:
            out = init_matrix(key, m, s)
        w_new, trainable, frozen = out
        return tree.from_matrix(w_new.astype(w.dtype), r), trainable, frozen

    return init


def run(
    plan: dict[str, Initializer],
    key: jax.Array,
    params: PyTree,
    *,
    stats: dict[str, Any] | None = None,
) -> InitResult:
    """Runs every planned initialiser and returns the base to train over.

    Args:
      plan: ``{path: Initializer}``, from ``peftjax.tree.assign`` with
        initialisers as rule payloads (``then=inits.pissa(rank=8)``).
      key: PRNG key (randomized SVDs, random directions); each leaf folds in
        a CRC32 of its path (``adapters.path_key``).
      params: the base parameter tree.
      stats: ``{path: statistic}`` for inits that need data: the accumulated
        gradient (``accumulate_gradients``) for LoRA-GA and LoRA-SB, the input
        covariance (``collect_covariances``) for CorDA.

    Returns:
      ``InitResult(params, assignment, state)``: ``params`` holds the residual
      weights (PiSSA, OLoRA, LoRA-GA, CorDA) or is ``params`` unchanged
      (LoRA-SB); the model's output at init equals the base model's except for
      LoRA-SB, which starts at ``W + trunc_r(ΔW)``.

    Raises:
      ValueError: statistics missing, extra, of the wrong shape or non-finite;
        rank larger than the matrix (each names the path, shape and dtype).
      TypeError: a payload that is not an ``Initializer``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.arange(12.0).reshape(4, 3)}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.pissa(rank=1))])
      >>> res = inits.run(plan, jax.random.key(0), params)
      >>> res.state.trainable["w"].a.shape
      (4, 1)
    """
    if not isinstance(plan, dict):
        raise TypeError(
            "inits.run: plan must be a dict {path: Initializer} from peftjax.tree.assign, "
            f"got {type(plan).__name__}")
    flat = tree.leaves_by_path(params)
    stats = dict(stats or {})
    extra = [p for p in stats if p not in plan]
    if extra:
        raise ValueError(f"inits.run: stats given for paths that are not planned: {extra[:10]}")
    new_leaves: dict[str, Any] = {}
    trainable: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    assignment: dict[str, _adapters.Adapter] = {}
    for path, ini in plan.items():
        if path not in flat:
            raise ValueError(f"inits.run: plan targets {path!r}, which is not a leaf of params")
        if not isinstance(ini, Initializer):
            raise TypeError(
                f"inits.run: the payload for {path!r} is {type(ini).__name__} ({ini!r}), "
                "not a peftjax.inits initialiser")
        leaf = flat[path]
        if ini.stats is not None and path not in stats:
            raise ValueError(
                f"inits.run: {ini!r} on {path!r} ({describe(leaf)}) needs {ini.stats} "
                f"statistics, but stats has no entry for {path!r}")
        try:
            w_new, t, f = ini.init(_adapters.path_key(key, path), leaf, stats.get(path))
        except (ValueError, TypeError) as e:
            raise type(e)(f"inits.run: {ini!r} on {path!r} ({describe(leaf)}): {e}") from e
        if ini.modifies_base:
            new_leaves[path] = w_new
        trainable[path] = t
        frozen[path] = f
        assignment[path] = ini.adapter
    new_params = tree.map_with_path(lambda p, x: new_leaves.get(p, x), params)
    return InitResult(params=new_params, assignment=assignment,
                      state=_adapters.AdapterState(trainable=trainable, frozen=frozen))
