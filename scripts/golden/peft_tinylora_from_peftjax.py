# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT TinyLoRA adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv (``_peftjax_golden.main``). Every adapter array,
the trainable ``v`` and the frozen basis ``a``/``b`` and projections ``P``,
is replaced by NumPy draws (no JAX random bits and no SVD, so the files do
not depend on the machine's LAPACK signs); the BERT adapter includes the
word-embedding table and ties its matrices (``weight_tying=0.5``). Then
``scripts/golden/peft_tinylora_make.py`` loads them in PEFT and records the
output differences. The tests call :func:`build`.

Usage: ``.venv/bin/python scripts/golden/peft_tinylora_from_peftjax.py``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _peftjax_golden  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from peftjax import adapters, tree  # noqa: E402

RULES = {
    "llama": [tree.Rule(where="layers/(self_attn/(k|o)_proj|mlp/up_proj)/kernel",
                        then=adapters.tinylora(r=2, u=4))],
    # tied: 5 matrices, 2 shared vectors (PEFT's groups: assignment order is
    # torch's module order here)
    "bert": [tree.Rule(where="embeddings/word_embeddings/embedding|"
                             "layers/.*/(attention/key|intermediate)/kernel",
                       then=adapters.tinylora(r=2, u=3, weight_tying=0.5))],
}


def perturb(state, rng):
    """``v`` (or the tied table), ``a``, ``b`` and ``P`` all N(0, 0.5²) NumPy
    draws (tree order); the tied group ids are kept."""
    def draw(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jnp.asarray(rng.standard_normal(x.shape) * 0.5, x.dtype)

    return adapters.AdapterState(jax.tree.map(draw, state.trainable),
                                 jax.tree.map(draw, state.frozen))


def build(out):
    return _peftjax_golden.build(out, "tinylora", RULES, perturb=perturb)


if __name__ == "__main__":
    _peftjax_golden.main("tinylora", RULES, perturb=perturb)
