# SPDX-License-Identifier: Apache-2.0
"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax NNX.

See ``peftjax/models/README.md`` for the parameter path table (unrolled and
scanned layouts).
"""

from peftjax.models.llama._config import LlamaConfig as LlamaConfig
from peftjax.models.llama._config import RopeScaling as RopeScaling
from peftjax.models.llama._export import hf_key_map as hf_key_map
from peftjax.models.llama._export import params_to_hf as params_to_hf
from peftjax.models.llama._export import save_hf as save_hf
from peftjax.models.llama._generate import Sampling as Sampling
from peftjax.models.llama._generate import generate as generate
from peftjax.models.llama._generate import sample_logits as sample_logits
from peftjax.models.llama._loader import config_from_gguf as config_from_gguf
from peftjax.models.llama._loader import load_llama as load_llama
from peftjax.models.llama._loader import load_llama_params as load_llama_params
from peftjax.models.llama._loader import params_from_gguf as params_from_gguf
from peftjax.models.llama._loader import params_from_hf as params_from_hf
from peftjax.models.llama._model import KVCache as KVCache
from peftjax.models.llama._model import LlamaForCausalLM as LlamaForCausalLM
from peftjax.models.llama._peft_keys import peft_key_map as peft_key_map
from peftjax.models.llama._presets import PEFT_DEFAULT_TARGETS as PEFT_DEFAULT_TARGETS
from peftjax.models.llama._presets import all_linear_rules as all_linear_rules
from peftjax.models.llama._presets import attention_mlp_rules as attention_mlp_rules
from peftjax.models.llama._presets import attention_rules as attention_rules
from peftjax.models.llama._presets import mlp_rules as mlp_rules
from peftjax.models.llama._presets import peft_rules as peft_rules
from peftjax.models.llama._tiny import tiny_config as tiny_config

__all__ = [
    "PEFT_DEFAULT_TARGETS",
    "all_linear_rules",
    "attention_mlp_rules",
    "attention_rules",
    "mlp_rules",
    "peft_rules",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RopeScaling",
    "Sampling",
    "config_from_gguf",
    "generate",
    "hf_key_map",
    "load_llama",
    "load_llama_params",
    "params_from_gguf",
    "params_from_hf",
    "params_to_hf",
    "sample_logits",
    "save_hf",
    "tiny_config",
    "peft_key_map",
]
