# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT C3A adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_c3a_make.py`` loads them in PEFT and records the
output differences. Two block sizes on the Llama (so ``save_peft`` writes a
``block_size_pattern``). The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_c3a_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.c3a(8)),
              tree.Rule(where="layers/mlp/up_proj/kernel",
                        then=adapters.c3a(4))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.c3a(8))],
}


def build(out):
    return _peftjax_golden.build(out, "c3a", RULES, scale=1.0)


if __name__ == "__main__":
    _peftjax_golden.main("c3a", RULES, scale=1.0)
