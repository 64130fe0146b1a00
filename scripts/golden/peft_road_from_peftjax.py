# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT RoAd adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_road_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`. The Llama adapter is
``road_2`` with groups of 8 (``k_proj``'s 8 outputs are one group); the BERT
one ``road_1`` with groups of 2 on modules with biases (rotated too).

Usage: ``.venv/bin/python scripts/golden/peft_road_from_peftjax.py``
"""

import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                        then=adapters.road("road_2", group_size=8))],
    "bert": [tree.Rule(where="layers/.*/attention/(query|key)/kernel",
                       then=adapters.road("road_1", group_size=2))],
}


def _perturb(state, rng):
    """θ ~ N(0, 0.3²), α ~ N(1, 0.3²): scales near 1 (PEFT inverts R to unmerge)."""
    t = {p: adapters.RoAdParams(
        jnp.asarray(rng.standard_normal(v.theta.shape) * 0.3, v.theta.dtype),
        jnp.asarray(1 + rng.standard_normal(v.alpha.shape) * 0.3, v.alpha.dtype))
        for p, v in sorted(state.trainable.items())}
    return adapters.AdapterState(t, state.frozen)


def build(out):
    return _peftjax_golden.build(out, "road", RULES, perturb=_perturb)


if __name__ == "__main__":
    _peftjax_golden.main("road", RULES, perturb=_perturb)
