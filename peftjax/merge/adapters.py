# SPDX-License-Identifier: Apache-2.0
"""Adapter arithmetic namespace: ``peftjax.merge.adapters``."""

from peftjax.merge._adapters import combine_deltas as combine_deltas
from peftjax.merge._adapters import concatenate as concatenate
from peftjax.merge._adapters import linear as linear
from peftjax.merge._adapters import lora_deltas as lora_deltas
from peftjax.merge._adapters import svd_refactor as svd_refactor

__all__ = ["combine_deltas", "concatenate", "linear", "lora_deltas", "svd_refactor"]
