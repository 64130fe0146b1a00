# SPDX-License-Identifier: Apache-2.0
"""PEFT UniLoRA adapters and torch outputs for peftjax's UniLoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: the one trainable
``unilora_theta_d`` perturbed by N(0, 0.3²)). PEFT's default
``save_indices=False``: the files hold ``theta_d`` only and the index
assignment is regenerated from ``proj_seed`` over the modules in the torch
model's module order, which the reader must reproduce. The Llama config
adapts attention and MLP projections, the BERT one the attention and both
dense layers. Files: ``tests/io/golden/peft_unilora/``.

Usage: ``cd scripts/golden && ../../.venv-torch/bin/python peft_unilora_make.py``
"""

import _peft_golden


def llama():
    from peft import UniLoraConfig

    return UniLoraConfig(r=2, theta_d_length=40, proj_seed=11,
                         target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])


def bert():
    from peft import UniLoraConfig

    return UniLoraConfig(r=3, theta_d_length=33, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("unilora", {"llama": llama, "bert": bert})
