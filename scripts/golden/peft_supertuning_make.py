# SPDX-License-Identifier: Apache-2.0
"""PEFT Super-Tuning adapters and torch outputs for peftjax's tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every trainable
tensor perturbed by N(0, 0.3²) away from PEFT's zero init). The Llama
config is Supra (``sparsity=0.9``, ``r=2``, ``lora_alpha=6``) on the q/v/down
projections; the BERT one Super with the smallest magnitudes
(``sparsity=0.95``, ``select_top=False``) on query/value and every dense
layer. PEFT saves each support as ``supertuning_indices``; the tests check
peftjax selects the same ones from the base weights. Files:
``tests/io/golden/peft_supertuning/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_supertuning_make.py``
"""

import _peft_golden


def llama():
    from peft import SupertuningConfig

    return SupertuningConfig(sparsity=0.9, r=2, lora_alpha=6,
                             target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import SupertuningConfig

    return SupertuningConfig(sparsity=0.95, select_top=False,
                             target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("supertuning", {"llama": llama, "bert": bert})
