# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT DEFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_deft_make.py`` loads them in PEFT and records the
output differences. Every trainable value is its init plus N(0, 0.3²) NumPy
draws. The Llama adapter uses the ``qr`` projector with ``alpha``, the BERT
one is PaRa (``para=True``: the removal alone, ``deft_P`` only). The tests
call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_deft_from_peftjax.py``
"""

import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(q|k)_proj|mlp/up_proj)/kernel",
                        then=adapters.deft(3, decomposition="qr", alpha=6.0))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.deft(2, para=True))],
}


def _perturb(state, rng):
    trainable = jax.tree.map(lambda x: x + rng.normal(0.0, 0.3, x.shape).astype(x.dtype),
                             state.trainable)
    return adapters.AdapterState(trainable, state.frozen)


def build(out):
    return _peftjax_golden.build(out, "deft", RULES, perturb=_perturb)


if __name__ == "__main__":
    _peftjax_golden.main("deft", RULES, perturb=_perturb)
