# SPDX-License-Identifier: Apache-2.0
"""PEFT AdaMSS adapters and torch outputs for peftjax's AdaMSS tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``adamss_A``/
``adamss_B`` perturbed by N(0, 0.3²), so ``B`` is no longer zero). PEFT's
init clusters the SVD with scikit-learn (install it in the side virtualenv
only). The Llama config truncates the SVD below every module's output size
(``r=6``; PEFT's default ``subspace_rank=1``), where PEFT's k-means groups
are reproducible from the saved ``adamss_newB`` and the base weight. The
BERT file's Linear layers have biases, which PEFT appends to ``W`` before the
SVD (peftjax loads it with ``bias=True``).

Usage: ``.venv-torch/bin/python scripts/golden/peft_adamss_make.py``
"""

import _peft_golden


def llama():
    from peft import AdamssConfig

    return AdamssConfig(r=6, num_subspaces=4,
                        target_modules=["q_proj", "v_proj", "up_proj"])


def bert():
    from peft import AdamssConfig

    return AdamssConfig(r=6, num_subspaces=3, target_modules=["query", "value"])


if __name__ == "__main__":
    _peft_golden.run("adamss", {"llama": llama, "bert": bert})
