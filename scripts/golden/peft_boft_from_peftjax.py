# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT BOFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_boft_make.py`` loads them in PEFT (with its stand-in of
PEFT's CUDA block-diagonal kernel, so that several butterfly factors load)
and records the output differences. The tests call :func:`build`. The Llama
adapter has three butterfly factors of four blocks (``boft_block_num=4``);
the BERT one a single factor of blocks of 8 with ``init_weights=False``.
Every ``r`` is N(0, 0.3²) and every scale ``s`` 1 + N(0, 0.3²).

Usage: ``.venv/bin/python scripts/golden/peft_boft_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.boft(block_num=4, n_butterfly_factor=3))],
    "bert": [tree.Rule(where="layers/.*/attention/query/kernel",
                       then=adapters.boft(8, init_weights=False))],
}


def perturb(state, rng):
    """Rotations' ``r`` ~ N(0, 0.3²), scales ``s`` ~ 1 + N(0, 0.3²) (tree order)."""
    trainable = {
        p: adapters.BOFTParams(
            jnp.asarray(rng.standard_normal(t.r.shape) * 0.3, t.r.dtype),
            jnp.asarray(1.0 + rng.standard_normal(t.s.shape) * 0.3, t.s.dtype))
        for p, t in sorted(state.trainable.items())}
    return adapters.AdapterState(trainable, state.frozen)


def build(out):
    return _peftjax_golden.build(out, "boft", RULES, perturb=perturb)


if __name__ == "__main__":
    _peftjax_golden.main("boft", RULES, perturb=perturb)
