# SPDX-License-Identifier: Apache-2.0
"""Format-level I/O: safetensors and GGUF readers, checkpoints, PEFT format.

Nothing here knows peftjax's models (docs/architecture.md#layers).
"""

from peftjax.io._gguf import GGUFFile as GGUFFile
from peftjax.io._gguf import read_gguf as read_gguf
from peftjax.io._gguf import read_gguf_metadata as read_gguf_metadata
from peftjax.io._json import read_json as read_json
from peftjax.io._peft_adaption_prompt import (
    load_peft_adaption_prompt as load_peft_adaption_prompt,
)
from peftjax.io._peft_adaption_prompt import (
    save_peft_adaption_prompt as save_peft_adaption_prompt,
)
from peftjax.io._peft_arrow import load_arrow as load_arrow
from peftjax.io._peft_keys import PeftKey as PeftKey
from peftjax.io._peft_keys import TensorLayout as TensorLayout
from peftjax.io._peft_poly import load_peft_poly as load_peft_poly
from peftjax.io._peft_poly import save_peft_poly as save_peft_poly
from peftjax.io._peft_prompt import PeftPrompt as PeftPrompt
from peftjax.io._peft_prompt import load_peft_prompt as load_peft_prompt
from peftjax.io._peft_prompt import save_peft_prompt as save_peft_prompt
from peftjax.io._peft_read import PeftAdapter as PeftAdapter
from peftjax.io._peft_read import load_peft as load_peft
from peftjax.io._peft_targets import peft_target_modules as peft_target_modules
from peftjax.io._peft_targets import peft_target_rules as peft_target_rules
from peftjax.io._peft_write import save_peft as save_peft
from peftjax.io._peft_xlora import load_peft_xlora as load_peft_xlora
from peftjax.io._peft_xlora import save_peft_xlora as save_peft_xlora
from peftjax.io._safetensors import read_safetensors as read_safetensors
from peftjax.io._safetensors import read_safetensors_index as read_safetensors_index
from peftjax.io._safetensors import write_safetensors as write_safetensors


def __getattr__(name: str):
    # The orbax-based checkpoint module loads on first use (orbax is heavy).
    if name == "checkpoint":
        import importlib

        return importlib.import_module("peftjax.io.checkpoint")
    raise AttributeError(f"module 'peftjax.io' has no attribute {name!r}")


__all__ = [
    "GGUFFile",
    "PeftAdapter",
    "PeftKey",
    "PeftPrompt",
    "TensorLayout",
    "checkpoint",
    "load_arrow",
    "load_peft",
    "load_peft_adaption_prompt",
    "load_peft_poly",
    "load_peft_prompt",
    "load_peft_xlora",
    "peft_target_modules",
    "peft_target_rules",
    "read_gguf",
    "read_gguf_metadata",
    "read_json",
    "read_safetensors",
    "read_safetensors_index",
    "save_peft",
    "save_peft_adaption_prompt",
    "save_peft_poly",
    "save_peft_prompt",
    "save_peft_xlora",
    "write_safetensors",
]
