# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT GLoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_glora_make.py`` loads them in PEFT and records the output
differences. The tests call :func:`build`. The Llama projections have no
bias: lora ``A``/``B`` only (``C``, ``D``, ``E`` none, PEFT's empty paths);
the BERT query/key layers take constant ``A``/``B``/``D``/``E`` and a vector
``C`` (the path kinds the PEFT-made files do not use).

Usage: ``.venv/bin/python scripts/golden/peft_glora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

_LLAMA = adapters.glora(3, config_C="none", config_D_E="none")
RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel", then=_LLAMA),
              tree.Rule(where="layers/mlp/up_proj/kernel", then=_LLAMA)],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.glora(2, config_A_B="constant", config_C="vector",
                                           config_D_E="constant"))],
}


def build(out):
    return _peftjax_golden.build(out, "glora", RULES)


if __name__ == "__main__":
    _peftjax_golden.main("glora", RULES)
