# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT FourierFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_fourierft_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. Each model's rules use
two ``n_frequency`` values (so the file needs an ``n_frequency_pattern``)
and one ``scaling`` and ``random_loc_seed``, as one PEFT config has.

Usage: ``.venv/bin/python scripts/golden/peft_fourierft_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/k_proj/kernel",
                        then=adapters.fourierft(12, scaling=12.5, random_loc_seed=2024)),
              tree.Rule(where="layers/(self_attn/o_proj|mlp/up_proj)/kernel",
                        then=adapters.fourierft(30, scaling=12.5, random_loc_seed=2024))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|value)/kernel",
                       then=adapters.fourierft(10, scaling=40.0, random_loc_seed=3)),
             tree.Rule(where="layers/.*/output/kernel",
                       then=adapters.fourierft(20, scaling=40.0, random_loc_seed=3))],
}


def build(out):
    return _peftjax_golden.build(out, "fourierft", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("fourierft", RULES)
