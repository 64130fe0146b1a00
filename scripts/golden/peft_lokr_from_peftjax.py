# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT LoKr adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv. On the committed tiny Llama
(``tests/io/golden/peft/llama_base``) it writes, with ``peftjax.io.save_peft``,
into ``tests/io/golden/peft_lokr/from_peftjax/``:

* ``pj_llama_lokr``, ``pj_llama_lokr_factor``: the two PEFT-made adapters read
  with ``load_peft`` in the scanned layout and written back (PEFT -> peftjax
  -> PEFT);
* ``pj_native``: a peftjax-made ``lokr(rank=1, alpha=3, decompose_both=True)``
  on o/up (unrolled layout; o_proj's both factors decomposed, up_proj's w1
  full) plus ``lokr(rank=8, alpha=4)`` on k (both factors full: written with
  a rank that keeps them full and ``alpha = s·r``), factors from a NumPy
  generator;
* ``peftjax_outputs.npz``: peftjax's logits with each.

``scripts/golden/peft_lokr_make.py`` (torch side) then loads each with
``PeftModel.from_pretrained`` and records the max logit difference in
``peft.json``; the tests regenerate the files with :func:`build` and compare.

Usage: ``.venv/bin/python scripts/golden/peft_lokr_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"


def _logits(g, params, ad, ids):
    return np.asarray(pm.apply(g, adapters.materialize(ad.assignment, params, *ad.state),
                               ids))


def build(out) -> dict[str, np.ndarray]:
    """Writes the three adapters under ``out``; returns ``{name: peftjax logits}``."""
    out = pathlib.Path(out)
    ids = jnp.asarray(np.load(GOLDEN / "peft_lokr" / "torch_outputs.npz")["inputs_llama"])
    logits = {}
    model = llama.load_llama(GOLDEN / "peft" / "llama_base", scan_layers=True)
    g, params = pm.split_params(model)
    km = llama.peft_key_map(model.config)
    for name in ("llama_lokr", "llama_lokr_factor"):
        ad = io.load_peft(GOLDEN / "peft_lokr" / name, params, key_map=km)
        io.save_peft(out / f"pj_{name}", ad.assignment, ad.state, params, key_map=km)
        logits[f"pj_{name}"] = _logits(g, params, ad, ids)

    model = llama.load_llama(GOLDEN / "peft" / "llama_base", scan_layers=False)
    g, params = pm.split_params(model)
    km = llama.peft_key_map(model.config)
    small = adapters.lokr(rank=1, alpha=3.0, decompose_both=True)
    rules = [tree.Rule(where=r"layers/\d+/(self_attn/o_proj|mlp/up_proj)/kernel", then=small),
             tree.Rule(where=r"layers/\d+/self_attn/k_proj/kernel",
                       then=adapters.lokr(rank=8, alpha=4.0))]
    assignment = tree.assign(params, rules)
    state = adapters.init(assignment, jax.random.key(0), params)
    rng = np.random.default_rng(19)
    trainable = {p: jax.tree.map(lambda x: jnp.asarray(
        rng.standard_normal(x.shape) * 0.3, x.dtype), t)
        for p, t in sorted(state.trainable.items())}
    state = adapters.AdapterState(trainable, state.frozen)
    io.save_peft(out / "pj_native", assignment, state, params, key_map=km)
    logits["pj_native"] = _logits(g, params, io.PeftAdapter(assignment, state, {}, {}), ids)
    np.savez_compressed(out / "peftjax_outputs.npz", **logits)
    return logits


if __name__ == "__main__":
    build(GOLDEN / "peft_lokr" / "from_peftjax")
