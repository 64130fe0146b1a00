# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT LoKr adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_lokr_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`.

* Llama (scanned): ``lokr(rank=1, alpha=3, decompose_both=True)`` on o/up
  (every factor a rank-1 product) and ``lokr(rank=8, alpha=4)`` on k (both
  factors full: written at a rank that keeps them full in PEFT with
  ``alpha = s·r``);
* BERT: ``decompose_factor=2`` at two ranks and alphas (query/key at rank 2,
  the intermediate dense at rank 1), so the file needs rank and alpha
  patterns.

Usage: ``.venv/bin/python scripts/golden/peft_lokr_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/o_proj|mlp/up_proj)/kernel",
                        then=adapters.lokr(1, alpha=3.0, decompose_both=True)),
              tree.Rule(where="layers/self_attn/k_proj/kernel",
                        then=adapters.lokr(8, alpha=4.0))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.lokr(2, alpha=5.0, decompose_factor=2)),
             tree.Rule(where="layers/.*/intermediate/kernel",
                       then=adapters.lokr(1, alpha=2.0, decompose_factor=2))],
}


def build(out):
    return _peftjax_golden.build(out, "lokr", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("lokr", RULES)
