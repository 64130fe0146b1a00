# SPDX-License-Identifier: Apache-2.0
"""PEFT PSOFT adapters and torch outputs for peftjax's PSOFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every trainable
tensor, the Cayley generator and both scaling vectors, perturbed by N(0,
0.3²), so ``R`` is far from the identity). PEFT saves only ``R``'s
parameters and recomputes ``A``/``B`` from the base weight by torch's SVD,
whose singular-vector signs peftjax's SVD must agree with: the targets are
modules where they do (square and ``out >= 2·in`` weights of the tiny
models; see ``peftjax/io/_peft_psoft.py``). The Llama config is strict PSOFT
(exact Cayley) with both scales; the BERT one ``pissa_init`` with the
Cayley-Neumann series, a Frobenius bound and only ``mag_b``. Files:
``tests/io/golden/peft_psoft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_psoft_make.py``
"""

import _peft_golden


def llama():
    from peft import PsoftConfig

    return PsoftConfig(r=4, psoft_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj"])


def bert():
    from peft import PsoftConfig

    return PsoftConfig(r=3, psoft_alpha=6, ab_svd_init="pissa_init", psoft_mag_a=False,
                       use_cayley_neumann=True, num_cayley_neumann_terms=4,
                       cayley_neumann_eps=0.9,
                       target_modules=["query", "value", "attention.output.dense"])


if __name__ == "__main__":
    _peft_golden.run("psoft", {"llama": llama, "bert": bert})
