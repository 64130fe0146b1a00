# SPDX-License-Identifier: Apache-2.0
"""PEFT MiCA adapters (``init_lora_weights="mica"``) and torch outputs, both ways.

Runs once in the side virtualenv (``_peft_golden.run``: PEFT's own
``mica_init`` on the committed weights, then every *trainable* tensor, i.e.
``lora_A``, perturbed by N(0, 0.3²); ``lora_B`` stays the frozen minor
singular directions). Files: ``tests/io/golden/peft_mica/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_mica_make.py``
"""

import _peft_golden


def llama():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, init_lora_weights="mica",
                      target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=6, init_lora_weights="mica",
                      target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("mica", {"llama": llama, "bert": bert})
