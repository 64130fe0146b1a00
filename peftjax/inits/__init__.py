# SPDX-License-Identifier: Apache-2.0
"""Data-driven initialisers: LoRA-SB, PiSSA, OLoRA, LoRA-GA, CorDA, EVA, LoftQ, MiCA, orthogonal.

Each initialiser is a rule payload (``tree.Rule(where=..., then=inits.pissa(8))``);
``inits.run(plan, key, params, stats=...)`` returns the base to train over
(residual weights for the inits that modify it), the ``adapters`` assignment
and the adapter state. Statistics are explicit: ``accumulate_gradients``
(LoRA-GA, LoRA-SB), ``collect_covariances`` (CorDA) and ``collect_inputs``
with ``eva_fit`` (EVA, whose ``eva(fit)`` is the plan). ``to_lora`` exports a
trained adapter as a plain LoRA over the unmodified base.
"""

from peftjax.inits._base import Initializer as Initializer
from peftjax.inits._base import InitResult as InitResult
from peftjax.inits._base import run as run
from peftjax.inits._convert import to_lora as to_lora
from peftjax.inits._corda import corda as corda
from peftjax.inits._eva import EvaFit as EvaFit
from peftjax.inits._eva import collect_inputs as collect_inputs
from peftjax.inits._eva import eva as eva
from peftjax.inits._eva import eva_fit as eva_fit
from peftjax.inits._loftq import loftq as loftq
from peftjax.inits._lora_ga import lora_ga as lora_ga
from peftjax.inits._lora_sb import lora_sb as lora_sb
from peftjax.inits._lora_sb import lora_sb_num_trainable as lora_sb_num_trainable
from peftjax.inits._lora_sb import update_approximation as update_approximation
from peftjax.inits._mica import MiCABasis as MiCABasis
from peftjax.inits._mica import MiCAParams as MiCAParams
from peftjax.inits._mica import mica as mica
from peftjax.inits._olora import olora as olora
from peftjax.inits._orthogonal import orthogonal as orthogonal
from peftjax.inits._pissa import pissa as pissa
from peftjax.inits._stats import accumulate_gradients as accumulate_gradients
from peftjax.inits._stats import collect_covariances as collect_covariances

__all__ = [
    "EvaFit",
    "InitResult",
    "Initializer",
    "MiCABasis",
    "MiCAParams",
    "accumulate_gradients",
    "collect_covariances",
    "collect_inputs",
    "corda",
    "eva",
    "eva_fit",
    "lora_ga",
    "lora_sb",
    "loftq",
    "lora_sb_num_trainable",
    "mica",
    "olora",
    "orthogonal",
    "pissa",
    "run",
    "to_lora",
    "update_approximation",
]
