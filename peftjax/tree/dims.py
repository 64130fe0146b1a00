# SPDX-License-Identifier: Apache-2.0
"""Matrix-view presets namespace: ``peftjax.tree.dims`` (see ``_dims``)."""

from peftjax.tree._dims import conv as conv
from peftjax.tree._dims import dense as dense
from peftjax.tree._dims import einsum as einsum
from peftjax.tree._dims import head_merge as head_merge
from peftjax.tree._dims import head_split as head_split
from peftjax.tree._dims import linear_general as linear_general
from peftjax.tree._dims import multi_head_attention as multi_head_attention
from peftjax.tree._dims import stacked as stacked
from peftjax.tree._dims import transposed as transposed

__all__ = ["conv", "dense", "einsum", "head_merge", "head_split", "linear_general",
           "multi_head_attention", "stacked", "transposed"]
