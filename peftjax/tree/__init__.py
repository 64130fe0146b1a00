# SPDX-License-Identifier: Apache-2.0
"""Paths, rules, labels, masks, matrix views and layer layouts.

A kernel is seen as a matrix ``(batch..., in, out)``: 2-D leaves as Flax
``(in, out)``; leaves of rank >= 3 only through explicit ``DimensionNumbers``
(presets in ``tree.dims``) or a declared ``Layout`` (``tree.stacked``), never
by guessing.

The bottom layer of peftjax: every other layer targets leaves through these
canonical paths and rules.
"""

from peftjax.tree import dims as dims
from peftjax.tree._layers import stack_layers as stack_layers
from peftjax.tree._layers import unstack_layers as unstack_layers
from peftjax.tree._layouts import Layout as Layout
from peftjax.tree._layouts import Views as Views
from peftjax.tree._layouts import bind as bind
from peftjax.tree._layouts import stacked as stacked
from peftjax.tree._matrix import DimensionNumbers as DimensionNumbers
from peftjax.tree._matrix import ResolvedDims as ResolvedDims
from peftjax.tree._matrix import default_dimension_numbers as default_dimension_numbers
from peftjax.tree._matrix import from_matrix as from_matrix
from peftjax.tree._matrix import resolve as resolve
from peftjax.tree._matrix import to_matrix as to_matrix
from peftjax.tree._paths import Path as Path
from peftjax.tree._paths import canonical as canonical
from peftjax.tree._paths import flatten as flatten
from peftjax.tree._paths import leaves_by_path as leaves_by_path
from peftjax.tree._paths import map_with_path as map_with_path
from peftjax.tree._paths import paths as paths
from peftjax.tree._paths import replace_leaves as replace_leaves
from peftjax.tree._predicates import all_of as all_of
from peftjax.tree._predicates import any_of as any_of
from peftjax.tree._predicates import dtype_is as dtype_is
from peftjax.tree._predicates import ndim_at_least as ndim_at_least
from peftjax.tree._predicates import not_ as not_
from peftjax.tree._predicates import path_regex as path_regex
from peftjax.tree._predicates import shape_is as shape_is
from peftjax.tree._rules import Rule as Rule
from peftjax.tree._rules import assign as assign
from peftjax.tree._rules import describe as describe
from peftjax.tree._rules import labels as labels
from peftjax.tree._rules import mask as mask
from peftjax.tree._state_roles import StateRole as StateRole
from peftjax.tree._state_roles import state_roles as state_roles

__all__ = [
    "DimensionNumbers",
    "Layout",
    "Path",
    "ResolvedDims",
    "Rule",
    "StateRole",
    "Views",
    "all_of",
    "any_of",
    "assign",
    "bind",
    "canonical",
    "default_dimension_numbers",
    "describe",
    "dims",
    "dtype_is",
    "flatten",
    "from_matrix",
    "labels",
    "leaves_by_path",
    "map_with_path",
    "mask",
    "ndim_at_least",
    "not_",
    "path_regex",
    "paths",
    "replace_leaves",
    "resolve",
    "shape_is",
    "stack_layers",
    "stacked",
    "state_roles",
    "to_matrix",
    "unstack_layers",
]
