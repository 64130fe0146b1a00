# SPDX-License-Identifier: Apache-2.0
"""A model-agnostic ``all_linear`` target preset for Flax parameter trees.

Flax names a linear layer's weight ``kernel`` (Linen ``Dense``, NNX
``Linear``), so "every linear layer" is every ``kernel`` leaf of matrix rank.
Unrolled models have 2-D ``(in, out)`` kernels; models scanned over layers
have 3-D ``(L, in, out)`` ones (``ndim=3``). Head-split ``DenseGeneral`` /
``Einsum`` kernels of other ranks are not matched (they need explicit
``dimension_numbers``, docs/conventions.md#matrix-views), and the model's output head is
left to an ``exclude`` pattern, as PEFT's ``"all-linear"`` leaves the output
embedding out. peftjax's own models have per-family presets
(``peftjax.models.llama.all_linear_rules``, ``...bert.all_linear_rules``).

Exports: ``all_linear_rules``.
"""

from collections.abc import Sequence
from typing import Any

from peftjax import tree


def all_linear_rules(then: Any, *, exclude: Sequence[str] = (), ndim: int = 2,
                     kernel: str = r"(?:.*/)?kernel") -> list[tree.Rule]:
    """Rules giving ``then`` to every linear kernel, except ``exclude``.

    Args:
      then: the payload (an adapter, a label, a mask value).
      exclude: path regexes to leave out (e.g. ``["head/kernel"]``); each
        becomes a ``then=None`` rule placed first, so it must match a path
        (``tree.assign`` reports unused rules).
      ndim: the kernels' rank: 2 for ``(in, out)``, 3 for stacked
        ``(L, in, out)`` (scanned layers).
      kernel: the regex of a kernel's path.

    Returns:
      The exclusion rules, then one rule for the kernels.

    Raises:
      ValueError: ``ndim`` other than 2 or 3.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import tree
      >>> p = {"a": {"kernel": jnp.ones((3, 4))}, "head": {"kernel": jnp.ones((4, 2))},
      ...      "a_norm": {"scale": jnp.ones(4)}}
      >>> sorted(tree.assign(p, all_linear_rules("lora", exclude=["head/kernel"])))
      ['a/kernel']
    """
    if ndim not in (2, 3):
        raise ValueError(f"all_linear_rules: ndim must be 2 ((in, out) kernels) or 3 "
                         f"(stacked (L, in, out)), got {ndim}")
    if isinstance(exclude, str):
        raise TypeError("all_linear_rules: exclude must be a list of path regexes, "
                        f"got the string {exclude!r}")
    rules = [tree.Rule(where=e, then=None) for e in exclude]
    where = tree.all_of(
        tree.path_regex(kernel), tree.ndim_at_least(ndim),
        tree.not_(tree.ndim_at_least(ndim + 1)))
    return rules + [tree.Rule(where=where, then=then)]
