# SPDX-License-Identifier: Apache-2.0
"""Optimizer-side methods as optax transforms: GaLore, FRUGAL, LISA, LoRA+, LoRA-FA,
Riemannian-preconditioned LoRA, SoRA, OSF.

Every transform follows optax anatomy (``scale_by_<m>`` core, ``<m>`` alias,
``<M>State`` with ``count`` first) and composes with ``optax.chain``,
``optax.partition``, ``optax.inject_hyperparams`` and ``optax.MultiSteps``.
Projectors are values (``svd()``, ``randomized_svd()``, ``random_orthogonal()``,
``coordinates()``) accepted by both GaLore and FRUGAL. Every state type
declares how its fields relate to the parameters (``state_roles``, with
``peftjax.tree.StateRole``), which ``peftjax.shard.state_shardings`` reads
(docs/sharding_state.md).
"""

from peftjax.optim._adam import adamw_hf as adamw_hf
from peftjax.optim._adam import scale_by_adam_hf as scale_by_adam_hf
from peftjax.optim._frugal import BlockSelector as BlockSelector
from peftjax.optim._frugal import FrugalState as FrugalState
from peftjax.optim._frugal import blocks as blocks
from peftjax.optim._frugal import frugal as frugal
from peftjax.optim._frugal import scale_by_frugal as scale_by_frugal
from peftjax.optim._galore import GaLoreState as GaLoreState
from peftjax.optim._galore import galore as galore
from peftjax.optim._galore import scale_by_galore as scale_by_galore
from peftjax.optim._lisa import LISAState as LISAState
from peftjax.optim._lisa import lisa as lisa
from peftjax.optim._lisa import scale_by_lisa as scale_by_lisa
from peftjax.optim._lorafa import LoRAFAState as LoRAFAState
from peftjax.optim._lorafa import lorafa as lorafa
from peftjax.optim._lorafa import scale_by_lorafa as scale_by_lorafa
from peftjax.optim._loraplus import LoRAPlusState as LoRAPlusState
from peftjax.optim._loraplus import loraplus as loraplus
from peftjax.optim._loraplus import scale_by_loraplus as scale_by_loraplus
from peftjax.optim._osf import OSFState as OSFState
from peftjax.optim._osf import osf as osf
from peftjax.optim._osf import scale_by_osf as scale_by_osf
from peftjax.optim._projectors import PROJ_TYPES as PROJ_TYPES
from peftjax.optim._projectors import Projector as Projector
from peftjax.optim._projectors import coordinates as coordinates
from peftjax.optim._projectors import random_orthogonal as random_orthogonal
from peftjax.optim._projectors import randomized_svd as randomized_svd
from peftjax.optim._projectors import svd as svd
from peftjax.optim._riemannian import RiemannianState as RiemannianState
from peftjax.optim._riemannian import riemannian as riemannian
from peftjax.optim._riemannian import scale_by_riemannian as scale_by_riemannian
from peftjax.optim._slots import reset_slots as reset_slots
from peftjax.optim._sora import SoRAState as SoRAState
from peftjax.optim._sora import scale_by_sora as scale_by_sora
from peftjax.optim._sora import sora as sora
from peftjax.optim._sparse import SFTAdamState as SFTAdamState
from peftjax.optim._sparse import scale_by_sft_adam as scale_by_sft_adam
from peftjax.optim._sparse import sft_adamw as sft_adamw

__all__ = [
    "PROJ_TYPES",
    "BlockSelector",
    "FrugalState",
    "GaLoreState",
    "LISAState",
    "LoRAPlusState",
    "Projector",
    "blocks",
    "coordinates",
    "frugal",
    "galore",
    "lisa",
    "loraplus",
    "OSFState",
    "osf",
    "scale_by_osf",
    "random_orthogonal",
    "randomized_svd",
    "adamw_hf",
    "scale_by_adam_hf",
    "scale_by_frugal",
    "scale_by_galore",
    "scale_by_lisa",
    "scale_by_loraplus",
    "svd",
    "reset_slots",
    "SFTAdamState",
    "scale_by_sft_adam",
    "sft_adamw",
    "SoRAState",
    "scale_by_sora",
    "sora",
    "LoRAFAState",
    "lorafa",
    "scale_by_lorafa",
    "RiemannianState",
    "riemannian",
    "scale_by_riemannian",
]
