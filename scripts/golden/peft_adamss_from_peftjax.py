# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT AdaMSS adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_adamss_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. Only the Llama's
``in < out`` MLP projections (16 -> 32) with ``rank >= in``: there PEFT's SVD
is exact and its k-means groups are the ones peftjax computed (``save_peft``
refuses other shapes).

Usage: ``.venv/bin/python scripts/golden/peft_adamss_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/mlp/(gate|up)_proj/kernel",
                        then=adapters.adamss(16, num_subspaces=4, subspace_rank=2))],
}


def build(out):
    return _peftjax_golden.build(out, "adamss", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("adamss", RULES)
