# SPDX-License-Identifier: Apache-2.0
"""PEFT SHiRA adapters and torch outputs for peftjax's SHiRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every
``shira_weight`` perturbed by N(0, 0.3²) away from PEFT's zero init). The
Llama config has ``r=2`` and ``random_seed=13`` on the q/v/down projections;
the BERT one ``r=1`` and PEFT's default ``random_seed=None`` (torch's default
generator seed) on query/value and every dense layer. PEFT saves each mask as
``shira_indices``; the tests check peftjax regenerates the same ones. Files:
``tests/io/golden/peft_shira/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_shira_make.py``
"""

import _peft_golden


def llama():
    from peft import ShiraConfig

    return ShiraConfig(r=2, random_seed=13, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import ShiraConfig

    return ShiraConfig(r=1, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("shira", {"llama": llama, "bert": bert})
