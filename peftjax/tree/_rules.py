# SPDX-License-Identifier: Apache-2.0
"""Path rules: one targeting vocabulary for adapters, labels and masks.

``Rule(where=..., then=...)`` pairs a regex (``re.fullmatch`` against the
canonical path) or a predicate with a payload: an adapter, an
``optax.partition`` label, a mask value, or ``None`` to exclude a path. Rules
are tried in order and the first match wins. A rule that matches no leaf is a
``ValueError`` that lists the closest existing paths (``allow_unused=True``
opts out, for sweeps).

Exports: ``Rule``, ``assign``, ``labels``, ``mask``, ``describe``.
"""

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from peftjax.report import ParamCount
from peftjax.tree import _layouts, _matrix, _paths, _predicates

_FROZEN_LABELS = ("frozen", "freeze", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One targeting rule.

    Attributes:
      where: a regex matched with ``re.fullmatch`` against the canonical path,
        or a predicate ``(path, leaf) -> bool``.
      then: the payload given to matching leaves (an adapter, a label string,
        a mask value) or ``None`` to exclude them explicitly.

    Example:
      >>> Rule(where=r".*/kernel", then="adam")
      Rule(where='.*/kernel', then='adam')
    """

    where: Any
    then: Any

    def __post_init__(self):
        _predicates.to_predicate(self.where)  # validates regexes and types

    def matches(self, path: str, leaf: Any) -> bool:
        """Returns whether this rule selects ``(path, leaf)``."""
        return bool(_predicates.to_predicate(self.where)(path, leaf))


def _as_rules(rules: Any) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        return (rules,)
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(
            "rules must be a Rule or a sequence of Rule, got "
            f"{type(rules).__name__}: {rules!r}"
        )
    out = tuple(rules)
    for i, r in enumerate(out):
        if not isinstance(r, Rule):
            raise TypeError(
                f"rules[{i}] must be a peftjax.tree.Rule, got "
                f"{type(r).__name__}: {r!r}"
            )
    return out


def _closest(rule: Rule, all_paths: list[str], n: int = 5) -> list[str]:
    if isinstance(rule.where, str):
        return difflib.get_close_matches(rule.where, all_paths, n=n, cutoff=0.0)
    return all_paths[:n]


def _unused_error(unused: list[Rule], all_paths: list[str]) -> ValueError:
    lines = []
    for rule in unused:
        near = _closest(rule, all_paths)
        lines.append(
            f"  rule where={rule.where!r} then={rule.then!r} matched no path; "
            f"closest existing paths: {near}"
        )
    return ValueError(
        "rules matched nothing (pass allow_unused=True to permit this):\n"
        + "\n".join(lines)
    )


def _match(params: Any, rules: Any, allow_unused: bool
           ) -> tuple[list[tuple[str, Any]], dict[str, tuple[bool, Any]]]:
    """Returns ``(flat leaves, {path: (matched, payload)})``."""
    rules = _as_rules(rules)
    flat = _paths.flatten(params)
    used = [False] * len(rules)
    result: dict[str, tuple[bool, Any]] = {}
    for path, leaf in flat:
        hit = (False, None)
        for i, rule in enumerate(rules):
            if rule.matches(path, leaf):
                used[i] = True
                hit = (True, rule.then)
                break
        result[path] = hit
    unused = [r for r, u in zip(rules, used, strict=True) if not u]
    if unused and not allow_unused:
        raise _unused_error(unused, [p for p, _ in flat])
    return flat, result


def assign(params: Any, rules: Any, *, allow_unused: bool = False,
           layout: Any = None) -> dict[str, Any]:
    """Compiles rules into an assignment ``{path: payload}``.

    Leaves whose first matching rule has ``then=None`` and leaves that match
    no rule are left out.

    Matrix payloads (adapters, initialisers) built without
    ``dimension_numbers`` get their leaf's view written into them here, so
    every consumer of the assignment sees the same view: a 2-D leaf is
    ``(in, out)``; a leaf in a stacked container of ``layout`` (and
    peftjax's scanned ``layers/...`` layout) is ``(L..., in, out)``; a
    ``layout.views`` entry gives its own view; any other leaf of rank >= 3
    raises. A payload with explicit ``dimension_numbers`` is kept as given.

    Args:
      params: the parameter tree (dict, Linen params, ``nnx.State``, Equinox).
      rules: a ``Rule`` or a sequence of them; first match wins.
      allow_unused: if False (default), a rule that matches nothing raises.
      layout: a ``peftjax.tree.Layout`` declaring the tree's stacked layer
        containers and kernel views (``tree.stacked("blocks")``,
        ``tree.dims.multi_head_attention()``), or None.

    Returns:
      A dict from canonical path to payload, in tree order.

    Raises:
      ValueError: if a rule matches nothing (listing the closest paths), two
        leaves share a canonical path, or a matrix payload targets a leaf of
        rank >= 3 whose view nothing declares (naming the path, shape and the
        likely ``DimensionNumbers``).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q": {"kernel": jnp.ones((4, 4))}, "k": {"kernel": jnp.ones((4, 4))}}
      >>> assign(p, [Rule(where=r"q/kernel", then="lora")])
      {'q/kernel': 'lora'}
    """
    flat, matched = _match(params, rules, allow_unused)
    out = {p: pay for p, (hit, pay) in matched.items() if hit and pay is not None}
    if any(isinstance(pay, _layouts.MatrixPayload) for pay in out.values()) or (
            layout is not None):
        out = _layouts.bind_payloads(out, _layouts.bind(layout, flat), "assign")
    return out


def labels(params: Any, rules: Any, *, default: str | None = None,
           allow_unused: bool = False) -> Any:
    """Compiles rules into a label tree for ``optax.partition``.

    Args:
      params: the parameter tree.
      rules: rules whose payloads are label strings.
      default: the label of leaves that match no rule (or a ``None`` rule);
        if None, such leaves raise a ``ValueError`` listing them.
      allow_unused: if False (default), a rule that matches nothing raises.

    Returns:
      A tree shaped like ``params`` with a label string per leaf.

    Raises:
      ValueError: unused rules, unlabelled leaves without ``default``.
      TypeError: a payload that is not a string.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> labels(p, [Rule(where="w", then="adam")], default="frozen")
      {'b': 'frozen', 'w': 'adam'}
    """
    _, matched = _match(params, rules, allow_unused)
    missing = [p for p, (hit, pay) in matched.items() if not hit or pay is None]
    if missing and default is None:
        raise ValueError(
            f"labels: {len(missing)} leaves match no rule and no default label "
            f"was given: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    for p, (hit, pay) in matched.items():
        if hit and pay is not None and not isinstance(pay, str):
            raise TypeError(
                f"labels: the rule matching {p!r} has payload {pay!r} of type "
                f"{type(pay).__name__}; optax.partition labels must be strings"
            )

    def label(path: str, _leaf: Any) -> str:
        hit, pay = matched[path]
        return pay if hit and pay is not None else default

    return _paths.map_with_path(label, params)


def mask(params: Any, rules: Any, *, default: bool = False,
         allow_unused: bool = False) -> Any:
    """Compiles rules into a bool tree for ``optax.masked``.

    Args:
      params: the parameter tree.
      rules: rules whose payloads are bools (``None`` counts as False).
      default: the value of leaves that match no rule.
      allow_unused: if False (default), a rule that matches nothing raises.

    Returns:
      A tree shaped like ``params`` with a Python bool per leaf.

    Raises:
      TypeError: a payload that is neither a bool nor None.

    Example:
      >>> import jax.numpy as jnp
      >>> mask({"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
      ...      [Rule(where="w", then=True)])
      {'b': False, 'w': True}
    """
    _, matched = _match(params, rules, allow_unused)
    for p, (hit, pay) in matched.items():
        if hit and pay is not None and not isinstance(pay, bool):
            raise TypeError(
                f"mask: the rule matching {p!r} has payload {pay!r}; mask "
                "payloads must be True, False or None"
            )

    def value(path: str, _leaf: Any) -> bool:
        hit, pay = matched[path]
        return bool(pay) if hit else default

    return _paths.map_with_path(value, params)


def _trainable_count(payload: Any, leaf: Any) -> int:
    """Trainable parameters a payload gives a leaf.

    Adapters report their own count; a label other than "frozen"/"none", or
    ``True``, means the whole leaf is trained; anything else counts 0.
    """
    counter = getattr(type(payload), "num_trainable", None)
    if callable(counter):
        return int(counter(payload, leaf))
    if payload is True or (
        isinstance(payload, str) and payload.lower() not in _FROZEN_LABELS
    ):
        return math.prod(np.shape(leaf))
    return 0


class Description(str):
    """The printable table returned by ``describe`` (a ``str``)."""


def _view_text(path: str, payload: Any, shape: tuple[int, ...],
               views: "_layouts.Views") -> str:
    """The ``(batch..., in, out)`` matrix view of a targeted leaf, for ``describe``."""
    if isinstance(payload, _layouts.MatrixPayload):
        dims = payload.dimension_numbers
        if dims is None and len(shape) != 2:
            dims = views.view(path)  # raises for an undeclared rank >= 3 leaf
            if dims is None:
                return "-"
        return str(_matrix.matrix_shape(_matrix.resolve(dims, shape, path=path)))
    try:
        dims = views.matrix_view(path)
    except ValueError:
        return "undeclared"  # GaLore/FRUGAL would raise here; assign's error lists views
    if dims is None:
        return "-"
    return str(_matrix.matrix_shape(_matrix.resolve(dims, shape, path=path)))


def describe(assignment: dict[str, Any], params: Any, *, layout: Any = None
             ) -> Description:
    """Returns a table of path, shape, dtype, view, payload and trainable count.

    The view column is each targeted leaf's matrix view ``(batch..., in,
    out)``: an adapter's own view, else the view GaLore/FRUGAL would take
    under the layout (``-`` for leaves that are not matrices: biases, norms,
    embedding tables; ``undeclared``
    for a rank >= 3 leaf whose view nothing declares).

    Args:
      assignment: ``{path: payload}`` as returned by ``assign`` (or any dict).
      params: the parameter tree it was computed from.
      layout: the ``peftjax.tree.Layout`` given to ``assign``, for the views
        of payloads that are not adapters (labels, masks).

    Returns:
      A ``str`` table with one row per leaf and totals: number of leaves and
      base parameters, then the ``peftjax.report.ParamCount`` line that
      ``report`` prints (trainable %: trainable over all parameters, the
      base's plus those adapters add).

    Raises:
      ValueError: if the assignment names a path that ``params`` lacks; an
        adapter that cannot take its leaf (the message names the path).

    Example:
      >>> import jax.numpy as jnp
      >>> print(describe({"w": "adam"}, {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}))
      ... # doctest: +NORMALIZE_WHITESPACE
      path  shape   dtype    view    payload  trainable
      b     (2,)    float32  -       -        0
      w     (2, 2)  float32  (2, 2)  'adam'   4
      2 leaves, 6 parameters; trainable params: 4 || all params: 6 || trainable%: 66.6667
    """
    flat = _paths.flatten(params)
    known = {p for p, _ in flat}
    extra = [p for p in assignment if p not in known]
    if extra:
        raise ValueError(
            f"describe: assignment names paths not in params: {extra[:10]}"
        )
    views = _layouts.bind(layout, flat)
    rows = [("path", "shape", "dtype", "view", "payload", "trainable")]
    total = trainable = added = 0
    for path, leaf in flat:
        shape = tuple(np.shape(leaf))
        size = math.prod(shape)
        total += size
        dtype = getattr(leaf, "dtype", None)
        dtype = np.dtype(dtype).name if dtype is not None else type(leaf).__name__
        if path in assignment:
            payload = assignment[path]
            text = repr(payload)
            if len(text) > 60:
                text = text[:57] + "..."
            try:
                view = _view_text(path, payload, shape, views)
                count = _trainable_count(payload, leaf)
            except (ValueError, TypeError) as e:
                msg = str(e)
                if not msg.startswith(path):
                    msg = f"{path!r} (shape {shape}, dtype {dtype}), {text}: {msg}"
                raise type(e)(f"describe: {msg}") from e
            if callable(getattr(type(payload), "num_trainable", None)):
                added += count  # adapter parameters are new, not part of the base
        else:
            count, text, view = 0, "-", "-"
        trainable += count
        rows.append((path, str(shape), dtype, view, text, str(count)))
    # Arrays several leaves' adapters share (adapters.Shared), one row each.
    groups: dict[str, dict[str, tuple[Any, Any]]] = {}
    leaves = dict(flat)
    for path, payload in assignment.items():
        if getattr(payload, "shared", None) is not None:
            groups.setdefault(payload.shared.group, {})[path] = (payload, leaves[path])
    for members in groups.values():
        parts = next(iter(members.values()))[0].shared.shapes(members)
        for name, x in parts.trainable.items():
            size = math.prod(x.shape)
            trainable += size
            added += size
            rows.append((f"@shared/{name}", str(tuple(x.shape)), np.dtype(x.dtype).name,
                         "-", "shared by " + ", ".join(members)[:50], str(size)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    count = ParamCount(trainable=trainable, total=total + added)
    lines.append(f"{len(flat)} leaves, {total:,} parameters; {count}")
    return Description("\n".join(lines))


