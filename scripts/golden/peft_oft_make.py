# SPDX-License-Identifier: Apache-2.0
"""PEFT OFT adapters and torch outputs for peftjax's OFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``oft_R.weight``
perturbed by N(0, 0.3²), so no rotation is the identity). The Llama config
uses PEFT's default Cayley-Neumann series with blocks of 4; the BERT one the
exact Cayley transform with COFT and ``oft_block_size=7``, which divides no
module: PEFT moves it to 8 on the 16-wide inputs and to 6 on the 24-wide
``output.dense`` (the lower divisor on a tie). Files:
``tests/io/golden/peft_oft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_oft_make.py``
"""

import _peft_golden


def llama():
    from peft import OFTConfig

    return OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import OFTConfig

    return OFTConfig(oft_block_size=7, use_cayley_neumann=False, coft=True, eps=0.5,
                     target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("oft", {"llama": llama, "bert": bert})
