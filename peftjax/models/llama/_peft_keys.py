# SPDX-License-Identifier: Apache-2.0
"""The Hugging Face PEFT key map of the Llama family (declarative).

Every unrolled parameter path maps to its module in ``LlamaForCausalLM``
(``model.layers.{i}.self_attn.q_proj`` ...), the tensor name in that module
and its layout: kernels are ``nn.Linear`` weights (transposed), the token
table is an ``nn.Embedding`` (embedding LoRA), norms and biases are vectors.
Scanned states are split over ``layers/{i}`` by ``peftjax.io``.

Exports: ``peft_key_map``.
"""

from peftjax import io as pio
from peftjax.models.llama import _config, _export

_LAYOUT = {
    "kernel": ("weight", pio.TensorLayout.KERNEL),
    "embedding": ("weight", pio.TensorLayout.EMBEDDING),
    "scale": ("weight", pio.TensorLayout.VECTOR),
    "bias": ("bias", pio.TensorLayout.VECTOR),
}


def peft_key_map(cfg: _config.LlamaConfig) -> dict[str, pio.PeftKey]:
    """``{unrolled path: PeftKey}`` for ``peftjax.io.save_peft``/``load_peft``.

    Args:
      cfg: the config (layers, biases and the tied head decide the paths).

    Returns:
      The key map; a tied model has no ``lm_head`` entry (LoRA on the tied
      table goes through ``embed_tokens``, which the head shares).

    Example:
      >>> c = _config.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
      ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
      >>> k = peft_key_map(c)["layers/0/self_attn/q_proj/kernel"]
      >>> k.module, k.tensor, k.layout.value
      ('model.layers.0.self_attn.q_proj', 'weight', 'kernel')
    """
    out = {}
    for path, module in _export.hf_key_map(cfg).items():
        tensor, layout = _LAYOUT[path.rsplit("/", 1)[1]]
        out[path] = pio.PeftKey(module, tensor, layout)
    return out
