# SPDX-License-Identifier: Apache-2.0
"""The one training API: a step builder and a loop.

``trainer(loss_fn, optimizer, ...)`` builds the step for every composition
(adapter-only, hybrid, optimizer-only, sparse); ``fit`` runs it with progress,
evaluation, metrics, plots, checkpoints and resume; ``cola`` runs a chain of
LoRA phases (train, merge, re-initialise) through both.
"""

from peftjax.train._cli import config_help as config_help
from peftjax.train._cli import option as option
from peftjax.train._cli import parse_config as parse_config
from peftjax.train._cola import ColaResult as ColaResult
from peftjax.train._cola import cola as cola
from peftjax.train._loop import FitResult as FitResult
from peftjax.train._loop import TooManySkippedSteps as TooManySkippedSteps
from peftjax.train._loop import fit as fit
from peftjax.train._loop import resume_step as resume_step
from peftjax.train._plot import plot_curves as plot_curves
from peftjax.train._sparse import SpIELConfig as SpIELConfig
from peftjax.train._sparse import SpIELState as SpIELState
from peftjax.train._state import TrainState as TrainState
from peftjax.train._step import Trainer as Trainer
from peftjax.train._step import all_finite as all_finite
from peftjax.train._step import hybrid_labels as hybrid_labels
from peftjax.train._step import trainer as trainer
from peftjax.train._step import update_if_finite as update_if_finite

__all__ = [
    "ColaResult",
    "FitResult",
    "SpIELConfig",
    "SpIELState",
    "TooManySkippedSteps",
    "config_help",
    "fit",
    "option",
    "parse_config",
    "plot_curves",
    "resume_step",
    "TrainState",
    "Trainer",
    "all_finite",
    "cola",
    "hybrid_labels",
    "trainer",
    "update_if_finite",
]
