# SPDX-License-Identifier: Apache-2.0
"""PEFT DEFT adapters and torch outputs for peftjax's DeFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: ``deft_P`` and
``deft_R`` perturbed by N(0, 0.3²), so the identity init no longer holds).
The Llama config is the default ``relu`` projector with ``alpha``; the BERT
one the orthogonal ``qr`` projector without ``alpha``. Files:
``tests/io/golden/peft_deft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_deft_make.py``
"""

import _peft_golden


def llama():
    from peft import DeftConfig

    return DeftConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import DeftConfig

    return DeftConfig(r=3, decomposition_method="qr", target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("deft", {"llama": llama, "bert": bert})
