# SPDX-License-Identifier: Apache-2.0
"""SpIEL step vs LoRA step on SmolLM2-135M at the same trainable count.

Question: is a SpIEL training step (sparse deltas on q,k,v,o with as many
trainable values as LoRA r=8 has there) within 1.3x of a LoRA step
(``step_s_sparse <= 1.3 * step_s_lora``), and what does a reselection cost?

How: SmolLM2-135M-Instruct from the offline GGUF (``--smoke``: a tiny random
Llama), batch 4 x 128, scanned layers. Per targeted stacked leaf
``(L, in, out)`` the sparse delta gets ``k = r·(in + out)`` values per layer,
so ``trainable_sparse == trainable_lora``. Both steps are jitted:
``train.trainer(..., factored=False)`` with AdamW (LoRA, materialised like
SpIEL) and ``train.trainer(..., sparse=selector)`` with ``sft_adamw``
(SpIEL; its step contains the accumulation and regrow branches under
``lax.cond``). Memory is ``argument + output + temp - alias``
of the compiled step and ``temp`` alone (``temp_bytes_*``). With
``--steps=N`` (N > 0) the plain steps are timed interleaved (medians after
``--warmup``), and ``regrow_s`` is the median time of a step that reselects
minus the median plain step. ``--steps=0`` is compile-only. Load averages are
recorded before and after: timings from a loaded machine are not comparable.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_step.py --json=OUT
    .venv/bin/python benchmarks/sparse_step.py --smoke --steps=0   # tiny model
    .venv/bin/python benchmarks/sparse_step.py --help              # every option
"""

import dataclasses
import json
import os
import platform
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (benchmarks/_harness.py)

from peftjax import train  # noqa: E402

opt = train.option
TARGETS = r"layers/(\d+/)?self_attn/(q|k|v|o)_proj/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    """SpIEL step vs LoRA step on SmolLM2-135M at the same trainable count."""

    batch: int = opt(4, "Sequences per step.")
    seq_len: int = opt(128, "Tokens per sequence (the ids hold one more for the targets).")
    rank: int = opt(8, "LoRA rank on q, k, v, o (and k = rank * (in + out) sparse values).")
    alpha: float = opt(16.0, "LoRA alpha (scaling alpha / rank).")
    steps: int = opt(5, "Timed steps per variant after the warm-up; 0: compile only.")
    warmup: int = opt(2, "Untimed steps before the timed ones.")
    smoke: bool = opt(False, "Tiny random Llama and small shapes (seconds).")
    json: str = opt("", "Write the result to this JSON file.")
    seed: int = opt(0, "Seed of the tiny model, the token ids and the adapters.")


SMOKE = {"batch": 2, "seq_len": 16, "steps": 1, "warmup": 1}


def _params(cfg):
    from peftjax import models as pm
    from peftjax.models import llama

    if not cfg.smoke:
        return llama.load_llama_params(pm.smollm2_gguf())
    return _harness.tiny_model(cfg.seed)


def _setup(cfg):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from peftjax import adapters, masks, optim, train, tree
    from peftjax.models import llama

    mcfg, params = _params(cfg)
    params = tree.stack_layers(params)
    gdef = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        mcfg, scan_layers=True, rngs=nnx.Rngs(0))))
    loss_fn = _harness.lm_loss(gdef)

    lora_a = tree.assign(params, [tree.Rule(where=TARGETS, then=adapters.lora(
        cfg.rank, alpha=cfg.alpha))])
    flat = tree.leaves_by_path(params)
    sparse_rules = [tree.Rule(where=re.escape(p), then=adapters.sparse_delta(
        k=cfg.rank * (flat[p].shape[-2] + flat[p].shape[-1]))) for p in lora_a]
    sparse_a = tree.assign(params, sparse_rules)
    key = jax.random.key(cfg.seed)
    ls = adapters.init(lora_a, key, params)
    ss = adapters.init(sparse_a, key, params)
    lopt = optax.adamw(1e-4)
    lora_trainer = train.trainer(loss_fn, lopt, adapters=lora_a, factored=False,
                                 donate=False)

    def lora_step(t, o, p, f, ids):  # the state's parts as arguments
        st = train.TrainState(t, f, o, jnp.zeros([], jnp.int32), jax.random.key(0))
        return lora_trainer.step(st, ids, p)
    sopt = optim.sft_adamw(1e-4, weight_decay=1.0)
    sparse_trainer = train.trainer(loss_fn, sopt, adapters=sparse_a, donate=False,
                                   sparse=masks.spiel_selector(total_steps=1000))
    sstate = sparse_trainer.init(key, params).opt_state[1]

    def spiel(t, f, o, s, ids):  # the state's parts as arguments, params closed over
        st = train.TrainState(t, f, (o, s), jnp.zeros([], jnp.int32), jax.random.key(0))
        return sparse_trainer.step(st, ids, params)
    # A state in no phase (plain steps) and one about to reselect.
    plain = sstate._replace(count=jnp.asarray(7, jnp.int32), phase=jnp.asarray(False))
    reselect = sstate._replace(count=jnp.asarray(24, jnp.int32),
                               samples=jnp.asarray(5.0, jnp.float32))
    return dict(
        mcfg=mcfg,
        lora=(lora_step, (ls.trainable, lopt.init(ls.trainable), params, ls.frozen)),
        sparse=(spiel, (ss.trainable, ss.frozen, sopt.init(ss.trainable), plain)),
        reselect_state=reselect,
        trainable_lora=adapters.num_trainable(ls.trainable),
        trainable_sparse=adapters.num_trainable(ss.trainable),
    )


def main(cfg: Config) -> dict:
    """Runs the benchmark; returns (and optionally writes) the result dict."""
    import jax
    import jax.numpy as jnp

    load_before = os.getloadavg()
    s = _setup(cfg)
    ids = jnp.asarray(np.random.default_rng(cfg.seed).integers(
        0, s["mcfg"].vocab_size, (cfg.batch, cfg.seq_len + 1)), jnp.int32)
    out = {"trainable_lora": s["trainable_lora"], "trainable_sparse": s["trainable_sparse"]}
    compiled = {}
    for name in ("lora", "sparse"):
        fn, args = s[name]
        t = time.perf_counter()
        c = jax.jit(fn).lower(*args, ids).compile()
        out[f"compile_s_{name}"] = time.perf_counter() - t
        out[f"temp_bytes_{name}"] = int(c.memory_analysis().temp_size_in_bytes)
        out[f"bytes_{name}"] = _harness.step_bytes(c)
        compiled[name] = c
    times = {"lora": [], "sparse": [], "reselect": []}
    fn_args = {"lora": s["lora"][1], "sparse": s["sparse"][1],
               "reselect": s["sparse"][1][:3] + (s["reselect_state"],)}
    for i in range(cfg.warmup + cfg.steps if cfg.steps > 0 else 0):
        for name in ("lora", "sparse", "reselect"):
            c = compiled["lora" if name == "lora" else "sparse"]
            t = time.perf_counter()
            jax.block_until_ready(c(*fn_args[name], ids))
            if i >= cfg.warmup:
                times[name].append(time.perf_counter() - t)
    if cfg.steps > 0:
        med = {k: _harness.median(v) for k, v in times.items()}
        out.update(step_s_lora=med["lora"], step_s_sparse=med["sparse"],
                   step_s_min_lora=min(times["lora"]), step_s_min_sparse=min(times["sparse"]),
                   regrow_s=med["reselect"] - med["sparse"],
                   ratio_sparse_over_lora=med["sparse"] / med["lora"])
    res = {"config": dataclasses.asdict(cfg), "results": out,
           "model": _harness.TINY_MODEL if cfg.smoke else "SmolLM2-135M-Instruct",
           "jax": jax.__version__, "backend": jax.default_backend(),
           "platform": platform.platform(), "versions": _harness.machine(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    _harness.write_json(cfg.json, res)
    return res


def _parse(argv: list[str]) -> Config:
    return train.parse_config(Config, argv, smoke=SMOKE)


if __name__ == "__main__":
    r = main(_parse(sys.argv[1:]))
    print(json.dumps(r["results"], indent=1))
