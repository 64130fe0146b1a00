# SPDX-License-Identifier: Apache-2.0
"""Hashable, composable predicates over ``(path, leaf)`` for rules.

Built-in predicates are frozen dataclasses, so rule lists that use them are
hashable and can be closed over or passed statically under ``jit``. Any
``Callable[[str, Array], bool]`` is accepted by ``Rule`` as well.

Exports: ``Predicate``, ``path_regex``, ``ndim_at_least``, ``shape_is``,
``dtype_is``, ``all_of``, ``any_of``, ``not_``.
"""

import dataclasses
import re
from typing import Any, Protocol

import numpy as np


class Predicate(Protocol):
    """A callable ``(path, leaf) -> bool`` selecting leaves."""

    def __call__(self, path: str, leaf: Any) -> bool: ...


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(np.shape(leaf))


@dataclasses.dataclass(frozen=True)
class _PathRegex:
    pattern: str

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"path_regex: invalid regex {self.pattern!r}: {e}") from e

    def __call__(self, path: str, leaf: Any) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    def __repr__(self) -> str:
        return f"path_regex({self.pattern!r})"


@dataclasses.dataclass(frozen=True)
class _NdimAtLeast:
    ndim: int

    def __call__(self, path: str, leaf: Any) -> bool:
        return len(_shape(leaf)) >= self.ndim

    def __repr__(self) -> str:
        return f"ndim_at_least({self.ndim})"


@dataclasses.dataclass(frozen=True)
class _ShapeIs:
    shape: tuple[int, ...]

    def __call__(self, path: str, leaf: Any) -> bool:
        return _shape(leaf) == self.shape

    def __repr__(self) -> str:
        return f"shape_is({self.shape})"


@dataclasses.dataclass(frozen=True)
class _DtypeIs:
    dtype: str

    def __call__(self, path: str, leaf: Any) -> bool:
        dtype = getattr(leaf, "dtype", None)
        return dtype is not None and np.dtype(dtype).name == self.dtype

    def __repr__(self) -> str:
        return f"dtype_is({self.dtype!r})"


@dataclasses.dataclass(frozen=True)
class _AllOf:
    preds: tuple[Any, ...]

    def __call__(self, path: str, leaf: Any) -> bool:
        return all(p(path, leaf) for p in self.preds)

    def __repr__(self) -> str:
        return f"all_of({', '.join(map(repr, self.preds))})"


@dataclasses.dataclass(frozen=True)
class _AnyOf:
    preds: tuple[Any, ...]

    def __call__(self, path: str, leaf: Any) -> bool:
        return any(p(path, leaf) for p in self.preds)

    def __repr__(self) -> str:
        return f"any_of({', '.join(map(repr, self.preds))})"


@dataclasses.dataclass(frozen=True)
class _Not:
    pred: Any

    def __call__(self, path: str, leaf: Any) -> bool:
        return not self.pred(path, leaf)

    def __repr__(self) -> str:
        return f"not_({self.pred!r})"


def to_predicate(where: Any) -> Any:
    """Turns a regex string into ``path_regex``; callables pass through."""
    if isinstance(where, str):
        return _PathRegex(where)
    if callable(where):
        return where
    raise TypeError(
        f"a rule's `where` must be a regex string or a callable (path, leaf) -> "
        f"bool, got {type(where).__name__}: {where!r}"
    )


def path_regex(pattern: str) -> Predicate:
    """Selects leaves whose canonical path ``re.fullmatch``-es ``pattern``.

    Args:
      pattern: a regular expression, matched against the whole path.

    Returns:
      A hashable predicate.

    Example:
      >>> path_regex(r".*/kernel")("dense/kernel", None)
      True
    """
    return _PathRegex(pattern)


def ndim_at_least(ndim: int) -> Predicate:
    """Selects leaves with at least ``ndim`` dimensions.

    Args:
      ndim: the minimum rank.

    Returns:
      A hashable predicate.

    Example:
      >>> import numpy as np
      >>> ndim_at_least(2)("w", np.zeros((2, 2)))
      True
    """
    return _NdimAtLeast(int(ndim))


def shape_is(shape: tuple[int, ...]) -> Predicate:
    """Selects leaves with exactly this shape.

    Args:
      shape: the shape to match.

    Returns:
      A hashable predicate.

    Example:
      >>> import numpy as np
      >>> shape_is((3,))("b", np.zeros(3))
      True
    """
    return _ShapeIs(tuple(int(s) for s in shape))


def dtype_is(dtype: Any) -> Predicate:
    """Selects leaves of this dtype.

    Args:
      dtype: anything ``numpy.dtype`` accepts (including ``jnp.bfloat16``).

    Returns:
      A hashable predicate.

    Example:
      >>> import numpy as np
      >>> dtype_is(np.float32)("w", np.zeros(2, np.float32))
      True
    """
    return _DtypeIs(np.dtype(dtype).name)


def all_of(*preds: Any) -> Predicate:
    """Selects leaves matching every predicate (regex strings allowed).

    Args:
      *preds: predicates or regex strings.

    Returns:
      A hashable predicate.

    Example:
      >>> import numpy as np
      >>> all_of(r".*kernel", ndim_at_least(2))("a/kernel", np.zeros((2, 2)))
      True
    """
    return _AllOf(tuple(to_predicate(p) for p in preds))


def any_of(*preds: Any) -> Predicate:
    """Selects leaves matching at least one predicate (regex strings allowed).

    Args:
      *preds: predicates or regex strings.

    Returns:
      A hashable predicate.

    Example:
      >>> any_of(r"q", r"v")("v", None)
      True
    """
    return _AnyOf(tuple(to_predicate(p) for p in preds))


def not_(pred: Any) -> Predicate:
    """Negates a predicate (or a regex string).

    Args:
      pred: a predicate or regex string.

    Returns:
      A hashable predicate.

    Example:
      >>> not_(r".*bias")("dense/bias", None)
      False
    """
    return _Not(to_predicate(pred))
