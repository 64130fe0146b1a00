# SPDX-License-Identifier: Apache-2.0
"""PEFT BD-LoRA adapters and torch outputs for peftjax's BD-LoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every LoRA tensor,
block-diagonal or dense, perturbed). The Llama config makes ``A``
block-diagonal on ``o_proj``/``down_proj`` (row-sharded) and ``B`` on
``q_proj``/``up_proj`` (column-sharded), two blocks; the BERT one mixes
BD-LoRA and plain LoRA (``match_strict=False``: ``key`` stays plain).
Files: ``tests/io/golden/peft_bdlora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_bdlora_make.py``
"""

import _peft_golden


def llama():
    from peft import LoraConfig
    from peft.tuners.lora import BdLoraConfig

    return LoraConfig(r=4, lora_alpha=8,
                      target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                      use_bdlora=BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"],
                                              target_modules_bd_b=["q_proj", "up_proj"],
                                              nblocks=2))


def bert():
    from peft import LoraConfig
    from peft.tuners.lora import BdLoraConfig

    return LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                      target_modules=["query", "key", "attention.output.dense"],
                      use_bdlora=BdLoraConfig(target_modules_bd_a=["output.dense"],
                                              target_modules_bd_b=["query"], nblocks=4,
                                              match_strict=False))


if __name__ == "__main__":
    _peft_golden.run("bdlora", {"llama": llama, "bert": bert})
