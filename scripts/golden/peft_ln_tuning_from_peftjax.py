# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT LN-tuning adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv. From the committed tiny Llama in
``tests/io/golden/peft/llama_base``, in the unrolled and the scanned layout,
and NumPy-seeded norm values (no JAX random bits) it writes
``tests/io/golden/peft_ln_tuning/from_peftjax/pj_ln_tuning_{unrolled,scanned}/``
with ``peftjax.io.save_peft`` and ``peftjax_outputs.npz`` (peftjax's logits).
``scripts/golden/peft_ln_tuning_make.py`` (torch side) then loads each with
``PeftModel.from_pretrained`` and records the max logit difference in
``peft.json``; the test suite regenerates the files with :func:`build` and
compares them with the committed ones within a stated tolerance.

Usage: ``.venv/bin/python scripts/golden/peft_ln_tuning_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"
NORMS = r"(layers/(\d+/)?(input_layernorm|post_attention_layernorm)|norm)/scale"


def build(out) -> dict[str, np.ndarray]:
    """Writes ``out/pj_ln_tuning_{layout}``; returns their peftjax logits."""
    out = pathlib.Path(out)
    ids = jnp.asarray(np.load(GOLDEN / "peft_ln_tuning" / "torch_outputs.npz")
                      ["inputs_llama"])
    logits = {}
    for scanned in (False, True):
        model = llama.load_llama(GOLDEN / "peft" / "llama_base", scan_layers=scanned)
        g, params = pm.split_params(model)
        a = tree.assign(params, [tree.Rule(where=NORMS, then=adapters.ln_tuning())])
        st = adapters.init(a, jax.random.key(0), params)
        # the same values in both layouts: one draw per unrolled norm, stacked
        rng = np.random.default_rng(43)
        noise = {f"layers/{i}/{n}": rng.standard_normal(16) * 0.3 for i in range(2)
                 for n in ("input_layernorm", "post_attention_layernorm")}
        noise["norm"] = rng.standard_normal(16) * 0.3
        trainable = {}
        for p, t in sorted(st.trainable.items()):
            mod = p.removesuffix("/scale")
            d = (np.stack([noise[mod.replace("layers/", f"layers/{i}/")] for i in range(2)])
                 if scanned and mod.startswith("layers/") else noise[mod])
            trainable[p] = adapters.LNTuningParams(jnp.asarray(
                np.asarray(t.value) + d, jnp.float32))
        st = adapters.AdapterState(trainable, st.frozen)
        name = f"pj_ln_tuning_{'scanned' if scanned else 'unrolled'}"
        io.save_peft(out / name, a, st, params, key_map=llama.peft_key_map(model.config),
                     base_model_name_or_path="tiny-random-llama")
        fwd = jax.jit(lambda p, ids, g=g: pm.apply(g, p, ids))
        logits[name] = np.asarray(fwd(adapters.materialize(a, params, *st), ids))
    return logits


def main():
    out = GOLDEN / "peft_ln_tuning" / "from_peftjax"
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
