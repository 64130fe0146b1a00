# SPDX-License-Identifier: Apache-2.0
"""PEFT PEANUT adapters and torch outputs for peftjax's PEANUT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``peanut_A``,
``peanut_B`` and encoder/decoder weight perturbed by N(0, 0.3²), so
``peanut_B`` is no longer zero). The Llama config has two encoder/decoder
pairs, ``relu`` and ``scaling=0.5``; the BERT one a single pair and ``tanh``.
Files: ``tests/io/golden/peft_peanut/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_peanut_make.py``
"""

import _peft_golden


def llama():
    from peft import PeanutConfig

    return PeanutConfig(r=4, depth=2, act_fn="relu", scaling=0.5,
                        target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import PeanutConfig

    return PeanutConfig(r=2, depth=1, act_fn="tanh", target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("peanut", {"llama": llama, "bert": bert})
