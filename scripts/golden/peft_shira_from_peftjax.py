# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT SHiRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``; the masks are PEFT's
random masks, which ``adapters.shira`` reproduces from the seed); then
``scripts/golden/peft_shira_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_shira_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(k|o)_proj|mlp/up_proj)/kernel",
                        then=adapters.shira(2, random_seed=2024))],
    "bert": [tree.Rule(where="layers/.*/(attention/key|intermediate)/kernel",
                       then=adapters.shira(1, random_seed=5))],
}


def build(out):
    return _peftjax_golden.build(out, "shira", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("shira", RULES)
