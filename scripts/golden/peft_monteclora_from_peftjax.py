# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT MonteCLoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_monteclora_make.py`` loads them in PEFT (eval mode) and
records the output differences. The tests call :func:`build`. The sampler
buffers (PEFT's ``gaussian_var_prior``, ``expert_weights``) keep their initial
values, as PEFT saves them from an adapter never run in training mode.

Usage: ``.venv/bin/python scripts/golden/peft_monteclora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel|layers/mlp/up_proj/kernel",
                        then=adapters.monteclora(2, num_samples=3, alpha=6.0,
                                                 use_entropy=True))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.monteclora(3, num_samples=2, alpha=4.0,
                                                sample_scaler=2e-4))],
}


def build(out):
    return _peftjax_golden.build(out, "monteclora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("monteclora", RULES)
