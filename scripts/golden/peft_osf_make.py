# SPDX-License-Identifier: Apache-2.0
"""PEFT OSF adapters and torch outputs for peftjax's OSF tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``U_low``,
``S_low`` and ``V_low`` perturbed by N(0, 0.3²), so nothing is at its SVD
init). PEFT's files hold only these trainable factors: the frozen initial
factors and the preserved bases are non-persistent buffers, recomputed from
the base weight's SVD when the file is loaded (in torch here, in JAX by
peftjax). The Llama config keeps PEFT's default preserved rank (half of
``min(in, out)``); the BERT one a fraction (0.25) with a ``rank_pattern``
override on ``intermediate.dense``. Files: ``tests/io/golden/peft_osf/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_osf_make.py``
"""

import _peft_golden


def llama():
    from peft import OSFConfig

    return OSFConfig(target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import OSFConfig

    return OSFConfig(effective_rank=0.25, rank_pattern={"intermediate.dense": 6},
                     target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("osf", {"llama": llama, "bert": bert})
