# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT MiSS adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_miss_make.py`` loads them in PEFT and records the
output differences. Balance (``r=5``: a remainder shard) on the Llama, mini
(``mini_r=4``) on BERT; the bat tensor is PEFT's shard as stored, read in the
other direction (``peft_miss_make.py``). The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_miss_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(q|k)_proj|mlp/up_proj)/kernel",
                        then=adapters.miss(5))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.miss(2, variant=adapters.MiSSVariant.MINI,
                                          mini_r=4))],
}


def build(out):
    return _peftjax_golden.build(out, "miss", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("miss", RULES)
