# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT PVeRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_pvera_make.py`` loads them in PEFT and records the
output differences. The Llama's adapter is sized for larger matrices, so
``save_peft`` must slice pvera_A/pvera_B to the largest written widths. The
tests call :func:`build`.

Usage: ``PYTHONPATH=. .venv/bin/python scripts/golden/peft_pvera_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

_LLAMA = adapters.pvera(4, max_in=20, max_out=40, projection_seed=3)
_BERT = adapters.pvera(2, max_in=16, max_out=16)
RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|v)_proj/kernel", then=_LLAMA),
              tree.Rule(where="layers/mlp/up_proj/kernel", then=_LLAMA)],
    "bert": [tree.Rule(where="layers/.*/attention/(query|value)/kernel", then=_BERT)],
}


def build(out):
    return _peftjax_golden.build(out, "pvera", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("pvera", RULES)
