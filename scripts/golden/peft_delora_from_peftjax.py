# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT DeLoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_delora_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_delora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.delora(4, delora_lambda=2.0)),
              tree.Rule(where="layers/mlp/up_proj/kernel",
                        then=adapters.delora(2, delora_lambda=3.0))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.delora(2, delora_lambda=1.0))],
}


def build(out):
    return _peftjax_golden.build(out, "delora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("delora", RULES)
