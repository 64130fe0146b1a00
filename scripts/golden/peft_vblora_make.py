# SPDX-License-Identifier: Apache-2.0
"""PEFT VB-LoRA adapters and torch outputs for peftjax's VB-LoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every trainable
tensor, the logits of each module and the one shared ``vblora_vector_bank``,
perturbed by N(0, 0.3²), so the top-k picks and the bank are far from their
init). The Llama config adapts attention and MLP projections with a bank of 6
vectors of length 8; the BERT one the attention and both dense layers with
top-3 and ``save_only_topk_weights`` (PEFT then stores the top-k indices and
weights instead of the logits: the inference-only file). Files:
``tests/io/golden/peft_vblora/``.

Usage: ``cd scripts/golden && ../../.venv-torch/bin/python peft_vblora_make.py``
"""

import _peft_golden


def llama():
    from peft import VBLoRAConfig

    return VBLoRAConfig(r=2, num_vectors=6, vector_length=8, topk=2,
                        target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import VBLoRAConfig

    return VBLoRAConfig(r=3, num_vectors=5, vector_length=8, topk=3,
                        target_modules=["query", "value", "dense"],
                        save_only_topk_weights=True)


if __name__ == "__main__":
    _peft_golden.run("vblora", {"llama": llama, "bert": bert})
