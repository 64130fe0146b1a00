# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT FourierFT adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv. From the committed tiny Llama in
``tests/io/golden/peft/llama_base``, in the unrolled and the scanned layout,
and NumPy-seeded spectra (no JAX random bits) it writes
``tests/io/golden/peft_fourierft/from_peftjax/pj_fourierft_{unrolled,scanned}/``
with ``peftjax.io.save_peft`` (two ``n_frequency`` values, so the file needs
an ``n_frequency_pattern``) and ``peftjax_outputs.npz`` (peftjax's logits).
``scripts/golden/peft_fourierft_make.py`` (torch side) then loads each with
``PeftModel.from_pretrained`` and records the max logit difference in
``peft.json``; the test suite regenerates the files with :func:`build` and
compares them with the committed ones within a stated tolerance.

Usage: ``.venv/bin/python scripts/golden/peft_fourierft_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"
N = {"self_attn/k_proj": 12, "self_attn/o_proj": 30, "mlp/up_proj": 30}


def build(out) -> dict[str, np.ndarray]:
    """Writes ``out/pj_fourierft_{layout}``; returns their peftjax logits."""
    out = pathlib.Path(out)
    ids = jnp.asarray(np.load(GOLDEN / "peft_fourierft" / "torch_outputs.npz")
                      ["inputs_llama"])
    logits = {}
    for scanned in (False, True):
        model = llama.load_llama(GOLDEN / "peft" / "llama_base", scan_layers=scanned)
        g, params = pm.split_params(model)
        pre = "layers/" if scanned else r"layers/\d+/"
        a = tree.assign(params, [
            tree.Rule(where=pre + m + "/kernel",
                      then=adapters.fourierft(n, scaling=12.5, random_loc_seed=2024))
            for m, n in N.items()])
        st = adapters.init(a, jax.random.key(0), params)
        # the same values in both layouts: one draw per unrolled module, stacked
        rng = np.random.default_rng(47)
        spec = {f"{i}/{m}": rng.standard_normal(n) for i in range(2)
                for m, n in N.items()}
        trainable = {}
        for p in sorted(st.trainable):
            m = p.removesuffix("/kernel").split("/", 2 if not scanned else 1)[-1]
            v = (np.stack([spec[f"{i}/{m}"] for i in range(2)]) if scanned
                 else spec[p.removeprefix("layers/").removesuffix("/kernel")])
            trainable[p] = adapters.FourierFTParams(jnp.asarray(v, jnp.float32))
        st = adapters.AdapterState(trainable, st.frozen)
        name = f"pj_fourierft_{'scanned' if scanned else 'unrolled'}"
        io.save_peft(out / name, a, st, params, key_map=llama.peft_key_map(model.config),
                     base_model_name_or_path="tiny-random-llama")
        fwd = jax.jit(lambda t, f, ids, g=g, a=a, params=params: pm.apply(
            g, adapters.materialize(a, params, t, f), ids))
        logits[name] = np.asarray(fwd(st.trainable, st.frozen, ids))
    return logits


def main():
    out = GOLDEN / "peft_fourierft" / "from_peftjax"
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
