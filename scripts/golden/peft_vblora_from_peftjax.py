# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT VB-LoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_vblora_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. Every trainable value, the
one shared bank included, is NumPy-seeded.

Usage: ``PYTHONPATH=. .venv/bin/python scripts/golden/peft_vblora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

_LLAMA = adapters.vblora(2, num_vectors=4, vector_length=8, topk=2)
RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(k|o)_proj|mlp/up_proj)/kernel",
                        then=_LLAMA)],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.vblora(3, num_vectors=6, vector_length=4, topk=3))],
}


def build(out):
    return _peftjax_golden.build(out, "vblora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("vblora", RULES)
