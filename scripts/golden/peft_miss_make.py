# SPDX-License-Identifier: Apache-2.0
"""PEFT MiSS adapters and torch outputs for peftjax's MiSS tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``miss_block``
perturbed by N(0, 0.3²) away from its zero init). The Llama config is the
default balance variant with ``r=3``, which divides none of the adapted input
sizes (16, 32), so PEFT's remainder path is in the file; the BERT one is the
``bat`` variant (block-affine in the base weight) over the attention and both
dense layers. PEFT's ``mini`` file has its own directory
(``peft_miss_mini_make.py``). Files: ``tests/io/golden/peft_miss/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_miss_make.py``
"""

import _peft_golden


def llama():
    from peft import MissConfig

    return MissConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import MissConfig

    return MissConfig(r=4, init_weights="bat", target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("miss", {"llama": llama, "bert": bert})
