# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT MiCA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``): ``inits.mica``'s
adapter initialised on the tiny models (frozen ``b`` from their weights),
``a`` perturbed; then ``scripts/golden/peft_mica_make.py`` loads them in PEFT
and records the output differences. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_mica_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import inits, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=inits.mica(3, alpha=6.0).adapter),
              tree.Rule(where="layers/mlp/up_proj/kernel", then=inits.mica(3, alpha=6.0).adapter)],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=inits.mica(2, alpha=4.0).adapter)],
}


def build(out):
    return _peftjax_golden.build(out, "mica", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("mica", RULES)
