# SPDX-License-Identifier: Apache-2.0
"""Flax NNX reference models, their loaders, tokenisers and offline fixtures.

Import explicitly (``import peftjax.models``): this imports flax, which
``import peftjax`` never does. Parameter paths of both layouts are documented
in ``peftjax/models/README.md``; models are used functionally through
``split_params`` / ``apply``::

    model = llama.load_llama(smollm2_gguf(), scan_layers=True)
    graphdef, params = split_params(model)
    logits = apply(graphdef, params, tokens, attention_mask=mask)

``Hooks`` (with ``Site`` and ``compose_hooks``) is the models' one extension
point for per-token computation inside the layers (aLoRA, routed LoRA
mixtures, LLaMA-Adapter): pass ``hooks=`` to a model call, ``decode`` or
``llama.generate``.

``replicate_layers`` makes the deeper tree and config of PEFT's
``layer_replication`` (repeated layers share the base arrays).

``load_tokenizer`` and ``load_chat_template`` read a checkpoint's tokeniser
and stored chat template (for ``peftjax.data.chat_format``).
"""

from peftjax.models import bert as bert
from peftjax.models import llama as llama
from peftjax.models._chat_template import ChatTemplate as ChatTemplate
from peftjax.models._chat_template import chat_template_from_gguf as chat_template_from_gguf
from peftjax.models._chat_template import load_chat_template as load_chat_template
from peftjax.models._fixtures import minilm_dir as minilm_dir
from peftjax.models._fixtures import shakespeare_texts as shakespeare_texts
from peftjax.models._fixtures import smollm2_gguf as smollm2_gguf
from peftjax.models._functional import apply as apply
from peftjax.models._functional import param_shapes as param_shapes
from peftjax.models._functional import rebuild as rebuild
from peftjax.models._functional import split_params as split_params
from peftjax.models._hooks import Hooks as Hooks
from peftjax.models._hooks import Site as Site
from peftjax.models._hooks import compose_hooks as compose_hooks
from peftjax.models._replicate import replicate_layers as replicate_layers
from peftjax.models._replicate import replicated_layer_index as replicated_layer_index
from peftjax.models._tokenizers import load_tokenizer as load_tokenizer
from peftjax.models._tokenizers import tokenizer_from_gguf as tokenizer_from_gguf

__all__ = [
    "ChatTemplate",
    "Hooks",
    "Site",
    "apply",
    "bert",
    "chat_template_from_gguf",
    "compose_hooks",
    "llama",
    "load_chat_template",
    "load_tokenizer",
    "minilm_dir",
    "param_shapes",
    "rebuild",
    "replicate_layers",
    "replicated_layer_index",
    "shakespeare_texts",
    "smollm2_gguf",
    "split_params",
    "tokenizer_from_gguf",
]
