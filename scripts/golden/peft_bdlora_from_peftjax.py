# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT BD-LoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_bdlora_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. The BERT file mixes
BD-LoRA and plain LoRA (written with ``match_strict=False``).

Usage: ``.venv/bin/python scripts/golden/peft_bdlora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.bdlora(4, nblocks=2, block_diagonal="b", alpha=6.0)),
              tree.Rule(where="layers/self_attn/o_proj/kernel",
                        then=adapters.bdlora(2, nblocks=2, block_diagonal="a", alpha=6.0))],
    "bert": [tree.Rule(where="layers/.*/attention/query/kernel",
                       then=adapters.bdlora(2, nblocks=2, block_diagonal="b", alpha=4.0)),
             tree.Rule(where="layers/.*/attention/value/kernel",
                       then=adapters.lora(2, alpha=4.0))],
}


def build(out):
    return _peftjax_golden.build(out, "bdlora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("bdlora", RULES)
