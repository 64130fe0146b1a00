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
``cartridge``, DePT's short prompt and input offset ``dept``) are not
``Adapter``s: they change no weight and are passed to the model as extra
inputs.

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
from peftjax.adapters._clover import CLOVERBasis as CLOVERBasis
from peftjax.adapters._clover import CLOVERKernels as CLOVERKernels
from peftjax.adapters._clover import CLOVERParams as CLOVERParams
from peftjax.adapters._clover import clover as clover
from peftjax.adapters._clover import clover_orthogonalize as clover_orthogonalize
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
from peftjax.adapters._dept import DePTParams as DePTParams
from peftjax.adapters._dept import dept as dept
from peftjax.adapters._dept import dept_embeddings as dept_embeddings
from peftjax.adapters._dept import dept_labels as dept_labels
from peftjax.adapters._dora import DoRAParams as DoRAParams
from peftjax.adapters._dora import dora as dora
from peftjax.adapters._dsee import DSEEParams as DSEEParams
from peftjax.adapters._dsee import dsee as dsee
from peftjax.adapters._dsee import dsee_prune as dsee_prune
from peftjax.adapters._dsee import dsee_support as dsee_support
from peftjax.adapters._dylora import DyLoRAParams as DyLoRAParams
from peftjax.adapters._dylora import DyLoRARank as DyLoRARank
from peftjax.adapters._dylora import dylora as dylora
from peftjax.adapters._dylora import dylora_sample_rank as dylora_sample_rank
from peftjax.adapters._dylora import dylora_set_rank as dylora_set_rank
from peftjax.adapters._flora import FLoRAParams as FLoRAParams
from peftjax.adapters._flora import flora as flora
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
from peftjax.adapters._increlora import IncreLoRAImportance as IncreLoRAImportance
from peftjax.adapters._increlora import IncreLoRAParams as IncreLoRAParams
from peftjax.adapters._increlora import IncreLoRARank as IncreLoRARank
from peftjax.adapters._increlora import increlora as increlora
from peftjax.adapters._increlora import increlora_grow as increlora_grow
from peftjax.adapters._increlora import (
    increlora_init_importance as increlora_init_importance,
)
from peftjax.adapters._increlora import increlora_module_scores as increlora_module_scores
from peftjax.adapters._increlora import increlora_orthogonality as increlora_orthogonality
from peftjax.adapters._increlora import (
    increlora_update_importance as increlora_update_importance,
)
from peftjax.adapters._increlora import increlora_value_and_grad as increlora_value_and_grad
from peftjax.adapters._intrinsic_dim import IntrinsicParams as IntrinsicParams
from peftjax.adapters._intrinsic_dim import IntrinsicProjection as IntrinsicProjection
from peftjax.adapters._intrinsic_dim import fastfood as fastfood
from peftjax.adapters._intrinsic_dim import intrinsic_dim as intrinsic_dim
from peftjax.adapters._intrinsic_dim import walsh_hadamard as walsh_hadamard
from peftjax.adapters._kasa import KaSABasis as KaSABasis
from peftjax.adapters._kasa import KaSAParams as KaSAParams
from peftjax.adapters._kasa import kasa as kasa
from peftjax.adapters._kasa import kasa_basis as kasa_basis
from peftjax.adapters._kasa import kasa_loss as kasa_loss
from peftjax.adapters._l4q import L4QParams as L4QParams
from peftjax.adapters._l4q import fake_quant as fake_quant
from peftjax.adapters._l4q import l4q as l4q
from peftjax.adapters._l4q import l4q_codes as l4q_codes
from peftjax.adapters._lamda import LaMDABasis as LaMDABasis
from peftjax.adapters._lamda import LaMDAFreezeState as LaMDAFreezeState
from peftjax.adapters._lamda import LaMDAParams as LaMDAParams
from peftjax.adapters._lamda import lamda as lamda
from peftjax.adapters._lamda import lamda_freeze as lamda_freeze
from peftjax.adapters._lamda import lamda_frozen_rows as lamda_frozen_rows
from peftjax.adapters._lamda import lamda_plus_ranks as lamda_plus_ranks
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
from peftjax.adapters._loldu import LoLDUFactors as LoLDUFactors
from peftjax.adapters._loldu import LoLDUParams as LoLDUParams
from peftjax.adapters._loldu import ldu as ldu
from peftjax.adapters._loldu import loldu as loldu
from peftjax.adapters._lora import LoRAInit as LoRAInit
from peftjax.adapters._lora import LoRAParams as LoRAParams
from peftjax.adapters._lora import Scaling as Scaling
from peftjax.adapters._lora import check_rank as check_rank
from peftjax.adapters._lora import lora as lora
from peftjax.adapters._lora import scaling_value as scaling_value
from peftjax.adapters._lora_b_only import LoRABOnlyFrozen as LoRABOnlyFrozen
from peftjax.adapters._lora_b_only import LoRABOnlyInit as LoRABOnlyInit
from peftjax.adapters._lora_b_only import LoRABOnlyParams as LoRABOnlyParams
from peftjax.adapters._lora_b_only import lora_b_only as lora_b_only
from peftjax.adapters._lora_xs import LoRAXSBasis as LoRAXSBasis
from peftjax.adapters._lora_xs import LoRAXSParams as LoRAXSParams
from peftjax.adapters._lora_xs import lora_xs as lora_xs
from peftjax.adapters._loram import LoRAMCut as LoRAMCut
from peftjax.adapters._loram import LoRAMGroup as LoRAMGroup
from peftjax.adapters._loram import loram_group as loram_group
from peftjax.adapters._loram import loram_masks as loram_masks
from peftjax.adapters._loram import loram_plan as loram_plan
from peftjax.adapters._loram import loram_prune as loram_prune
from peftjax.adapters._loram import loram_recover as loram_recover
from peftjax.adapters._lowrank import compute_dtype as compute_dtype
from peftjax.adapters._miss import MiSSParams as MiSSParams
from peftjax.adapters._miss import MiSSVariant as MiSSVariant
from peftjax.adapters._miss import miss as miss
from peftjax.adapters._monteclora import MonteCLoRABuffers as MonteCLoRABuffers
from peftjax.adapters._monteclora import MonteCLoRAParams as MonteCLoRAParams
from peftjax.adapters._monteclora import monteclora as monteclora
from peftjax.adapters._monteclora import monteclora_loss as monteclora_loss
from peftjax.adapters._monteclora import monteclora_sample as monteclora_sample
from peftjax.adapters._mora import MoRAParams as MoRAParams
from peftjax.adapters._mora import mora as mora
from peftjax.adapters._mora import mora_rank as mora_rank
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
from peftjax.adapters._roselora import RoseLoRAParams as RoseLoRAParams
from peftjax.adapters._roselora import RoseLoRAState as RoseLoRAState
from peftjax.adapters._roselora import roselora as roselora
from peftjax.adapters._roselora import roselora_keep as roselora_keep
from peftjax.adapters._roselora import roselora_project as roselora_project
from peftjax.adapters._roselora import roselora_sparsify as roselora_sparsify
from peftjax.adapters._said import SAIDParams as SAIDParams
from peftjax.adapters._said import said as said
from peftjax.adapters._salt import SALTBasis as SALTBasis
from peftjax.adapters._salt import SALTParams as SALTParams
from peftjax.adapters._salt import salt as salt
from peftjax.adapters._salt import salt_loss as salt_loss
from peftjax.adapters._salt import salt_rank as salt_rank
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
from peftjax.adapters._sltrain import SLTrainParams as SLTrainParams
from peftjax.adapters._sltrain import sltrain as sltrain
from peftjax.adapters._sora import SoRAParams as SoRAParams
from peftjax.adapters._sora import sora as sora
from peftjax.adapters._sora import sora_prune as sora_prune
from peftjax.adapters._sparse import SparseSupport as SparseSupport
from peftjax.adapters._sparse import SparseValues as SparseValues
from peftjax.adapters._sparse import sparse_delta as sparse_delta
from peftjax.adapters._sparse import sparse_from_compact as sparse_from_compact
from peftjax.adapters._sparse import sparse_num as sparse_num
from peftjax.adapters._sparse import sparse_to_compact as sparse_to_compact
from peftjax.adapters._spp import SPPParams as SPPParams
from peftjax.adapters._spp import spp as spp
from peftjax.adapters._supertuning import SuperTuningIndices as SuperTuningIndices
from peftjax.adapters._supertuning import SuperTuningParams as SuperTuningParams
from peftjax.adapters._supertuning import supertuning as supertuning
from peftjax.adapters._supertuning import supertuning_count as supertuning_count
from peftjax.adapters._supertuning import supertuning_support as supertuning_support
from peftjax.adapters._svfit import SVFitBasis as SVFitBasis
from peftjax.adapters._svfit import SVFitParams as SVFitParams
from peftjax.adapters._svfit import svfit as svfit
from peftjax.adapters._svft import SVFTBasis as SVFTBasis
from peftjax.adapters._svft import SVFTParams as SVFTParams
from peftjax.adapters._svft import svft as svft
from peftjax.adapters._svft import svft_count as svft_count
from peftjax.adapters._svft import svft_pattern as svft_pattern
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
from peftjax.adapters._vectorfit import VectorFitAVFState as VectorFitAVFState
from peftjax.adapters._vectorfit import VectorFitBasis as VectorFitBasis
from peftjax.adapters._vectorfit import VectorFitParams as VectorFitParams
from peftjax.adapters._vectorfit import vectorfit as vectorfit
from peftjax.adapters._vectorfit import vectorfit_avf as vectorfit_avf
from peftjax.adapters._vectorfit import vectorfit_avf_mask as vectorfit_avf_mask
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

# Every public name, alphabetically (the imports above re-export them).
__all__ = [
    "abba", "abba_khatri_rao", "ABBAParams", "active", "adalora", "adalora_budget",
    "adalora_init_importance", "adalora_mask", "adalora_orthogonality",
    "adalora_triplet_scores", "adalora_update_importance", "AdaLoRAImportance",
    "AdaLoRAParams", "adamss", "adamss_asa_allocate", "adamss_asa_target", "adamss_freeze",
    "adamss_init_importance", "adamss_kmeans", "adamss_segments",
    "adamss_update_importance", "AdaMSSBasis", "AdaMSSImportance", "AdaMSSParams",
    "Adapter", "AdapterCollection", "AdapterState", "adaption_prompt", "AdaptionPromptHook",
    "AdaptionPromptParams", "add", "add_weighted", "all_linear_rules", "alora_hook",
    "alora_starts", "ALoRAHook", "arrow_experts", "arrow_prototype", "ArrowConfig",
    "ArrowExperts", "ArrowHook", "batched", "BatchedRouting", "bdlora", "BdLoRAParams",
    "beft", "BEFTParams", "BiasHook", "boft", "boft_layout", "boft_permutations",
    "BOFTParams", "c3a", "C3AParams", "cartridge", "cartridge_compose", "cartridge_kv",
    "cartridge_kv_from_cache", "CartridgeParams", "cast_floating", "check_rank", "clover",
    "clover_orthogonalize", "CLOVERBasis", "CLOVERKernels", "CLOVERParams", "collection",
    "compose_hooks", "compute_dtype", "cpt", "cpt_inputs", "cpt_loss", "cpt_project",
    "cpt_prompt", "cpt_update_mask", "CPTParams", "deft", "DeFTParams", "delete", "delora",
    "DeLoRANorm", "DeLoRAParams", "dept", "dept_embeddings", "dept_labels", "DePTParams",
    "disable", "dora", "DoRAParams", "dsee", "dsee_prune", "dsee_support", "DSEEParams",
    "dylora", "dylora_sample_rank", "dylora_set_rank", "DyLoRAParams", "DyLoRARank",
    "FactoredForm", "FactoredTerms", "fake_quant", "fastfood", "flora", "FLoRAParams",
    "fold", "fourierft", "fourierft_indices", "FourierFTIndices", "FourierFTParams", "frod",
    "frod_basis", "frod_nnz", "FRoDFrozen", "FRoDParams", "glora", "GLoRAParams", "gralora",
    "GraLoRAParams", "hira", "HiRAParams", "Hooks", "hra", "hra_orthogonality",
    "hra_rotation", "HRAParams", "ia3", "increlora", "increlora_grow",
    "increlora_init_importance", "increlora_module_scores", "increlora_orthogonality",
    "increlora_update_importance", "increlora_value_and_grad", "IncreLoRAImportance",
    "IncreLoRAParams", "IncreLoRARank", "init", "intrinsic_dim", "IntrinsicParams",
    "IntrinsicProjection", "kasa", "kasa_basis", "kasa_loss", "KaSABasis", "KaSAParams",
    "l4q", "l4q_codes", "L4QParams", "lamda", "lamda_freeze", "lamda_frozen_rows",
    "lamda_plus_ranks", "LaMDABasis", "LaMDAFreezeState", "LaMDAParams", "ldu",
    "lift_matrix", "ln_tuning", "LNTuningParams", "loha", "LoHaParams", "lokr",
    "lokr_factorization", "LoKrInit", "LoKrParams", "loldu", "LoLDUFactors", "LoLDUParams",
    "lora", "lora_b_only", "lora_conv", "lora_xs", "LoRABOnlyFrozen", "LoRABOnlyInit",
    "LoRABOnlyParams", "LoRAInit", "loram_group", "loram_masks", "loram_plan",
    "loram_prune", "loram_recover", "LoRAMCut", "LoRAMGroup", "LoRAParams", "LoRAXSBasis",
    "LoRAXSParams", "LowRankDelta", "LSTMLayer", "map_slices", "materialize", "miss",
    "MiSSParams", "MiSSVariant", "monteclora", "monteclora_loss", "monteclora_sample",
    "MonteCLoRABuffers", "MonteCLoRAParams", "mora", "mora_rank", "MoRAParams", "mos",
    "MoSIndices", "MoSParams", "multitask_prompt", "multitask_prompt_tuning",
    "MultitaskPromptParams", "NamedAdapter", "nola", "nola_basis", "NOLABasis",
    "NOLAParams", "num_trainable", "oft", "oft_block_size", "oft_project", "OFTParams",
    "osf", "osf_rank", "OSFBasis", "OSFParams", "p_tuning", "p_tuning_prompt", "path_key",
    "peanut", "PEANUTParams", "poly_init", "poly_weights", "PolyHook", "PolyParams",
    "prefix_kv", "prefix_tuning", "PrefixParams", "PrefixProjection", "prompt_tuning",
    "PromptInit", "PromptParams", "psoft", "psoft_basis", "psoft_rotation", "PSOFTBasis",
    "PSOFTParams", "PTuningLSTM", "PTuningMLP", "pvera", "pvera_delta", "pvera_shared",
    "PVeRABasis", "PVeRAParams", "qalora", "QALoRAParams", "randlora", "randlora_shared",
    "RandLoRABases", "RandLoRABasis", "RandLoRAParams", "resolve_shared", "road",
    "RoAdParams", "roselora", "roselora_keep", "roselora_project", "roselora_sparsify",
    "RoseLoRAParams", "RoseLoRAState", "said", "SAIDParams", "salt", "salt_loss",
    "salt_rank", "SALTBasis", "SALTParams", "scale_shift", "ScaleParams",
    "ScaleShiftParams", "Scaling", "scaling_value", "SHARED", "Shared", "SharedInit",
    "SharedParts", "shira", "shira_indices", "SHiRAIndices", "SHiRAParams", "Side", "Site",
    "sltrain", "SLTrainParams", "sora", "sora_prune", "SoRAParams", "sparse_delta",
    "sparse_from_compact", "sparse_num", "sparse_to_compact", "SparseSupport",
    "SparseValues", "spp", "SPPParams", "ssf", "supertuning", "supertuning_count",
    "supertuning_support", "SuperTuningIndices", "SuperTuningParams", "svfit", "SVFitBasis",
    "SVFitParams", "svft", "svft_count", "svft_pattern", "SVFTBasis", "SVFTParams",
    "switch", "tinylora", "tinylora_groups", "TinyLoRABasis", "TinyLoRAParams",
    "trainable_tokens", "TrainableTokensParams", "unfold", "unilora", "unilora_indices",
    "UniLoRAIndices", "UniLoRAParams", "unshare", "validate", "vblora", "VBLoRAParams",
    "vectorfit", "vectorfit_avf", "vectorfit_avf_mask", "VectorFitAVFState",
    "VectorFitBasis", "VectorFitParams", "vera", "vera_shared", "VeRABasis", "VeRAParams",
    "walsh_hadamard", "waveft", "waveft_wavelets", "WaveFTIndices", "WaveFTParams",
    "xlora_forward", "xlora_generate", "xlora_init", "xlora_scalings", "XLORA_SITE_ORDER",
    "XLoraClassifier", "XLoraConfig", "XLoraExperts", "XLoraHook",
]
