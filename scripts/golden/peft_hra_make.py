# SPDX-License-Identifier: Apache-2.0
"""PEFT HRA adapters and torch outputs for peftjax's HRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``hra_u``
perturbed by N(0, 0.3²), so the paired columns of PEFT's init no longer
cancel). The Llama config chains four plain reflections; the BERT one uses
the Gram-Schmidt variant (``apply_GS``). Files: ``tests/io/golden/peft_hra/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_hra_make.py``
"""

import _peft_golden


def llama():
    from peft import HRAConfig

    return HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import HRAConfig

    return HRAConfig(r=2, apply_GS=True, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("hra", {"llama": llama, "bert": bert})
