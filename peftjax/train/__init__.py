# SPDX-License-Identifier: Apache-2.0
"""The one training API: a step builder and a loop.

``trainer(loss_fn, optimizer, ...)`` builds the step for every composition
(adapter-only, hybrid, optimizer-only, sparse); ``fit`` runs it with progress,
evaluation, metrics, plots, checkpoints and resume.
"""

from peftjax.train._cli import config_help as config_help
from peftjax.train._cli import option as option
from peftjax.train._cli import parse_config as parse_config
from peftjax.train._state import TrainState as TrainState

__all__ = [
    "config_help",
    "option",
    "parse_config",
    "TrainState",
]
