# SPDX-License-Identifier: Apache-2.0
"""Checks that an assignment and its state fit a parameter tree.

Every tree-level verb (``init``, ``materialize``, ``fold``, ``unfold``) and
the factored path run these checks first, so a wrong tree, a wrong payload or
a state made for another tree fails with the path, shape and dtype named,
before anything is traced. ``validate`` is the public entry point.

Exports: ``validate``.
"""

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters._lift import describe_leaf
from peftjax.adapters._protocol import Adapter
from peftjax.adapters._shared import SHARED, check_shared

PyTree = Any


def validate(
    assignment: dict[str, Adapter],
    params: PyTree,
    trainable: dict[str, Any] | None = None,
    frozen: dict[str, Any] | None = None,
    *,
    is_leaf: Any = None,
    caller: str = "validate",
) -> dict[str, str]:
    """Checks an assignment, and optionally its state, against a parameter tree.

    Runs the checks ``init``, ``materialize``, ``fold`` and ``unfold`` run
    first: every assigned path is a leaf of ``params`` with an ``Adapter``
    payload, no bias leaf is reparametrised twice, and (when the state is
    given) ``trainable``/``frozen`` have exactly the assigned paths with the
    shapes and dtypes ``adapter.init`` makes for each leaf, plus, under
    ``adapters.SHARED``, exactly the shared arrays the adapters' ``SharedInit``
    make (names, shapes, dtypes). Code that applies
    adapters itself (``peftjax.factored``) calls it instead of re-deriving
    the rules. Shapes are checked abstractly (``jax.eval_shape``): nothing is
    computed.

    Args:
      assignment: ``{path: Adapter}``, from ``peftjax.tree.assign``.
      params: the base tree (arrays or ``jax.ShapeDtypeStruct``).
      trainable: ``AdapterState.trainable``, or None to check the assignment
        only.
      frozen: ``AdapterState.frozen``; given exactly when ``trainable`` is.
      is_leaf: optional predicate forwarded to ``tree.flatten`` (e.g.
        ``quant.is_quantized``, so quantised weights count as one leaf).
      caller: the name error messages start with.

    Returns:
      ``{bias path: kernel path}``: the sibling bias leaves that adapters'
      bias hooks also reparametrise (empty when none), i.e. every leaf the
      assignment changes besides its own paths.

    Raises:
      TypeError: the assignment is not a dict of ``Adapter``, only one of
        ``trainable``/``frozen`` is given, or a state leaf has the wrong dtype.
      ValueError: a path that is not a leaf of ``params``, a bias leaf claimed
        twice, or a state made for another tree (paths or shapes differ).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"lin": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> a = tree.assign(params, [tree.Rule(where=".*kernel",
      ...                                    then=adapters.ssf())])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> adapters.validate(a, params, *s)
      {'lin/bias': 'lin/kernel'}
      >>> adapters.validate(a, {"w": jnp.ones((4, 3))})
      Traceback (most recent call last):
      ...
      ValueError: validate: assignment targets 'lin/kernel', which is not a leaf of params
    """
    if (trainable is None) != (frozen is None):
        raise TypeError(
            f"{caller}: pass both trainable and frozen (an AdapterState) or neither; "
            f"got trainable={type(trainable).__name__}, frozen={type(frozen).__name__}"
        )
    flat = dict(tree.flatten(params, is_leaf=is_leaf))
    check_assignment(assignment, flat, caller)
    if trainable is not None:
        check_state(assignment, flat, trainable, frozen, caller)
    return bias_targets(assignment, flat)


def sibling(path: str, name: str) -> str:
    head, _, _ = path.rpartition("/")
    return f"{head}/{name}" if head else name


def check_assignment(assignment: Any, flat: dict[str, Any], fn: str) -> None:
    if not isinstance(assignment, dict):
        raise TypeError(
            f"{fn}: assignment must be a dict {{path: Adapter}} as returned by "
            f"peftjax.tree.assign, got {type(assignment).__name__}"
        )
    for path, adapter in assignment.items():
        if path not in flat:
            raise ValueError(
                f"{fn}: assignment targets {path!r}, which is not a leaf of params"
            )
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"{fn}: the payload for {path!r} is {type(adapter).__name__} "
                f"({adapter!r}), not a peftjax.adapters.Adapter"
            )


def bias_targets(assignment: dict[str, Adapter], flat: dict[str, Any]
                  ) -> dict[str, str]:
    """Maps bias-leaf path -> kernel path for adapters with a bias hook."""
    out: dict[str, str] = {}
    for path, adapter in assignment.items():
        if adapter.bias is None:
            continue
        sib = sibling(path, adapter.bias.name)
        if sib == path:
            raise ValueError(
                f"{adapter!r} is assigned to {path!r} ({describe_leaf(flat[path])}), "
                f"which is itself a bias leaf: this adapter goes on a kernel and "
                f"reparametrises the kernel's sibling {adapter.bias.name!r} leaf too. "
                f"Target the kernel ({sibling(path, 'kernel')!r}) and leave the bias "
                "out of the rule (e.g. where=r'.../kernel')"
            )
        if sib not in flat:
            if adapter.bias.required:
                raise ValueError(
                    f"{adapter.name} on {path!r} also reparametrises the bias, but "
                    f"there is no leaf {sib!r}; target a layer with a bias"
                )
            continue
        if sib in out:
            raise ValueError(
                f"{sib!r} would be reparametrised as the bias of both "
                f"{out[sib]!r} and {path!r}; give them separate bias leaves"
            )
        if sib in assignment:
            raise ValueError(
                f"{sib!r} is both assigned {assignment[sib]!r} and reparametrised "
                f"as the bias of {path!r} by {adapter!r}; keep one"
            )
        out[sib] = path
    return out


def check_state(assignment: dict[str, Adapter], flat: dict[str, Any],
                 trainable: Any, frozen: Any, fn: str) -> None:
    for name, part in (("trainable", trainable), ("frozen", frozen)):
        if not isinstance(part, dict):
            raise TypeError(
                f"{fn}: {name} must be the dict from AdapterState.{name}, got "
                f"{type(part).__name__}"
            )
        missing = [p for p in assignment if p not in part]
        extra = [p for p in part if p not in assignment and p != SHARED]
        if missing or extra:
            raise ValueError(
                f"{fn}: adapter state does not match the assignment: {name} lacks "
                f"{missing[:10]} and has unassigned paths {extra[:10]} "
                "(was it initialised for another tree or rule set?)"
            )
    for path, adapter in assignment.items():
        leaf = flat[path]
        spec = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        # shapes only: init's notices (e.g. OFT's adjusted block size) were
        # given when the state was made, not on every checked call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want_t, want_f = jax.eval_shape(
                lambda k, w, a=adapter: a.init(k, w), jax.random.key(0), spec
            )
        for name, want, got in (
            ("trainable", want_t, trainable[path]),
            ("frozen", want_f, frozen[path]),
        ):
            ws = jax.tree.map(lambda x: tuple(x.shape), want)
            gs = jax.tree.map(lambda x: tuple(np.shape(x)), got)
            if jax.tree.structure(ws) != jax.tree.structure(gs) or jax.tree.leaves(
                ws
            ) != jax.tree.leaves(gs):
                raise ValueError(
                    f"{fn}: {name} state for {path!r} ({describe_leaf(leaf)}) has "
                    f"shapes {gs}, but {adapter!r} on this leaf needs {ws}; the "
                    "state was made for another tree"
                )
            check_state_dtypes(fn, name, path, adapter, want, got)
    if SHARED in trainable or SHARED in frozen or any(
            a.shared is not None for a in assignment.values()):
        check_shared(assignment, flat, trainable, frozen, fn)


def check_state_dtypes(fn: str, name: str, path: str, adapter: Adapter,
                        want: Any, got: Any) -> None:
    """Raises if a state leaf's dtype differs from what ``adapter.init`` makes."""
    for (kp, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
        g_dtype = getattr(g, "dtype", None)
        g_dtype = np.asarray(g).dtype if g_dtype is None else g_dtype
        if jnp.dtype(g_dtype) != jnp.dtype(w.dtype):
            field = jax.tree_util.keystr(kp, simple=True, separator="/")
            raise TypeError(
                f"{fn}: {name} state for {path!r}, field {field!r}, has dtype "
                f"{jnp.dtype(g_dtype).name}, but {adapter!r} makes it "
                f"{jnp.dtype(w.dtype).name} (its param_dtype); it would train in "
                f"{jnp.dtype(g_dtype).name}. Cast the state to "
                f"{jnp.dtype(w.dtype).name} or build the adapter with "
                f"param_dtype={jnp.dtype(g_dtype).name}"
            )
