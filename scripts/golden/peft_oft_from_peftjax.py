# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT OFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_oft_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. The Llama adapter shares
one exact-Cayley block per matrix (``block_share``); the BERT one is COFT
(written projected) with PEFT's default Neumann series.

Usage: ``.venv/bin/python scripts/golden/peft_oft_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.oft(4, block_share=True, use_cayley_neumann=False))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.oft(r=2, coft=True, eps=0.5))],
}


def build(out):
    return _peftjax_golden.build(out, "oft", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("oft", RULES)
