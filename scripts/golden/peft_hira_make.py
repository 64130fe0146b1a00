# SPDX-License-Identifier: Apache-2.0
"""PEFT HiRA adapters and torch outputs for peftjax's HiRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``hira_A`` and
``hira_B`` perturbed by N(0, 0.3²), so ``hira_B`` is no longer zero and a
wrong transpose or a missing Hadamard factor cannot hide behind the
identity). The Llama config has a rank pattern, which PEFT 0.21.2 ignores
(every HiRA module gets ``r``: the loader must accept that); the BERT one
adapts the attention and every dense layer. Files: ``tests/io/golden/peft_hira/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_hira_make.py``
"""

import _peft_golden


def llama():
    from peft import HiraConfig

    return HiraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 2})


def bert():
    from peft import HiraConfig

    return HiraConfig(r=2, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("hira", {"llama": llama, "bert": bert})
