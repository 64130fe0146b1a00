# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT LN-tuning adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``); then
``scripts/golden/peft_ln_tuning_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`.

* Llama (scanned): every RMSNorm scale (both per-layer norms, stacked, and
  the final ``norm``);
* BERT: every LayerNorm's scale AND bias (the embeddings' and both per-layer
  norms): PEFT copies the whole module, so both tensors of each are written.

Each trainable copy is its base value plus NumPy ``N(0, 0.3²)`` noise (a
norm scale replaced by noise alone would all but zero the outputs).

Usage: ``.venv/bin/python scripts/golden/peft_ln_tuning_from_peftjax.py``
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="(layers/(input|post_attention)_layernorm|norm)/scale",
                        then=adapters.ln_tuning())],
    "bert": [tree.Rule(where="(embeddings/layer_norm|layers/.*_norm)/(scale|bias)",
                       then=adapters.ln_tuning())],
}


def perturb(state, rng):
    """Every norm copy moved from its base value by ``N(0, 0.3²)`` (tree order)."""
    trainable = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + rng.standard_normal(np.shape(x)) * 0.3,
                              x.dtype), state.trainable)
    return adapters.AdapterState(trainable, state.frozen)


def build(out):
    return _peftjax_golden.build(out, "ln_tuning", RULES, perturb=perturb)


if __name__ == "__main__":
    _peftjax_golden.main("ln_tuning", RULES, perturb=perturb)
