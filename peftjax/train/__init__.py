# SPDX-License-Identifier: Apache-2.0
"""The one training API: a step builder and a loop.

``trainer(loss_fn, optimizer, ...)`` builds the step for every composition
(adapter-only, hybrid, optimizer-only, sparse); ``fit`` runs it with progress,
evaluation, metrics, plots, checkpoints and resume.
"""

from peftjax.train._cli import config_help as config_help
from peftjax.train._cli import option as option
from peftjax.train._cli import parse_config as parse_config
from peftjax.train._loop import FitResult as FitResult
from peftjax.train._loop import TooManySkippedSteps as TooManySkippedSteps
from peftjax.train._loop import fit as fit
from peftjax.train._loop import resume_step as resume_step
from peftjax.train._plot import plot_curves as plot_curves
from peftjax.train._state import TrainState as TrainState

__all__ = [
    "FitResult",
    "TooManySkippedSteps",
    "config_help",
    "fit",
    "option",
    "parse_config",
    "plot_curves",
    "resume_step",
    "TrainState",
]
