# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT WaveFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_waveft_make.py`` loads them in PEFT and records the
output differences. The Llama adapter uses ``db3`` with two coefficient
counts (so ``save_peft`` writes an ``n_frequency_pattern``); the BERT one
``use_idwt=False`` (PEFT's direct sparse update). The tests call
:func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_waveft_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.waveft(12, scaling=5.0, wavelet_family="db3",
                                             random_loc_seed=3)),
              tree.Rule(where="layers/mlp/up_proj/kernel",
                        then=adapters.waveft(30, scaling=5.0, wavelet_family="db3",
                                             random_loc_seed=3))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.waveft(16, scaling=8.0, use_idwt=False))],
}


def build(out):
    return _peftjax_golden.build(out, "waveft", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("waveft", RULES)
