# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT OSF adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_osf_make.py`` loads them in PEFT (which recomputes the
frozen factors from its own SVD of the base) and records the output
differences. The tests call :func:`build`. The Llama adapter preserves 4
directions of ``q_proj`` and half of ``k_proj`` (written as ``effective_rank``
plus a ``rank_pattern``); the BERT one PEFT's default rank.

Usage: ``.venv/bin/python scripts/golden/peft_osf_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/q_proj/kernel", then=adapters.osf(4)),
              tree.Rule(where="layers/self_attn/k_proj/kernel", then=adapters.osf(0.5))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.osf())],
}


def build(out):
    return _peftjax_golden.build(out, "osf", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("osf", RULES)
