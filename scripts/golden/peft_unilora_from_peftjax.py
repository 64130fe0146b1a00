# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT UniLoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_unilora_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. ``theta_d`` is
NumPy-seeded; the index assignment is peftjax's (path order), written with
``save_indices=True`` so PEFT uses it.

Usage: ``PYTHONPATH=. .venv/bin/python scripts/golden/peft_unilora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(k|o)_proj|mlp/up_proj)/kernel",
                        then=adapters.unilora(2, theta_d_length=50, proj_seed=3))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.unilora(3, theta_d_length=21))],
}


def build(out):
    return _peftjax_golden.build(out, "unilora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("unilora", RULES)
