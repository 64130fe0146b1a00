# SPDX-License-Identifier: Apache-2.0
"""PEFT LoHa adapters and torch outputs for peftjax's LoHa tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``hada_*``
tensor perturbed by N(0, 0.3²), so ``hada_w2_b`` is no longer zero and a
wrong transpose, pairing or scaling cannot hide behind the identity). The
Llama config has rank and alpha patterns; the BERT one adapts the attention
and both dense layers. Files: ``tests/io/golden/peft_loha/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_loha_make.py``
"""

import _peft_golden


def llama():
    from peft import LoHaConfig

    return LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 6})


def bert():
    from peft import LoHaConfig

    return LoHaConfig(r=2, alpha=3, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("loha", {"llama": llama, "bert": bert})
