# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT BEFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_beft_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. BERT only: the tiny
Llama's projections have no bias leaf for BEFT's shift.

Usage: ``.venv/bin/python scripts/golden/peft_beft_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "bert": [tree.Rule(where="layers/.*/attention/(query|value)/kernel",
                       then=adapters.beft())],
}


def build(out):
    return _peftjax_golden.build(out, "beft", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("beft", RULES)
