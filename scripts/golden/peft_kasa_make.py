# SPDX-License-Identifier: Apache-2.0
"""PEFT KaSA adapters and torch outputs for peftjax's KaSA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: ``lora_A``,
``lora_B`` and ``lora_diag`` perturbed). KaSA is PEFT's LoRA variant
``LoraConfig(kasa_config=KasaConfig(...))``: get_peft_model truncates the
base weights (drops their ``r`` smallest singular components), so the torch
outputs are those of the truncated base plus ``B·diag(ΔΣ)·A``. The Llama
config adapts attention and MLP (a rank pattern on ``k_proj``), the BERT one
uses rsLoRA scaling. Files: ``tests/io/golden/peft_kasa/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_kasa_make.py``
"""

import _peft_golden


def llama():
    from peft import LoraConfig
    from peft.tuners.lora import KasaConfig

    return LoraConfig(r=4, lora_alpha=8, rank_pattern={"k_proj": 2},
                      target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                      kasa_config=KasaConfig(beta=2e-4, gamma=5e-3))


def bert():
    from peft import LoraConfig
    from peft.tuners.lora import KasaConfig

    return LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                      target_modules=["query", "value", "attention.output.dense"],
                      kasa_config=KasaConfig())


if __name__ == "__main__":
    _peft_golden.run("kasa", {"llama": llama, "bert": bert})
