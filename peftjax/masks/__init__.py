# SPDX-License-Identifier: Apache-2.0
"""Sparse supports: selection heuristics, SpIEL drop-and-regrow, LT-SFT masks.

Pure functions over arrays (``scores -> indices``), jittable with static
``k``; they pair with ``peftjax.adapters.sparse_delta`` (fixed-size
``indices``/``values``) and with ``peftjax.optim.reset_slots`` for the
optimizer state of replaced slots.
"""

from peftjax.masks._lt_sft import lt_sft as lt_sft
from peftjax.masks._lt_sft import lt_sft_export as lt_sft_export
from peftjax.masks._lt_sft import lt_sft_mask as lt_sft_mask
from peftjax.masks._regrow import POLICIES as POLICIES
from peftjax.masks._regrow import Regrowth as Regrowth
from peftjax.masks._regrow import Selector as Selector
from peftjax.masks._regrow import random_support as random_support
from peftjax.masks._regrow import regrow as regrow
from peftjax.masks._regrow import replace_counts as replace_counts
from peftjax.masks._regrow import replace_fraction as replace_fraction
from peftjax.masks._regrow import spiel_selector as spiel_selector
from peftjax.masks._regrow import top_k as top_k
from peftjax.masks._regrow import top_k_candidates as top_k_candidates

__all__ = [
    "POLICIES",
    "Regrowth",
    "Selector",
    "lt_sft",
    "lt_sft_export",
    "lt_sft_mask",
    "random_support",
    "regrow",
    "replace_counts",
    "replace_fraction",
    "spiel_selector",
    "top_k",
    "top_k_candidates",
]
