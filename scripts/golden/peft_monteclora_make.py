# SPDX-License-Identifier: Apache-2.0
"""PEFT MonteCLoRA adapters and eval-mode torch outputs for peftjax's tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every trainable
tensor perturbed, the sampler's ``std_prior`` and ``expert_weights_prior``
included). The outputs are PEFT's eval mode (``.eval()``: no sampling, the
plain LoRA of ``lora_A``/``lora_B``); training-mode sampling is checked in
peftjax's tests by its distribution. Files: ``tests/io/golden/peft_monteclora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_monteclora_make.py``
"""

import _peft_golden


def llama():
    from peft import LoraConfig
    from peft.tuners.lora.config import MontecloraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      monteclora_config=MontecloraConfig(num_samples=4, buffer_size=2))


def bert():
    from peft import LoraConfig
    from peft.tuners.lora.config import MontecloraConfig

    return LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                      monteclora_config=MontecloraConfig(num_samples=3, buffer_size=2,
                                                         use_entropy=True,
                                                         sample_scaler=3e-4))


if __name__ == "__main__":
    _peft_golden.run("monteclora", {"llama": llama, "bert": bert})
