# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT LoHa adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv. From the committed tiny Llama in
``tests/io/golden/peft/llama_base`` (scanned layout) and NumPy-seeded factor
values (no JAX random bits) it writes ``tests/io/golden/peft_loha/from_peftjax/
pj_loha/`` with ``peftjax.io.save_peft`` and ``peftjax_outputs.npz`` (peftjax's
logits). ``scripts/golden/peft_loha_make.py`` (torch side) then loads it with
``PeftModel.from_pretrained`` and records the max logit difference and the
statistics of every tensor in ``peft.json``; the test suite regenerates the
files with :func:`build` and compares them with the committed ones within a
stated tolerance.

Usage: ``.venv/bin/python scripts/golden/peft_loha_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"


def build(out) -> dict[str, np.ndarray]:
    """Writes ``out/pj_loha``; returns ``{"pj_loha": peftjax logits}``."""
    out = pathlib.Path(out)
    ids = jnp.asarray(np.load(GOLDEN / "peft_loha" / "torch_outputs.npz")["inputs_llama"])
    model = llama.load_llama(GOLDEN / "peft" / "llama_base", scan_layers=True)
    g, params = pm.split_params(model)
    rules = [tree.Rule(where="layers/self_attn/(q|k)_proj/kernel",
                       then=adapters.loha(4, alpha=8.0)),
             tree.Rule(where="layers/mlp/up_proj/kernel",
                       then=adapters.loha(2, alpha=3.0))]
    a = tree.assign(params, rules)
    st = adapters.init(a, jax.random.key(0), params)
    rng = np.random.default_rng(41)
    trainable = {p: type(t)(*[jnp.asarray(rng.standard_normal(np.shape(x)) * 0.3,
                                          jnp.float32) for x in t])
                 for p, t in sorted(st.trainable.items())}
    st = adapters.AdapterState(trainable, st.frozen)
    io.save_peft(out / "pj_loha", a, st, params, key_map=llama.peft_key_map(model.config),
                 base_model_name_or_path="tiny-random-llama")
    logits = pm.apply(g, adapters.materialize(a, params, *st), ids)
    return {"pj_loha": np.asarray(logits)}


def main():
    out = GOLDEN / "peft_loha" / "from_peftjax"
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
