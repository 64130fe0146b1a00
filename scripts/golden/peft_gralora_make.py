# SPDX-License-Identifier: Apache-2.0
"""PEFT GraLoRA adapters and torch outputs for peftjax's GraLoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``gralora_*``
tensor perturbed by N(0, 0.3²), so the zero-initialised ``gralora_B`` blocks
are not zero and a wrong block order, transpose or scale cannot hide behind
the identity). The Llama config is hybrid GraLoRA (``gralora_k=2``,
``hybrid_r=2``); the BERT one a ``4 × 4`` grid over the attention and both
dense layers. Files: ``tests/io/golden/peft_gralora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_gralora_make.py``
"""

import _peft_golden


def llama():
    from peft import GraloraConfig

    return GraloraConfig(r=4, alpha=6, gralora_k=2, hybrid_r=2,
                         target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import GraloraConfig

    return GraloraConfig(r=8, alpha=16, gralora_k=4,
                         target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("gralora", {"llama": llama, "bert": bert})
