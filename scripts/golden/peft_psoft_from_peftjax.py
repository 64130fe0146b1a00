# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT PSOFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_psoft_make.py`` loads them in PEFT, which recomputes
the SVD factors from the base weights, and records the output differences.
Every trainable value is its init plus N(0, 0.3²) NumPy draws (the scaling
vectors stay near 1). The Llama adapter is the free-``R`` variant
(``orth=False``), the BERT one ``pissa_init`` with the Cayley-Neumann series
and no scaling vectors; both on modules whose SVD signs torch's agree with
(see ``peftjax/io/_peft_psoft.py``). The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_psoft_from_peftjax.py``
"""

import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/q_proj|mlp/up_proj)/kernel",
                        then=adapters.psoft(3, alpha=6.0, orth=False))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.psoft(2, init="pissa_init", mag_a=False, mag_b=False,
                                           use_cayley_neumann=True))],
}


def _perturb(state, rng):
    trainable = jax.tree.map(lambda x: x + rng.normal(0.0, 0.3, x.shape).astype(x.dtype),
                             state.trainable)
    return adapters.AdapterState(trainable, state.frozen)


def build(out):
    return _peftjax_golden.build(out, "psoft", RULES, perturb=_perturb)


if __name__ == "__main__":
    _peftjax_golden.main("psoft", RULES, perturb=_perturb)
