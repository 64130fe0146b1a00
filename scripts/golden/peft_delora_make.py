# SPDX-License-Identifier: Apache-2.0
"""PEFT DeLoRA adapters and torch outputs for peftjax's DeLoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``delora_A``,
``delora_B`` and ``delora_lambda`` perturbed by N(0, 0.3²), so ``delora_B``
is no longer zero; the frozen ``delora_w_norm`` buffers are PEFT's, computed
from the base). The Llama config has rank and lambda patterns; the BERT one
adapts the attention and every dense layer. Files:
``tests/io/golden/peft_delora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_delora_make.py``
"""

import _peft_golden


def llama():
    from peft import DeloraConfig

    return DeloraConfig(r=4, delora_lambda=2, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, lambda_pattern={"v_proj": 3})


def bert():
    from peft import DeloraConfig

    return DeloraConfig(r=2, delora_lambda=1, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("delora", {"llama": llama, "bert": bert})
