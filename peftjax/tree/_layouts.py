# SPDX-License-Identifier: Apache-2.0
"""Tree layouts: where stacked layers live and which kernels have which view.

A leaf of rank >= 3 has no default matrix view (``_matrix``). Its view comes
from one declaration for the whole tree, a ``Layout``:

* ``stacked``: layer containers whose leaves carry leading layer axes
  (``{"layers": 1}``: ``layers/attn/q/kernel`` is ``(L, in, out)``). A path
  is inside a container when it continues with a name that is not a layer
  index (``layers/3/...`` is unrolled, not stacked), or is the container
  itself (a single stacked leaf);
* ``views``: ``{path regex: DimensionNumbers}`` for kernels of one layer
  (``(embed, heads, head_dim)`` query kernels); inside a stacked container
  the view is shifted past the layer axes, which become ``batch_axis``. An
  entry applies to a leaf whose per-layer rank equals the view's rank.

peftjax's own scanned layout needs no declaration: the container ``layers``
(what ``stack_layers()`` and the models' ``scan_layers=True`` produce) is
stacked by convention, but only when every leaf under it shares the same
leading size; otherwise it is not taken as stacked and a rank >= 3 leaf there
raises like any other. A layout declares ``layers`` itself to override it
(``Layout(stacked={"layers": 0})`` turns the convention off).

``tree.assign(params, rules, layout=...)`` writes each matched adapter's view
into the adapter (``with_dimension_numbers``), so every consumer of the
assignment (init, materialize, merge, the factored path, sharding, PEFT
export) sees the same view; GaLore and FRUGAL take the same ``Layout`` as
``dimension_numbers``.

Exports: ``Layout``, ``stacked``, ``MatrixPayload``, ``Views``, ``bind``.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from peftjax.tree import _matrix, _paths

SCANNED_PREFIX = "layers"
# Leaves that are never matrices by default (Flax names): biases, head-split
# (heads, head_dim) ones too, and embedding tables. A ``views`` entry that
# names one asks for it.
NOT_MATRICES = ("bias", "embedding", "embeddings")


@runtime_checkable
class MatrixPayload(Protocol):
    """A rule payload that views its leaf as a matrix (adapters, initialisers).

    ``dimension_numbers`` is None until a view is known; ``tree.assign`` then
    calls ``with_dimension_numbers(view)`` for leaves of rank >= 3 and
    stacked leaves, so the view travels with the payload.
    """

    dimension_numbers: _matrix.DimensionNumbers | None

    def with_dimension_numbers(self, dims: _matrix.DimensionNumbers) -> Any:
        """Returns the same payload with ``dims`` as its matrix view."""


def _layer_count(n: Any, prefix: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise TypeError(f"Layout: stacked[{prefix!r}] must be a count of leading "
                        f"layer axes (an int >= 0), got {n!r}")
    return int(n)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Declares a tree's stacked layer containers and per-kernel views.

    Attributes:
      stacked: ``{container path: number of leading layer axes}``, e.g.
        ``{"blocks": 1}`` for ``blocks/attn/q/kernel: (L, in, out)``; 0 turns
        a container (the ``layers`` convention) off.
      views: ``{path regex (re.fullmatch): DimensionNumbers}`` for one
        layer's kernel; shifted past the layer axes inside a container, and
        applied only where the leaf's per-layer rank equals the view's rank.
        First match wins.

    Combine layouts with ``|`` (the right-hand side wins on equal keys).

    Example:
      >>> from peftjax.tree import DimensionNumbers
      >>> lay = Layout(stacked={"blocks": 1},
      ...              views={r".*query/kernel": DimensionNumbers(0, (1, 2))})
      >>> lay.stacked
      (('blocks', 1),)
    """

    stacked: Any = ()
    views: Any = ()

    def __post_init__(self):
        st = self.stacked
        st = tuple(st.items()) if isinstance(st, Mapping) else tuple(st)
        norm = []
        for item in st:
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[0], str)):
                raise TypeError(f"Layout: stacked must map container paths to layer "
                                f"axis counts, got {self.stacked!r}")
            prefix = item[0].strip("/")
            if not prefix:
                raise ValueError("Layout: a stacked container path cannot be empty")
            norm.append((prefix, _layer_count(item[1], prefix)))
        object.__setattr__(self, "stacked", tuple(norm))
        vw = self.views
        vw = tuple(vw.items()) if isinstance(vw, Mapping) else tuple(vw)
        for item in vw:
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[0], str)
                    and isinstance(item[1], _matrix.DimensionNumbers)):
                raise TypeError(f"Layout: views must map path regexes to "
                                f"DimensionNumbers, got {item!r}")
            re.compile(item[0])
        object.__setattr__(self, "views", vw)

    def __or__(self, other: "Layout") -> "Layout":
        if not isinstance(other, Layout):
            return NotImplemented
        stacked = dict(self.stacked)
        stacked.update(other.stacked)
        views = dict(other.views)
        views.update({k: v for k, v in self.views if k not in views})
        return Layout(stacked=stacked, views=views)


def stacked(*prefixes: str, axes: int = 1) -> Layout:
    """Declares layer containers whose leaves have ``axes`` leading layer axes.

    Args:
      *prefixes: container paths (``"blocks"``, ``"encoder/layer"``); default
        ``"layers"``, what ``stack_layers()`` produces.
      axes: the number of leading layer axes (static).

    Returns:
      A ``Layout``; pass it as ``tree.assign(..., layout=...)`` or as
      GaLore/FRUGAL's ``dimension_numbers``.

    Example:
      >>> stacked("blocks")
      Layout(stacked=(('blocks', 1),), views=())
    """
    if not prefixes:
        prefixes = (SCANNED_PREFIX,)
    for p in prefixes:
        if not isinstance(p, str):
            raise TypeError(f"stacked: container paths must be strings, got {p!r}")
    return Layout(stacked={p: axes for p in prefixes})


def _container(path: str, prefixes: list[str]) -> str | None:
    """The longest container of ``prefixes`` that ``path`` is stacked under."""
    best = None
    for c in prefixes:
        head = c + "/"
        inside = path == c  # a stacked leaf declared by its own path
        if path.startswith(head):
            inside = not path[len(head):].split("/", 1)[0].isdigit()
        if inside and (best is None or len(c) > len(best)):
            best = c
    return best


def _shift(dims: _matrix.DimensionNumbers, n: int) -> _matrix.DimensionNumbers:
    k = dims.ndim

    def sh(axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(a % k + n for a in axes)

    return _matrix.DimensionNumbers(reduction_axis=sh(dims.reduction_axis),
                                    output_axis=sh(dims.output_axis),
                                    batch_axis=tuple(range(n)) + sh(dims.batch_axis))


class Views:
    """A ``Layout`` bound to one tree: the matrix view of each leaf.

    Made by ``bind(layout, tree)``. ``view(path)`` gives a leaf's
    ``DimensionNumbers`` (None when it is not a matrix), ``matrix_view(path)``
    the same but None for biases and embedding tables unless declared.

    Attributes:
      layout: the bound ``Layout``.
      shapes: ``{path: shape}`` of every leaf.
      layer_axes: ``{path: n}`` for leaves inside a stacked container (``n``
        leading layer axes); other leaves are absent.
      notes: ``{path: text}`` why a ``layers`` container was not taken as
        stacked (appended to the error of a leaf there that has no view).

    Example:
      >>> import jax.numpy as jnp
      >>> v = bind(stacked("blocks"), {"blocks": {"w": jnp.ones((2, 4, 3))}})
      >>> v.layer_axes, v.view("blocks/w").batch_axis
      ({'blocks/w': 1}, (0,))
    """

    def __init__(self, layout: Layout, flat: list[tuple[str, Any]]):
        self.layout = layout
        self.shapes = {p: tuple(np.shape(x)) for p, x in flat}
        declared = dict(layout.stacked)
        counts = dict(declared)
        if SCANNED_PREFIX not in declared:
            counts[SCANNED_PREFIX] = 1
        prefixes = [c for c, n in counts.items() if n > 0]
        members: dict[str, list[str]] = {}
        for p in self.shapes:
            c = _container(p, prefixes)
            if c is not None:
                members.setdefault(c, []).append(p)
        self.notes: dict[str, str] = {}
        self.layer_axes: dict[str, int] = {}
        for c, paths in members.items():
            n = counts[c]
            leads = {p: self.shapes[p][:n] for p in paths}
            short = [p for p in paths if len(self.shapes[p]) < n]
            distinct = sorted({lead for p, lead in leads.items() if p not in short})
            if short or len(distinct) > 1:
                example = [(p, self.shapes[p]) for p in (short + paths)[:4]]
                why = (f"the leaves under {c!r} do not share {n} leading layer "
                       f"ax{'is' if n == 1 else 'es'} (leading sizes {distinct}"
                       f"{', some leaves have fewer axes' if short else ''}; e.g. "
                       f"{example})")
                if c in declared:
                    raise ValueError(f"Layout: {c!r} is declared stacked, but {why}")
                for p in paths:
                    self.notes[p] = (f"Note: {c!r} is not taken as peftjax's scanned "
                                     f"layout, because {why}.")
                continue
            for p in paths:
                self.layer_axes[p] = n

    def explicit(self, path: str) -> bool:
        """Whether a ``views`` entry of the layout names this leaf."""
        return self._entry(path) is not None

    def _entry(self, path: str) -> _matrix.DimensionNumbers | None:
        shape = self.shapes[path]
        k = len(shape) - self.layer_axes.get(path, 0)
        for regex, dims in self.layout.views:
            if re.fullmatch(regex, path) and dims.ndim == k:
                return dims
        return None

    def matrix_view(self, path: str) -> _matrix.DimensionNumbers | None:
        """``view(path)``, but None for biases and embedding tables (by name)
        unless a ``views`` entry names them: what GaLore/FRUGAL project by default.
        """
        if path.rsplit("/", 1)[-1] in NOT_MATRICES and not self.explicit(path):
            return None
        return self.view(path)

    def view(self, path: str) -> _matrix.DimensionNumbers | None:
        """Returns the leaf's view, or None when it is not a matrix.

        A leaf is not a matrix when it has fewer than two axes besides its
        layer axes (biases, norm scales, stacked or not).

        Raises:
          ValueError: a leaf of rank >= 3 (besides layer axes) that no view
            covers; the message names the path, shape and likely views.
        """
        shape = self.shapes[path]
        n = self.layer_axes.get(path, 0)
        entry = self._entry(path)
        if entry is not None:
            return _shift(entry, n) if n else entry
        k = len(shape) - n
        if k < 2:
            return None
        if k == 2:
            return _matrix.DimensionNumbers(reduction_axis=n, output_axis=n + 1,
                                            batch_axis=tuple(range(n)))
        raise _matrix.no_view_error(path, shape, n, self.notes.get(path, ""))


def bind(layout: Layout | None, tree: Any) -> Views:
    """Binds ``layout`` (None: only the ``layers`` convention) to ``tree``.

    Args:
      layout: the declaration, or None.
      tree: the parameter tree (or a flat ``[(path, leaf)]`` list).

    Returns:
      A ``Views`` whose ``view(path)`` gives each leaf's matrix view.

    Raises:
      TypeError: ``layout`` is not a ``Layout``.
      ValueError: a declared container whose leaves disagree on the layer axes.

    Example:
      >>> import jax.numpy as jnp
      >>> v = bind(None, {"layers": {"q": {"kernel": jnp.ones((2, 4, 3))}}})
      >>> v.view("layers/q/kernel")
      DimensionNumbers(reduction_axis=(1,), output_axis=(2,), batch_axis=(0,))
    """
    if layout is None:
        layout = Layout()
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a peftjax.tree.Layout (e.g. "
                        f"tree.stacked('layers')), got {type(layout).__name__}: "
                        f"{layout!r}")
    flat = tree if isinstance(tree, list) else _paths.flatten(tree)
    return Views(layout, flat)


def bind_payloads(assignment: dict[str, Any], views: Views, fn: str) -> dict[str, Any]:
    """Writes each matrix payload's view into it (see the module doc).

    A payload with explicit ``dimension_numbers`` is kept as it is, and so is
    one on a plain 2-D leaf (whose Flax view is the default).
    """
    out = {}
    made: dict[tuple[int, _matrix.DimensionNumbers], Any] = {}
    for path, payload in assignment.items():
        if (not isinstance(payload, MatrixPayload)
                or payload.dimension_numbers is not None
                or getattr(payload, "elementwise", False)):
            out[path] = payload
            continue
        shape = views.shapes[path]
        n = views.layer_axes.get(path, 0)
        if len(shape) < 2 or (len(shape) == 2 and n == 0
                              and not views.explicit(path)):
            out[path] = payload
            continue
        try:
            dims = views.view(path)
        except ValueError as e:
            raise ValueError(f"{fn}: {payload!r} targets {e}") from None
        if dims is None:
            raise ValueError(
                f"{fn}: {payload!r} targets {path!r} (shape {shape}), which has "
                f"{n} leading layer ax{'is' if n == 1 else 'es'} and is not a "
                "matrix per layer; exclude it with a `then=None` rule")
        try:
            key = (id(payload), dims)
            if key not in made:  # one rebound payload per (payload, view)
                made[key] = payload.with_dimension_numbers(dims)
            out[path] = made[key]
        except TypeError as e:
            raise TypeError(f"{fn}: {payload!r} on {path!r} (shape {shape}) needs "
                            f"the view {dims}: {e}") from None
    return out
