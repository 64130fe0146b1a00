# SPDX-License-Identifier: Apache-2.0
"""peftjax exports for transformers / PEFT to check: BERT merged, tied heads, inits.

Runs in the main virtualenv (never torch). From the committed tiny bases in
``tests/io/golden/peft/{llama,bert}_base`` and NumPy-seeded values (no JAX
random bits) it writes, under ``tests/io/golden/peft/export/``:

* ``bert_merged/``, ``roberta_merged/``: a LoRA (query, value, intermediate)
  merged into the tiny BERT with ``adapters.fold`` and written by
  ``bert.save_hf`` (the same weights once as ``model_type="roberta"``);
* ``llama_tied_base/``: a tiny tied-embedding Llama (SmolLM2's layout)
  written by ``llama.save_hf``; ``pj_tied_embed/`` (LoRA on the tied table
  and on q_proj) and ``pj_tied_full/`` (the tied table trained in full, LoRA
  on v_proj), written by ``io.save_peft(..., tied_head=...)``;
* ``pj_pissa/``, ``pj_olora/``, ``pj_lora_ga/``, ``pj_corda/``: PiSSA,
  OLoRA, LoRA-GA and CorDA adapters on the untied tiny Llama (scanned
  layers), "trained" (a NumPy-seeded update of every factor), converted by
  ``inits.to_lora`` to a rank-2r LoRA over the unmodified base and written by
  ``io.save_peft`` (``rank_pattern`` where ranks differ, rsLoRA for LoRA-GA);
* ``peftjax_outputs.npz``: peftjax's last hidden states / logits for each
  (the trained models over their residual bases for the inits).

``scripts/golden/peft_export_verify.py`` (torch side) then loads every one in
transformers / PEFT and records the torch outputs and summary statistics of
the tensors it loaded; the tests regenerate the exports with
:func:`build_bert`, :func:`build_tied` and :func:`build_inits` and compare
them with the committed files within a stated tolerance (XLA's and LAPACK's
kernels differ between CPUs, so the last bits may too).

Usage: ``.venv/bin/python scripts/golden/peft_export_make.py``
"""

import dataclasses
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax import adapters, inits, io, tree
from peftjax import models as pm
from peftjax.models import bert, llama

GOLDEN = (
    pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden" / "peft"
)
TIE = ("embed_tokens/embedding", "lm_head")


@functools.cache
def forward(graphdef):
    """The jitted forward of a model graph (one compile per graph, tests share it)."""
    return jax.jit(lambda p, x: pm.apply(graphdef, p, x))


def _numpy_values(trainable, seed, scale=0.3, add=False):
    """Every adapter value NumPy-seeded (``add``: an update of the given values)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, t in sorted(trainable.items()):
        out[path] = type(t)(
            *[
                jnp.asarray(
                    (np.asarray(x) if add else 0.0)
                    + scale * rng.standard_normal(np.shape(x)),
                    jnp.float32,
                )
                for x in t
            ]
        )
    return out


def _inputs():
    ref = np.load(GOLDEN / "torch_outputs.npz")
    return (
        jnp.asarray(ref["inputs_llama"]),
        jnp.asarray(ref["inputs_bert"]),
        jnp.asarray(ref["mask_bert"]),
    )


def build_bert(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Writes ``bert_merged``/``roberta_merged``; returns peftjax's hidden states."""
    out = pathlib.Path(out)
    _, bids, mask = _inputs()
    enc = bert.load_bert(GOLDEN / "bert_base")
    g, params = pm.split_params(enc)
    a = tree.assign(
        params,
        [
            tree.Rule(
                where=r"layers/\d+/(attention/(query|value)|intermediate)/kernel",
                then=adapters.lora(4, alpha=8.0),
            )
        ],
    )
    st = adapters.init(a, jax.random.key(0), params)
    st = adapters.AdapterState(_numpy_values(st.trainable, 40), st.frozen)
    merged = adapters.fold(a, params, *st)
    bert.save_hf(out / "bert_merged", merged, enc.config)
    outputs = {
        "bert_merged": np.asarray(pm.apply(g, merged, bids, attention_mask=mask))
    }
    rcfg = dataclasses.replace(enc.config, model_type="roberta")
    bert.save_hf(out / "roberta_merged", merged, rcfg)
    rg, _ = pm.split_params(
        nnx.eval_shape(lambda: bert.BertModel(rcfg, rngs=nnx.Rngs(0)))
    )
    outputs["roberta_merged"] = np.asarray(
        pm.apply(rg, merged, bids, attention_mask=mask)
    )
    return outputs


def tied_base_params() -> tuple[llama.LlamaConfig, dict]:
    """A tiny tied Llama with NumPy-seeded weights (norm scales around 1)."""
    cfg = llama.tiny_config(
        vocab_size=64, hidden_size=16, intermediate_size=32, max_position_embeddings=64
    )
    _, shapes = pm.split_params(
        nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(5)

    def fill(path, s):
        v = rng.standard_normal(s.shape) * 0.2
        return jnp.asarray(1.0 + v if path.endswith("scale") else v, jnp.float32)

    return cfg, tree.map_with_path(fill, shapes)


def build_tied(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Writes the tied base and its adapters; returns peftjax's logits."""
    out = pathlib.Path(out)
    ids, _, _ = _inputs()
    cfg, params = tied_base_params()
    llama.save_hf(out / "llama_tied_base", params, cfg)
    model = llama.load_llama(out / "llama_tied_base", scan_layers=True)
    g, params = pm.split_params(model)
    fwd = forward(g)
    km = llama.peft_key_map(cfg)
    outputs = {"llama_tied_base": np.asarray(fwd(params, ids))}
    a = tree.assign(
        params,
        [
            tree.Rule(
                where="embed_tokens/embedding",
                then=adapters.lora(2, alpha=4.0, init=adapters.LoRAInit.EMBEDDING),
            ),
            tree.Rule(
                where="layers/self_attn/q_proj/kernel", then=adapters.lora(4, alpha=8.0)
            ),
        ],
    )
    st = adapters.init(a, jax.random.key(0), params)
    st = adapters.AdapterState(_numpy_values(st.trainable, 50), st.frozen)
    io.save_peft(
        out / "pj_tied_embed",
        a,
        st,
        params,
        key_map=km,
        tied_head=TIE,
        base_model_name_or_path="tiny-tied-llama",
    )
    outputs["pj_tied_embed"] = np.asarray(
        fwd(adapters.materialize(a, params, *st), ids)
    )
    a = tree.assign(
        params,
        [
            tree.Rule(
                where="layers/self_attn/v_proj/kernel", then=adapters.lora(2, alpha=4.0)
            )
        ],
    )
    st = adapters.init(a, jax.random.key(0), params)
    st = adapters.AdapterState(_numpy_values(st.trainable, 51), st.frozen)
    table = params["embed_tokens"]["embedding"]
    full = {
        TIE[0]: table
        + jnp.asarray(
            np.random.default_rng(52).standard_normal(table.shape) * 0.2, jnp.float32
        )
    }
    io.save_peft(
        out / "pj_tied_full",
        a,
        st,
        params,
        key_map=km,
        full=full,
        tied_head=TIE,
        base_model_name_or_path="tiny-tied-llama",
    )
    p = tree.replace_leaves(adapters.materialize(a, params, *st), full)
    outputs["pj_tied_full"] = np.asarray(fwd(p, ids))
    return outputs


def init_plans():
    """``{name: (rules, save_peft kwargs, stats kind)}`` on the scanned tiny Llama."""
    rs = adapters.Scaling.ALPHA_OVER_SQRT_RANK
    pre = "layers/"
    return {
        "pj_pissa": (
            [
                tree.Rule(
                    where=pre + "self_attn/q_proj/kernel",
                    then=inits.pissa(2, alpha=4.0),
                ),
                tree.Rule(
                    where=pre + "self_attn/v_proj/kernel",
                    then=inits.pissa(4, alpha=4.0),
                ),
            ],
            {},
            None,
        ),
        "pj_olora": (
            [
                tree.Rule(
                    where=pre + "self_attn/(k|o)_proj/kernel",
                    then=inits.olora(2, alpha=4.0),
                )
            ],
            {},
            None,
        ),
        "pj_lora_ga": (
            [
                tree.Rule(
                    where=pre + "(self_attn/q|mlp/up)_proj/kernel",
                    then=inits.lora_ga(2, alpha=4.0, scaling=rs, niter=None),
                )
            ],
            {"use_rslora": True},
            "gradient",
        ),
        "pj_corda": (
            [
                tree.Rule(
                    where=pre + "mlp/(gate|up)_proj/kernel",
                    then=inits.corda(2, alpha=4.0),
                )
            ],
            {},
            "covariance",
        ),
    }


def _stats(kind, plan, params, seed):
    """NumPy-seeded statistics: a gradient per leaf, or a covariance ``XᵀX/n``."""
    if kind is None:
        return None
    rng = np.random.default_rng(seed)
    flat = tree.leaves_by_path(params)
    out = {}
    for path in sorted(plan):
        shape = np.shape(flat[path])
        if kind == "gradient":
            out[path] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        else:
            x = rng.standard_normal((shape[0], 24, shape[1]))
            out[path] = jnp.asarray(np.einsum("lni,lnj->lij", x, x) / 24, jnp.float32)
    return out


def trained_init_adapters():
    """Per init: ``(params, plan, InitResult, trained, kwargs)`` on the tiny Llama."""
    model = llama.load_llama(GOLDEN / "llama_base", scan_layers=True)
    g, params = pm.split_params(model)
    runs = {}
    for seed, (name, (rules, kw, kind)) in enumerate(init_plans().items()):
        plan = tree.assign(params, rules)

        def run(p, s, plan=plan):  # one compile per init, not one per SVD
            res = inits.run(plan, jax.random.key(0), p, stats=s)
            return res.params, res.state

        base, state = jax.jit(run)(params, _stats(kind, plan, params, 60 + seed))
        res = inits.InitResult(base, {p: ini.adapter for p, ini in plan.items()}, state)
        trained = _numpy_values(res.state.trainable, 70 + seed, scale=0.05, add=True)
        runs[name] = (plan, res, trained, kw)
    return model, g, params, runs


def build_inits(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Writes the converted init adapters; returns the trained models' logits."""
    out = pathlib.Path(out)
    ids, _, _ = _inputs()
    model, g, params, runs = trained_init_adapters()
    km = llama.peft_key_map(model.config)
    fwd = forward(g)
    outputs = {}
    for name, (plan, res, trained, kw) in runs.items():
        asg, st = inits.to_lora(plan, res.state.trainable, trained, res.state.frozen)
        io.save_peft(
            out / name,
            asg,
            st,
            params,
            key_map=km,
            base_model_name_or_path="tiny-random-llama",
            **kw,
        )
        p = adapters.materialize(res.assignment, res.params, trained, res.state.frozen)
        outputs[name] = np.asarray(fwd(p, ids))
    return outputs


def main():
    out = GOLDEN / "export"
    outputs = {**build_bert(out), **build_tied(out), **build_inits(out)}
    np.savez_compressed(out / "peftjax_outputs.npz", **outputs)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
