# SPDX-License-Identifier: Apache-2.0
"""PEFT GLoRA adapters and torch outputs for peftjax's GLoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every GLoRA path
perturbed by N(0, 0.3²), so no path stays at its zero init). The Llama
config is PEFT's default (LoRA ``A``/``B``; the projections have no bias, so
PEFT leaves ``C``, ``D``, ``E`` empty); the BERT one has vector ``A``/``B``,
a rank-2 lora ``C`` and vector ``D``/``E`` on the biased query/value/dense
layers (the peftjax-written files use constant ``A``/``B``/``D``/``E`` and a
vector ``C``: every path kind is read by PEFT or peftjax).
Files: ``tests/io/golden/peft_glora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_glora_make.py``
"""

import _peft_golden


def llama():
    from peft import GloraConfig

    return GloraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import GloraConfig

    return GloraConfig(r=2, config_A_B="vector", config_C="lora", config_D_E="vector",
                       target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("glora", {"llama": llama, "bert": bert})
