# SPDX-License-Identifier: Apache-2.0
"""PEFT BEFT adapters and torch outputs for peftjax's BEFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``beft_bias``
perturbed by N(0, 0.3²), so it is no longer zero). The Llama config targets
the biasless q/v projections (PEFT adds the vector in the forward and cannot
merge it, so no merged outputs are recorded; peftjax refuses the file, naming
the path); the BERT one the attention's value and every dense layer. Files:
``tests/io/golden/peft_beft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_beft_make.py``
"""

import _peft_golden


def llama():
    from peft import BeftConfig

    return BeftConfig(target_modules=["q_proj", "v_proj"])


def bert():
    from peft import BeftConfig

    return BeftConfig(target_modules=["value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("beft", {"llama": llama, "bert": bert}, merge=False)
