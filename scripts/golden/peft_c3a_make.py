# SPDX-License-Identifier: Apache-2.0
"""PEFT C3A adapters and torch outputs for peftjax's C3A tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``c3a_kernel``
gets N(0, 1) added to PEFT's xavier-uniform draw, so the files are neither
PEFT's init nor small next to the ``1/in`` scale). The Llama config has a
``block_size_pattern`` (block 4 on ``down_proj``, 8 elsewhere); the BERT one
adapts the attention and every dense layer with block 8 (the gcd of 16 and
24). Files: ``tests/io/golden/peft_c3a/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_c3a_make.py``
"""

import _peft_golden


def llama():
    from peft import C3AConfig

    return C3AConfig(block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     block_size_pattern={"down_proj": 4})


def bert():
    from peft import C3AConfig

    return C3AConfig(block_size=8, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("c3a", {"llama": llama, "bert": bert}, scale=1.0)
