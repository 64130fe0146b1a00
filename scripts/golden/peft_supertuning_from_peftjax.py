# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT Super-Tuning adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``: the supports are
chosen from the base weights by ``adapters.supertuning``, every value and
LoRA factor NumPy-seeded); then ``scripts/golden/peft_supertuning_make.py``
loads them in PEFT and records the output differences. The Llama file is
Supra (``r=2``, smallest magnitudes), the BERT one Super. The tests call
:func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_supertuning_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(k|o)_proj|mlp/up_proj)/kernel",
                        then=adapters.supertuning(0.9, select_top=False, r=2,
                                                  lora_alpha=5.0))],
    "bert": [tree.Rule(where="layers/.*/(attention/key|intermediate)/kernel",
                       then=adapters.supertuning(0.95))],
}


def build(out):
    return _peftjax_golden.build(out, "supertuning", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("supertuning", RULES)
