# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT PEANUT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_peanut_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_peanut_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(q|k)_proj|mlp/up_proj)/kernel",
                        then=adapters.peanut(4, depth=1, act_fn="gelu", scaling=2.0))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.peanut(2, depth=2, act_fn="silu"))],
}


def build(out):
    return _peftjax_golden.build(out, "peanut", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("peanut", RULES)
