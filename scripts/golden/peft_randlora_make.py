# SPDX-License-Identifier: Apache-2.0
"""PEFT RandLoRA adapters and torch outputs for peftjax's RandLoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every
``randlora_lambda`` and ``randlora_gamma`` perturbed by N(0, 0.3²), so lambda
is no longer zero and a wrong pairing of bases and diagonals cannot hide
behind the identity). The Llama config adapts modules of every orientation
(in < out: up_proj, in = out: q_proj, in > out: v_proj, down_proj), so the
shared bases are larger than any one module's slice; the BERT one uses
PEFT's sparse bases and a rank that does not divide the width (16 = 6·3 - 2).
PEFT saves the bases (``save_projection=True``, its default), once and per
module. Files: ``tests/io/golden/peft_randlora/``.

Usage: ``cd scripts/golden && ../../.venv-torch/bin/python peft_randlora_make.py``
"""

import _peft_golden


def llama():
    from peft import RandLoraConfig

    return RandLoraConfig(r=4, randlora_alpha=2, projection_prng_key=7,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def bert():
    from peft import RandLoraConfig

    return RandLoraConfig(r=3, randlora_alpha=3, sparse=True,
                          target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("randlora", {"llama": llama, "bert": bert})
