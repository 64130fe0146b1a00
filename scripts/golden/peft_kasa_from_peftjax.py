# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT KaSA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_kasa_make.py`` loads them in PEFT (which truncates the
base weights again from the original model) and records the output
differences. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_kasa_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(q|k)_proj|mlp/up_proj)/kernel",
                        then=adapters.kasa(2, alpha=6.0, beta=3e-4, gamma=2e-3))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.kasa(3, alpha=4.0))],
}


def build(out):
    return _peftjax_golden.build(out, "kasa", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("kasa", RULES)
