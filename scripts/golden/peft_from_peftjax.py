# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT adapters (and a merged export) for the reverse check.

Runs in the main virtualenv. From the committed tiny bases in
``tests/io/golden/peft/{llama,bert}_base`` and NumPy-seeded adapter values
(no JAX random bits, so the values do not depend on the JAX version) it writes
``from_peftjax/<name>/`` with ``peftjax.io.save_peft``, a merged Llama export
``from_peftjax/pj_lora_merged/`` (``adapters.fold`` + ``llama.save_hf``) and
``peftjax_outputs.npz`` (peftjax's logits / hidden states for each).
``scripts/golden/peft_verify.py`` (torch side) then loads them in PEFT and
transformers and records the comparison in ``verified.json``; the test suite
regenerates the adapters with :func:`build` and compares the tensors with
the committed files within a stated tolerance (the merged tensors are
computed, and XLA's kernels differ between CPUs).

Usage: ``.venv/bin/python scripts/golden/peft_from_peftjax.py``
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import bert, llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden" / "peft"


def _numpy_state(state, seed, *, positive=()):
    """Replaces every adapter value by NumPy-seeded values (non-zero B)."""
    rng = np.random.default_rng(seed)

    def fill(x, pos=False):
        v = rng.standard_normal(np.shape(x)) * 0.3
        return jnp.asarray(1.0 + np.abs(v) if pos else v, jnp.float32)

    trainable = {}
    for path, t in sorted(state.trainable.items()):
        trainable[path] = type(t)(*[fill(x, name in positive)
                                    for name, x in zip(t._fields, t)])
    return adapters.AdapterState(trainable, state.frozen)


def _vera_numpy(state, rank, max_in, max_out, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.5, 0.5, (max_in, rank)).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, (rank, max_out)).astype(np.float32)
    frozen = {}
    for path, f in state.frozen.items():
        n_in, n_out = f.a.shape[-2], f.b.shape[-1]
        fa, fb = jnp.asarray(a[:n_in]), jnp.asarray(b[:, :n_out])
        if f.a.ndim == 3:
            fa = jnp.broadcast_to(fa, f.a.shape)
            fb = jnp.broadcast_to(fb, f.b.shape)
        frozen[path] = adapters.VeRABasis(fa, fb)
    return adapters.AdapterState(state.trainable, frozen)


def build(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Writes the peftjax adapters under ``out``; returns peftjax's outputs."""
    out = pathlib.Path(out)
    outputs: dict[str, np.ndarray] = {}
    ref = np.load(GOLDEN / "torch_outputs.npz")
    ids = jnp.asarray(ref["inputs_llama"])
    model = llama.load_llama(GOLDEN / "llama_base", scan_layers=True)
    cfg = model.config
    g, params = pm.split_params(model)
    km = llama.peft_key_map(cfg)
    fwd = jax.jit(lambda p, x: pm.apply(g, p, x))  # one compile for all adapters
    rs = adapters.Scaling.ALPHA_OVER_SQRT_RANK
    specs = {
        "pj_lora": ([tree.Rule(where="layers/self_attn/(q|v)_proj/kernel",
                               then=adapters.lora(4, alpha=8.0)),
                     tree.Rule(where="layers/self_attn/o_proj/kernel",
                               then=adapters.lora(2, alpha=3.0))], {}),
        "pj_dora": ([tree.Rule(where="layers/(self_attn/k|mlp/up)_proj/kernel",
                               then=adapters.dora(4, alpha=16.0, scaling=rs))],
                    {"use_rslora": True}),
        "pj_embed": ([tree.Rule(where="embed_tokens/embedding", then=adapters.lora(
                          2, alpha=4.0, init=adapters.LoRAInit.EMBEDDING)),
                      tree.Rule(where="layers/mlp/gate_proj/kernel",
                                then=adapters.lora(2, alpha=4.0))], {}),
        "pj_ia3": ([tree.Rule(where="layers/self_attn/(k|v)_proj/kernel",
                              then=adapters.ia3(adapters.Side.OUTPUT)),
                    tree.Rule(where="layers/mlp/down_proj/kernel",
                              then=adapters.ia3(adapters.Side.INPUT))], {}),
        "pj_vera": ([tree.Rule(where="layers/self_attn/(q|v)_proj/kernel",
                               then=adapters.vera(4, max_in=16, max_out=16))], {}),
    }
    for seed, (name, (rules, kw)) in enumerate(specs.items()):
        a = tree.assign(params, rules)
        st = adapters.init(a, jax.random.key(0), params)
        st = _numpy_state(st, 10 + seed, positive=("magnitude", "scale"))
        if name == "pj_vera":
            st = _vera_numpy(st, 4, 16, 16, 99)
        full = {}
        if name == "pj_lora":
            rng = np.random.default_rng(7)
            head = params["lm_head"]["kernel"]
            full = {"lm_head/kernel": head + jnp.asarray(
                rng.standard_normal(head.shape) * 0.1, jnp.float32)}
        io.save_peft(out / name, a, st, params, key_map=km, full=full,
                     base_model_name_or_path="tiny-random-llama", **kw)
        p = tree.replace_leaves(adapters.materialize(a, params, *st), full)
        outputs[name] = np.asarray(fwd(p, ids))
        if name == "pj_lora":
            merged = tree.replace_leaves(adapters.fold(a, params, *st), full)
            llama.save_hf(out / "pj_lora_merged", merged, cfg)
            outputs["pj_lora_merged"] = np.asarray(fwd(merged, ids))

    bids = jnp.asarray(ref["inputs_bert"])
    mask = jnp.asarray(ref["mask_bert"])
    enc = bert.load_bert(GOLDEN / "bert_base")
    gb, pb = pm.split_params(enc)
    a = tree.assign(pb, [tree.Rule(
        where=r"layers/\d+/attention/(query|value)/kernel",
        then=adapters.lora(4, alpha=8.0))])
    st = _numpy_state(adapters.init(a, jax.random.key(0), pb), 30)
    io.save_peft(out / "pj_bert", a, st, pb, key_map=bert.peft_key_map(enc.config),
                 base_model_name_or_path="tiny-random-bert")
    outputs["pj_bert"] = np.asarray(pm.apply(
        gb, adapters.materialize(a, pb, *st), bids, attention_mask=mask))
    return outputs


def main():
    out = GOLDEN / "from_peftjax"
    outputs = build(out)
    np.savez_compressed(GOLDEN / "peftjax_outputs.npz", **outputs)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
