# SPDX-License-Identifier: Apache-2.0
"""BERT-family encoder (BERT, MiniLM, RoBERTa) in Flax NNX, its loader and export.

See ``peftjax/models/README.md`` for the parameter path table.
"""

from peftjax.models.bert._config import BertConfig as BertConfig
from peftjax.models.bert._export import params_to_hf as params_to_hf
from peftjax.models.bert._export import save_hf as save_hf
from peftjax.models.bert._loader import load_bert as load_bert
from peftjax.models.bert._loader import params_from_hf as params_from_hf
from peftjax.models.bert._model import (
    BertForSequenceClassification as BertForSequenceClassification,
)
from peftjax.models.bert._model import BertModel as BertModel
from peftjax.models.bert._model import mean_pool as mean_pool
from peftjax.models.bert._peft_keys import peft_key_map as peft_key_map
from peftjax.models.bert._presets import PEFT_DEFAULT_TARGETS as PEFT_DEFAULT_TARGETS
from peftjax.models.bert._presets import all_linear_rules as all_linear_rules
from peftjax.models.bert._presets import attention_mlp_rules as attention_mlp_rules
from peftjax.models.bert._presets import attention_rules as attention_rules
from peftjax.models.bert._presets import mlp_rules as mlp_rules
from peftjax.models.bert._presets import peft_rules as peft_rules

__all__ = [
    "PEFT_DEFAULT_TARGETS",
    "all_linear_rules",
    "attention_mlp_rules",
    "attention_rules",
    "mlp_rules",
    "peft_rules",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "load_bert",
    "mean_pool",
    "params_from_hf",
    "params_to_hf",
    "peft_key_map",
    "save_hf",
]
