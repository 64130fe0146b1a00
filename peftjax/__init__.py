# SPDX-License-Identifier: Apache-2.0
"""peftjax: functional parameter-efficient fine-tuning for JAX.

Adapters are pure transforms over parameter pytrees, optimizer-side methods
are optax ``GradientTransformation``s, and both are targeted with one rule
vocabulary over canonical ``/``-joined paths.

The subpackages are namespaces: ``peftjax.tree``, ``peftjax.adapters``,
``peftjax.merge``, ``peftjax.optim``, ``peftjax.io`` (checkpoints, formats)
and, when installed with the Flax extras, ``peftjax.models``. Importing ``peftjax`` does
not import flax.
"""

import importlib
import importlib.metadata

from peftjax import adapters as adapters
from peftjax import tree as tree
from peftjax.adapters import AdapterState as AdapterState
from peftjax.adapters import lora as lora
from peftjax.adapters import materialize as materialize
from peftjax.report import Report as Report
from peftjax.report import count_params as count_params
from peftjax.report import report as report
from peftjax.report import tree_bytes as tree_bytes
from peftjax.tree import Rule as Rule
from peftjax.tree import assign as assign
from peftjax.tree import describe as describe

try:
    __version__ = importlib.metadata.version("peftjax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

_LAZY = ("io", "models", "optim", "inits", "masks", "merge", "factored", "data", "quant",
         "shard", "train")


def __getattr__(name: str):
    # Heavier namespaces (orbax, flax) load on first use, not at import.
    if name in _LAZY:
        return importlib.import_module(f"peftjax.{name}")
    raise AttributeError(f"module 'peftjax' has no attribute {name!r}")


__all__ = [
    "AdapterState",
    "Report",
    "Rule",
    "adapters",
    "assign",
    "count_params",
    "describe",
    "lora",
    "materialize",
    "report",
    "tree",
    "tree_bytes",
]
