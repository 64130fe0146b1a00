# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT RandLoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_randlora_make.py`` loads them in PEFT and records the
output differences. The Llama's adapter is sized for 40-wide matrices, so
``save_peft`` must slice the shared bases to the shapes PEFT computes from
the written modules (A (4, 1, 16), B (32, 4, 4)). The tests call
:func:`build`.

Usage: ``PYTHONPATH=. .venv/bin/python scripts/golden/peft_randlora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

_LLAMA = adapters.randlora(4, max_in=40, max_out=40, alpha=4.0, projection_seed=5)
_BERT = adapters.randlora(3, max_in=16, max_out=16, alpha=3.0,
                          bases=adapters.RandLoRABases.SPARSE)
RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel", then=_LLAMA),
              tree.Rule(where="layers/mlp/gate_proj/kernel", then=_LLAMA)],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel", then=_BERT)],
}


def build(out):
    return _peftjax_golden.build(out, "randlora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("randlora", RULES)
