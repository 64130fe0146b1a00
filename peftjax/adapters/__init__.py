# SPDX-License-Identifier: Apache-2.0
"""Adapters: reparametrisations ``W' = f(W, trainable, frozen)`` of leaves.

Per leaf an ``Adapter(init, apply)`` (the protocol, ``_protocol``), most of
them built by ``lift_matrix`` from math written once for one ``(in, out)``
matrix; over a tree ``init``, ``materialize``, ``fold`` and ``unfold``
(``_tree``) driven by an assignment from ``peftjax.tree.assign``, checked by
``validate``. Several named adapters on one base live in an
``AdapterCollection`` (``add``, ``switch``, ``disable``, ``delete``,
``add_weighted``); ``batched`` runs several of them in one batch, one adapter
per example.

Apart from these weight reparametrisations, soft prompts and prefixes
(``prompt_tuning``, ``prefix_tuning``, ``prefix_kv``, P-tuning's encoder
``p_tuning``, multitask prompts ``multitask_prompt_tuning``, ``cpt``,
``cartridge``) are not ``Adapter``s: they change no weight and are passed to
the model as extra inputs.

A new adapter is one ``_<method>.py`` file (a factory returning
``lift_matrix(...)``), its re-export below, and one entry in the contract
suite's ``ADAPTERS`` list (``tests/adapters/test_contract.py``).
"""

from peftjax.adapters._abba import ABBAParams as ABBAParams
from peftjax.adapters._abba import abba as abba
from peftjax.adapters._abba import abba_khatri_rao as abba_khatri_rao
from peftjax.adapters._adalora import AdaLoRAImportance as AdaLoRAImportance
from peftjax.adapters._adalora import AdaLoRAParams as AdaLoRAParams
from peftjax.adapters._adalora import adalora as adalora
from peftjax.adapters._adalora import adalora_budget as adalora_budget
from peftjax.adapters._adalora import adalora_init_importance as adalora_init_importance
from peftjax.adapters._adalora import adalora_mask as adalora_mask
from peftjax.adapters._adalora import adalora_orthogonality as adalora_orthogonality
from peftjax.adapters._adalora import adalora_triplet_scores as adalora_triplet_scores
from peftjax.adapters._adalora import (
    adalora_update_importance as adalora_update_importance,
)
from peftjax.adapters._adamss import AdaMSSBasis as AdaMSSBasis
from peftjax.adapters._adamss import AdaMSSParams as AdaMSSParams
from peftjax.adapters._adamss import adamss as adamss
from peftjax.adapters._adamss import adamss_kmeans as adamss_kmeans
from peftjax.adapters._adamss import adamss_segments as adamss_segments
from peftjax.adapters._adamss_asa import AdaMSSImportance as AdaMSSImportance
from peftjax.adapters._adamss_asa import adamss_asa_allocate as adamss_asa_allocate
from peftjax.adapters._adamss_asa import adamss_asa_target as adamss_asa_target
from peftjax.adapters._adamss_asa import adamss_freeze as adamss_freeze
from peftjax.adapters._adamss_asa import adamss_init_importance as adamss_init_importance
from peftjax.adapters._adamss_asa import adamss_update_importance as adamss_update_importance
from peftjax.adapters._adaption_prompt import AdaptionPromptHook as AdaptionPromptHook
from peftjax.adapters._adaption_prompt import AdaptionPromptParams as AdaptionPromptParams
from peftjax.adapters._adaption_prompt import adaption_prompt as adaption_prompt
from peftjax.adapters._alora import ALoRAHook as ALoRAHook
from peftjax.adapters._alora import alora_hook as alora_hook
from peftjax.adapters._alora import alora_starts as alora_starts
from peftjax.adapters._arrow import ArrowConfig as ArrowConfig
from peftjax.adapters._arrow import ArrowExperts as ArrowExperts
from peftjax.adapters._arrow import ArrowHook as ArrowHook
from peftjax.adapters._arrow import arrow_experts as arrow_experts
from peftjax.adapters._arrow import arrow_prototype as arrow_prototype
from peftjax.adapters._batched import BatchedRouting as BatchedRouting
from peftjax.adapters._batched import batched as batched
from peftjax.adapters._bdlora import BdLoRAParams as BdLoRAParams
from peftjax.adapters._bdlora import bdlora as bdlora
from peftjax.adapters._beft import BEFTParams as BEFTParams
from peftjax.adapters._beft import beft as beft
from peftjax.adapters._boft import BOFTParams as BOFTParams
from peftjax.adapters._boft import boft as boft
from peftjax.adapters._boft import boft_layout as boft_layout
from peftjax.adapters._boft import boft_permutations as boft_permutations
from peftjax.adapters._c3a import C3AParams as C3AParams
from peftjax.adapters._c3a import c3a as c3a
from peftjax.adapters._cartridge import CartridgeParams as CartridgeParams
from peftjax.adapters._cartridge import cartridge as cartridge
from peftjax.adapters._cartridge import cartridge_compose as cartridge_compose
from peftjax.adapters._cartridge import cartridge_kv as cartridge_kv
from peftjax.adapters._cartridge import cartridge_kv_from_cache as cartridge_kv_from_cache
from peftjax.adapters._collection import AdapterCollection as AdapterCollection
from peftjax.adapters._collection import NamedAdapter as NamedAdapter
from peftjax.adapters._collection import active as active
from peftjax.adapters._collection import add as add
from peftjax.adapters._collection import add_weighted as add_weighted
from peftjax.adapters._collection import collection as collection
from peftjax.adapters._collection import delete as delete
from peftjax.adapters._collection import disable as disable
from peftjax.adapters._collection import switch as switch
from peftjax.adapters._conv import LowRankDelta as LowRankDelta
from peftjax.adapters._conv import lora_conv as lora_conv
from peftjax.adapters._cpt import CPTParams as CPTParams
from peftjax.adapters._cpt import cpt as cpt
from peftjax.adapters._cpt import cpt_inputs as cpt_inputs
from peftjax.adapters._cpt import cpt_loss as cpt_loss
from peftjax.adapters._cpt import cpt_project as cpt_project
from peftjax.adapters._cpt import cpt_prompt as cpt_prompt
from peftjax.adapters._cpt import cpt_update_mask as cpt_update_mask
from peftjax.adapters._deft import DeFTParams as DeFTParams
from peftjax.adapters._deft import deft as deft
from peftjax.adapters._delora import DeLoRANorm as DeLoRANorm
from peftjax.adapters._delora import DeLoRAParams as DeLoRAParams
from peftjax.adapters._delora import delora as delora
from peftjax.adapters._dora import DoRAParams as DoRAParams
from peftjax.adapters._dora import dora as dora
from peftjax.adapters._fourierft import FourierFTIndices as FourierFTIndices
from peftjax.adapters._fourierft import FourierFTParams as FourierFTParams
from peftjax.adapters._fourierft import fourierft as fourierft
from peftjax.adapters._fourierft import fourierft_indices as fourierft_indices
from peftjax.adapters._frod import FRoDFrozen as FRoDFrozen
from peftjax.adapters._frod import FRoDParams as FRoDParams
from peftjax.adapters._frod import frod as frod
from peftjax.adapters._frod import frod_basis as frod_basis
from peftjax.adapters._frod import frod_nnz as frod_nnz
from peftjax.adapters._glora import GLoRAParams as GLoRAParams
from peftjax.adapters._glora import glora as glora
from peftjax.adapters._gralora import GraLoRAParams as GraLoRAParams
from peftjax.adapters._gralora import gralora as gralora
from peftjax.adapters._hira import HiRAParams as HiRAParams
from peftjax.adapters._hira import hira as hira
from peftjax.adapters._hooks import Hooks as Hooks
from peftjax.adapters._hooks import Site as Site
from peftjax.adapters._hooks import compose as compose_hooks
from peftjax.adapters._hra import HRAParams as HRAParams
from peftjax.adapters._hra import hra as hra
from peftjax.adapters._hra import hra_orthogonality as hra_orthogonality
from peftjax.adapters._hra import hra_rotation as hra_rotation
from peftjax.adapters._intrinsic_dim import IntrinsicParams as IntrinsicParams
from peftjax.adapters._intrinsic_dim import IntrinsicProjection as IntrinsicProjection
from peftjax.adapters._intrinsic_dim import fastfood as fastfood
from peftjax.adapters._intrinsic_dim import intrinsic_dim as intrinsic_dim
from peftjax.adapters._intrinsic_dim import walsh_hadamard as walsh_hadamard
from peftjax.adapters._lift import lift_matrix as lift_matrix
from peftjax.adapters._lift import map_slices as map_slices
from peftjax.adapters._lift import path_key as path_key
from peftjax.adapters._ln_tuning import LNTuningParams as LNTuningParams
from peftjax.adapters._ln_tuning import ln_tuning as ln_tuning
from peftjax.adapters._loha import LoHaParams as LoHaParams
from peftjax.adapters._loha import loha as loha
from peftjax.adapters._lokr import LoKrInit as LoKrInit
from peftjax.adapters._lokr import LoKrParams as LoKrParams
from peftjax.adapters._lokr import lokr as lokr
from peftjax.adapters._lokr import lokr_factorization as lokr_factorization
from peftjax.adapters._lora import LoRAInit as LoRAInit
from peftjax.adapters._lora import LoRAParams as LoRAParams
from peftjax.adapters._lora import Scaling as Scaling
from peftjax.adapters._lora import check_rank as check_rank
from peftjax.adapters._lora import lora as lora
from peftjax.adapters._lora import scaling_value as scaling_value
from peftjax.adapters._lora_xs import LoRAXSBasis as LoRAXSBasis
from peftjax.adapters._lora_xs import LoRAXSParams as LoRAXSParams
from peftjax.adapters._lora_xs import lora_xs as lora_xs
from peftjax.adapters._lowrank import compute_dtype as compute_dtype
from peftjax.adapters._miss import MiSSParams as MiSSParams
from peftjax.adapters._miss import MiSSVariant as MiSSVariant
from peftjax.adapters._miss import miss as miss
from peftjax.adapters._monteclora import MonteCLoRABuffers as MonteCLoRABuffers
from peftjax.adapters._monteclora import MonteCLoRAParams as MonteCLoRAParams
from peftjax.adapters._monteclora import monteclora as monteclora
from peftjax.adapters._monteclora import monteclora_loss as monteclora_loss
from peftjax.adapters._monteclora import monteclora_sample as monteclora_sample
from peftjax.adapters._mos import MoSIndices as MoSIndices
from peftjax.adapters._mos import MoSParams as MoSParams
from peftjax.adapters._mos import mos as mos
from peftjax.adapters._multitask_prompt import MultitaskPromptParams as MultitaskPromptParams
from peftjax.adapters._multitask_prompt import multitask_prompt as multitask_prompt
from peftjax.adapters._multitask_prompt import multitask_prompt_tuning as multitask_prompt_tuning
from peftjax.adapters._nola import NOLABasis as NOLABasis
from peftjax.adapters._nola import NOLAParams as NOLAParams
from peftjax.adapters._nola import nola as nola
from peftjax.adapters._nola import nola_basis as nola_basis
from peftjax.adapters._oft import OFTParams as OFTParams
from peftjax.adapters._oft import oft as oft
from peftjax.adapters._oft import oft_block_size as oft_block_size
from peftjax.adapters._oft import oft_project as oft_project
from peftjax.adapters._osf import OSFBasis as OSFBasis
from peftjax.adapters._osf import OSFParams as OSFParams
from peftjax.adapters._osf import osf as osf
from peftjax.adapters._osf import osf_rank as osf_rank
from peftjax.adapters._p_tuning import LSTMLayer as LSTMLayer
from peftjax.adapters._p_tuning import PTuningLSTM as PTuningLSTM
from peftjax.adapters._p_tuning import PTuningMLP as PTuningMLP
from peftjax.adapters._p_tuning import p_tuning as p_tuning
from peftjax.adapters._p_tuning import p_tuning_prompt as p_tuning_prompt
from peftjax.adapters._peanut import PEANUTParams as PEANUTParams
from peftjax.adapters._peanut import peanut as peanut
from peftjax.adapters._poly import PolyHook as PolyHook
from peftjax.adapters._poly import PolyParams as PolyParams
from peftjax.adapters._poly import poly_init as poly_init
from peftjax.adapters._poly import poly_weights as poly_weights
from peftjax.adapters._precision import cast_floating as cast_floating
from peftjax.adapters._presets import all_linear_rules as all_linear_rules
from peftjax.adapters._prompt import PrefixParams as PrefixParams
from peftjax.adapters._prompt import PrefixProjection as PrefixProjection
from peftjax.adapters._prompt import PromptInit as PromptInit
from peftjax.adapters._prompt import PromptParams as PromptParams
from peftjax.adapters._prompt import prefix_kv as prefix_kv
from peftjax.adapters._prompt import prefix_tuning as prefix_tuning
from peftjax.adapters._prompt import prompt_tuning as prompt_tuning
from peftjax.adapters._protocol import Adapter as Adapter
from peftjax.adapters._protocol import AdapterState as AdapterState
from peftjax.adapters._protocol import BiasHook as BiasHook
from peftjax.adapters._protocol import FactoredForm as FactoredForm
from peftjax.adapters._protocol import FactoredTerms as FactoredTerms
from peftjax.adapters._psoft import PSOFTBasis as PSOFTBasis
from peftjax.adapters._psoft import PSOFTParams as PSOFTParams
from peftjax.adapters._psoft import psoft as psoft
from peftjax.adapters._psoft import psoft_basis as psoft_basis
from peftjax.adapters._psoft import psoft_rotation as psoft_rotation
from peftjax.adapters._pvera import PVeRABasis as PVeRABasis
from peftjax.adapters._pvera import PVeRAParams as PVeRAParams
from peftjax.adapters._pvera import pvera as pvera
from peftjax.adapters._pvera import pvera_delta as pvera_delta
from peftjax.adapters._pvera import pvera_shared as pvera_shared
from peftjax.adapters._qalora import QALoRAParams as QALoRAParams
from peftjax.adapters._qalora import qalora as qalora
from peftjax.adapters._randlora import RandLoRABases as RandLoRABases
from peftjax.adapters._randlora import RandLoRABasis as RandLoRABasis
from peftjax.adapters._randlora import RandLoRAParams as RandLoRAParams
from peftjax.adapters._randlora import randlora as randlora
from peftjax.adapters._randlora import randlora_shared as randlora_shared
from peftjax.adapters._road import RoAdParams as RoAdParams
from peftjax.adapters._road import road as road
from peftjax.adapters._said import SAIDParams as SAIDParams
from peftjax.adapters._said import said as said
from peftjax.adapters._scale_shift import ScaleParams as ScaleParams
from peftjax.adapters._scale_shift import ScaleShiftParams as ScaleShiftParams
from peftjax.adapters._scale_shift import Side as Side
from peftjax.adapters._scale_shift import ia3 as ia3
from peftjax.adapters._scale_shift import scale_shift as scale_shift
from peftjax.adapters._scale_shift import ssf as ssf
from peftjax.adapters._shared import SHARED as SHARED
from peftjax.adapters._shared import Shared as Shared
from peftjax.adapters._shared import SharedInit as SharedInit
from peftjax.adapters._shared import SharedParts as SharedParts
from peftjax.adapters._shared import resolve_shared as resolve_shared
from peftjax.adapters._shared import unshare as unshare
from peftjax.adapters._shira import SHiRAIndices as SHiRAIndices
from peftjax.adapters._shira import SHiRAParams as SHiRAParams
from peftjax.adapters._shira import shira as shira
from peftjax.adapters._shira import shira_indices as shira_indices
from peftjax.adapters._sora import SoRAParams as SoRAParams
from peftjax.adapters._sora import sora as sora
from peftjax.adapters._sora import sora_prune as sora_prune
from peftjax.adapters._sparse import SparseSupport as SparseSupport
from peftjax.adapters._sparse import SparseValues as SparseValues
from peftjax.adapters._sparse import sparse_delta as sparse_delta
from peftjax.adapters._sparse import sparse_from_compact as sparse_from_compact
from peftjax.adapters._sparse import sparse_num as sparse_num
from peftjax.adapters._sparse import sparse_to_compact as sparse_to_compact
from peftjax.adapters._supertuning import SuperTuningIndices as SuperTuningIndices
from peftjax.adapters._supertuning import SuperTuningParams as SuperTuningParams
from peftjax.adapters._supertuning import supertuning as supertuning
from peftjax.adapters._supertuning import supertuning_count as supertuning_count
from peftjax.adapters._supertuning import supertuning_support as supertuning_support
from peftjax.adapters._svfit import SVFitBasis as SVFitBasis
from peftjax.adapters._svfit import SVFitParams as SVFitParams
from peftjax.adapters._svfit import svfit as svfit
from peftjax.adapters._tinylora import TinyLoRABasis as TinyLoRABasis
from peftjax.adapters._tinylora import TinyLoRAParams as TinyLoRAParams
from peftjax.adapters._tinylora import tinylora as tinylora
from peftjax.adapters._tinylora import tinylora_groups as tinylora_groups
from peftjax.adapters._trainable_tokens import (
    TrainableTokensParams as TrainableTokensParams,
)
from peftjax.adapters._trainable_tokens import trainable_tokens as trainable_tokens
from peftjax.adapters._tree import fold as fold
from peftjax.adapters._tree import init as init
from peftjax.adapters._tree import materialize as materialize
from peftjax.adapters._tree import num_trainable as num_trainable
from peftjax.adapters._tree import unfold as unfold
from peftjax.adapters._unilora import UniLoRAIndices as UniLoRAIndices
from peftjax.adapters._unilora import UniLoRAParams as UniLoRAParams
from peftjax.adapters._unilora import unilora as unilora
from peftjax.adapters._unilora import unilora_indices as unilora_indices
from peftjax.adapters._validate import validate as validate
from peftjax.adapters._vblora import VBLoRAParams as VBLoRAParams
from peftjax.adapters._vblora import vblora as vblora
from peftjax.adapters._vera import VeRABasis as VeRABasis
from peftjax.adapters._vera import VeRAParams as VeRAParams
from peftjax.adapters._vera import vera as vera
from peftjax.adapters._vera import vera_shared as vera_shared
from peftjax.adapters._waveft import WaveFTIndices as WaveFTIndices
from peftjax.adapters._waveft import WaveFTParams as WaveFTParams
from peftjax.adapters._waveft import waveft as waveft
from peftjax.adapters._waveft import waveft_wavelets as waveft_wavelets
from peftjax.adapters._xlora import SITE_ORDER as XLORA_SITE_ORDER
from peftjax.adapters._xlora import XLoraClassifier as XLoraClassifier
from peftjax.adapters._xlora import XLoraConfig as XLoraConfig
from peftjax.adapters._xlora import XLoraExperts as XLoraExperts
from peftjax.adapters._xlora import XLoraHook as XLoraHook
from peftjax.adapters._xlora import xlora_forward as xlora_forward
from peftjax.adapters._xlora import xlora_generate as xlora_generate
from peftjax.adapters._xlora import xlora_init as xlora_init
from peftjax.adapters._xlora import xlora_scalings as xlora_scalings

__all__ = [
    "AdaptionPromptHook",
    "AdaptionPromptParams",
    "adaption_prompt",
    "ALoRAHook",
    "alora_hook",
    "alora_starts",
    "Hooks",
    "Site",
    "compose_hooks",
    "AdaLoRAImportance",
    "AdaLoRAParams",
    "AdaMSSBasis",
    "AdaMSSImportance",
    "AdaMSSParams",
    "Adapter",
    "AdapterCollection",
    "BatchedRouting",
    "NamedAdapter",
    "active",
    "add",
    "add_weighted",
    "all_linear_rules",
    "batched",
    "collection",
    "delete",
    "disable",
    "switch",
    "AdapterState",
    "BiasHook",
    "VeRABasis",
    "VeRAParams",
    "DoRAParams",
    "FactoredForm",
    "FactoredTerms",
    "LoRAInit",
    "LoRAParams",
    "LoRAXSBasis",
    "LoRAXSParams",
    "PrefixParams",
    "PrefixProjection",
    "PromptInit",
    "PromptParams",
    "Scaling",
    "ScaleParams",
    "SHARED",
    "Shared",
    "SharedInit",
    "SharedParts",
    "resolve_shared",
    "unshare",
    "IntrinsicParams",
    "IntrinsicProjection",
    "fastfood",
    "intrinsic_dim",
    "walsh_hadamard",
    "SAIDParams",
    "MoSIndices",
    "MoSParams",
    "mos",
    "said",
    "UniLoRAIndices",
    "UniLoRAParams",
    "unilora",
    "unilora_indices",
    "VBLoRAParams",
    "vblora",
    "ScaleShiftParams",
    "Side",
    "adalora",
    "adalora_budget",
    "adalora_init_importance",
    "adalora_mask",
    "adalora_orthogonality",
    "adalora_triplet_scores",
    "adalora_update_importance",
    "adamss",
    "adamss_asa_allocate",
    "adamss_asa_target",
    "adamss_freeze",
    "adamss_init_importance",
    "adamss_kmeans",
    "adamss_segments",
    "adamss_update_importance",
    "cast_floating",
    "dora",
    "ia3",
    "init",
    "lift_matrix",
    "map_slices",
    "check_rank",
    "compute_dtype",
    "validate",
    "LNTuningParams",
    "ln_tuning",
    "FourierFTIndices",
    "FourierFTParams",
    "fourierft",
    "fourierft_indices",
    "C3AParams",
    "c3a",
    "WaveFTIndices",
    "WaveFTParams",
    "waveft",
    "waveft_wavelets",
    "FRoDFrozen",
    "FRoDParams",
    "frod",
    "frod_basis",
    "frod_nnz",
    "GLoRAParams",
    "glora",
    "GraLoRAParams",
    "gralora",
    "MiSSParams",
    "MiSSVariant",
    "miss",
    "lokr",
    "lokr_factorization",
    "LoKrInit",
    "LoKrParams",
    "lora",
    "lora_conv",
    "LowRankDelta",
    "lora_xs",
    "materialize",
    "fold",
    "num_trainable",
    "path_key",
    "CartridgeParams",
    "cartridge",
    "cartridge_compose",
    "cartridge_kv",
    "cartridge_kv_from_cache",
    "CPTParams",
    "cpt",
    "cpt_inputs",
    "cpt_loss",
    "cpt_project",
    "cpt_prompt",
    "cpt_update_mask",
    "MultitaskPromptParams",
    "multitask_prompt",
    "multitask_prompt_tuning",
    "LSTMLayer",
    "PTuningLSTM",
    "PTuningMLP",
    "p_tuning",
    "p_tuning_prompt",
    "prefix_kv",
    "prefix_tuning",
    "prompt_tuning",
    "scale_shift",
    "scaling_value",
    "ssf",
    "unfold",
    "vera",
    "vera_shared",
    "PVeRABasis",
    "PVeRAParams",
    "pvera",
    "pvera_delta",
    "pvera_shared",
    "RandLoRABases",
    "RandLoRABasis",
    "RandLoRAParams",
    "randlora",
    "randlora_shared",
    "SparseSupport",
    "SparseValues",
    "sparse_delta",
    "sparse_from_compact",
    "sparse_num",
    "sparse_to_compact",
    "SHiRAIndices",
    "SHiRAParams",
    "shira",
    "shira_indices",
    "SuperTuningIndices",
    "SuperTuningParams",
    "supertuning",
    "supertuning_count",
    "supertuning_support",
    "TinyLoRABasis",
    "TinyLoRAParams",
    "tinylora",
    "tinylora_groups",
    "ABBAParams",
    "abba",
    "abba_khatri_rao",
    "LoHaParams",
    "loha",
    "NOLABasis",
    "NOLAParams",
    "nola",
    "nola_basis",
    "SoRAParams",
    "sora",
    "sora_prune",
    "BEFTParams",
    "beft",
    "DeLoRANorm",
    "DeLoRAParams",
    "delora",
    "OSFBasis",
    "OSFParams",
    "osf",
    "osf_rank",
    "HiRAParams",
    "hira",
    "OFTParams",
    "oft",
    "oft_block_size",
    "oft_project",
    "HRAParams",
    "PolyParams",
    "PolyHook",
    "poly_init",
    "poly_weights",
    "XLoraConfig",
    "XLoraClassifier",
    "XLoraExperts",
    "XLoraHook",
    "xlora_init",
    "xlora_scalings",
    "XLORA_SITE_ORDER",
    "xlora_forward",
    "xlora_generate",
    "ArrowConfig",
    "ArrowExperts",
    "ArrowHook",
    "arrow_experts",
    "arrow_prototype",
    "hra",
    "hra_rotation",
    "hra_orthogonality",
    "QALoRAParams",
    "qalora",
    "BdLoRAParams",
    "bdlora",
    "MonteCLoRAParams",
    "MonteCLoRABuffers",
    "monteclora",
    "monteclora_sample",
    "monteclora_loss",
    "BOFTParams",
    "boft",
    "boft_layout",
    "boft_permutations",
    "PSOFTBasis",
    "PSOFTParams",
    "psoft",
    "psoft_basis",
    "psoft_rotation",
    "DeFTParams",
    "deft",
    "RoAdParams",
    "road",
    "PEANUTParams",
    "peanut",
    "SVFitBasis",
    "SVFitParams",
    "svfit",
    "TrainableTokensParams",
    "trainable_tokens",
]
