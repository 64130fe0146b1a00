# SPDX-License-Identifier: Apache-2.0
"""LoRA training step on SmolLM2-135M: factored vs materialize vs full FT vs PEFT.

Question: does the factored path (``peftjax.factored``) make a LoRA step cheaper
than full fine-tuning (FLOPs <= 0.70x, no weight-sized temporaries of the
adapted kernels) and as fast as Hugging Face PEFT on torch?

How: SmolLM2-135M-Instruct from the offline Q4_1 GGUF (dequantised to
float32), batch 4 x 128, LoRA r=8 alpha=16 on q,k,v,o, AdamW. Three jitted
steps (differentiating only what each trains): ``full`` (every parameter,
tied embedding included), ``materialize`` (``train.trainer(...,
factored=False)``) and ``factored`` (``train.trainer``'s default). FLOPs and the
weight-sized-temporary
count come from *unrolled* compiles (XLA counts a scan body once); memory
(``argument + output + temp - alias``) and wall times from the scanned-layer
model; the loop-aware jaxpr FLOPs of ``peftjax.report`` are recorded too.
With ``--steps=N`` (N > 0) the steps are timed interleaved (full,
materialize, factored, torch PEFT in a ``.venv-torch`` worker); medians and
minimums after ``--warmup``; ``--order=blocked`` instead runs all steps of
one variant before the next (each warmed up on its own caches). The factored
step is also timed on the unrolled-layer model (``step_s_lora_unrolled``).
``--steps=0`` is compile-only. Load averages are
recorded before and after: timings from a loaded machine are not comparable.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/lora_step.py --json=OUT
    .venv/bin/python benchmarks/lora_step.py --smoke --steps=0   # tiny model
    .venv/bin/python benchmarks/lora_step.py --help              # every option
"""

import dataclasses
import importlib
import json
import os
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
    """LoRA training step on SmolLM2-135M: factored vs materialize vs full FT vs PEFT."""

    batch: int = opt(4, "Sequences per step.")
    seq_len: int = opt(128, "Tokens per sequence (the ids hold one more for the targets).")
    rank: int = opt(8, "LoRA rank on q, k, v, o.")
    alpha: float = opt(16.0, "LoRA alpha (scaling alpha / rank).")
    steps: int = opt(5, "Timed steps per variant after the warm-up; 0: compile only.")
    warmup: int = opt(2, "Untimed steps before the timed ones.")
    torch: bool = opt(True, "Time torch PEFT in a .venv-torch worker too.")
    smoke: bool = opt(False, "Tiny random Llama and small shapes (seconds).")
    json: str = opt("", "Write the result to this JSON file.")
    seed: int = opt(0, "Seed of the tiny model, the token ids and the adapters.")
    order: str = opt("interleaved", "'interleaved' (one step of each variant in turn) "
                     "or 'blocked' (all steps of one variant, then the next).")


SMOKE = {"batch": 2, "seq_len": 16, "warmup": 1, "steps": 2}


def _params(cfg):
    from peftjax import models as pm
    from peftjax.models import llama

    if not cfg.smoke:
        path = pm.smollm2_gguf()
        mcfg, params = llama.load_llama_params(path)
        return mcfg, params, path
    return (*_harness.tiny_model(cfg.seed), None)


def _steps(mcfg, params, scan, cfg):
    """Returns {name: (step_fn, args)} for one layout."""
    import jax
    import optax
    from flax import nnx

    from peftjax import adapters, train, tree
    from peftjax.models import llama

    gdef = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        mcfg, scan_layers=scan, rngs=nnx.Rngs(0))))
    loss_fn = _harness.lm_loss(gdef)
    opt = optax.adamw(1e-4)
    assignment = tree.assign(params, [tree.Rule(
        where=TARGETS, then=adapters.lora(cfg.rank, alpha=cfg.alpha))])

    def full(p, o, ids):
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    def lora(factored):  # (state, params, ids) -> (state, loss); donation off, as `full`
        t = train.trainer(loss_fn, opt, adapters=assignment, factored=factored, donate=False)

        def step(state, p, ids):
            state, metrics = t.step(state, ids, p)
            return state, metrics["loss"]

        return step, (t.init(jax.random.key(cfg.seed), params), params)

    return assignment, {
        "full": (full, (params, opt.init(params))),
        "materialize": lora(False),
        "factored": lora(None),
    }


def _kernel_temps(text: str, shapes: set) -> list[str]:
    """HLO instructions (not parameters/views) producing an adapted kernel's shape."""
    pats = [re.compile(r"= f32\[" + ",".join(map(str, s)) + r"\]") for s in shapes]
    skip = (" parameter(", " get-tuple-element(", " bitcast(", " tuple(")
    return [ln.strip()[:160] for ln in text.splitlines()
            if any(p.search(ln) for p in pats) and not any(k in ln for k in skip)]


def main(cfg: Config) -> dict:
    """Runs the benchmark; returns (and optionally writes) the result dict."""
    import jax
    import jax.numpy as jnp

    rep = importlib.import_module("peftjax.report")
    from peftjax import tree

    load_before = os.getloadavg()
    mcfg, unrolled, gguf = _params(cfg)
    ids_np = np.random.default_rng(cfg.seed).integers(
        0, mcfg.vocab_size, (cfg.batch, cfg.seq_len + 1), dtype=np.int64)
    ids = jnp.asarray(ids_np, jnp.int32)
    out: dict = {}
    compiled_scan = {}
    for layout, params in (("unrolled", unrolled), ("scan", tree.stack_layers(unrolled))):
        assignment, steps = _steps(mcfg, params, layout == "scan", cfg)
        flat = tree.leaves_by_path(params)
        shapes = {tuple(flat[p].shape) for p in assignment}
        shapes |= {tuple(flat[p].shape[1:]) for p in assignment if flat[p].ndim == 3}
        if layout == "unrolled":
            out["adapted_weight_bytes"] = int(sum(flat[p].size * 4 for p in assignment))
        for name, (fn, args) in steps.items():
            t = time.perf_counter()
            compiled = jax.jit(fn).lower(*args, ids).compile()
            secs = time.perf_counter() - t
            key = f"{name}_{layout}"
            out[f"compile_s_{key}"] = secs
            out[f"bytes_{key}"] = _harness.step_bytes(compiled)
            out[f"flops_xla_{key}"] = float(compiled.cost_analysis()["flops"])
            temps = _kernel_temps(compiled.as_text(), shapes)
            out[f"weight_sized_temps_{key}"] = len(temps)
            out[f"weight_sized_temps_examples_{key}"] = temps[:4]
            if layout == "scan":
                out[f"flops_jaxpr_{key}"] = rep.jaxpr_flops(fn, *args, ids)[0]
                compiled_scan[name] = (compiled, args)
            elif name == "factored":
                # Unrolled layers are timed too: a layer scan's per-step weight
                # slicing and gradient stacking cost wall time on CPU.
                compiled_scan["factored_unrolled"] = (compiled, args)
    res = {
        "flops_lora": out["flops_xla_factored_unrolled"],
        "flops_materialize": out["flops_xla_materialize_unrolled"],
        "flops_full": out["flops_xla_full_unrolled"],
        "bytes_lora": out["bytes_factored_scan"],
        "bytes_materialize": out["bytes_materialize_scan"],
        "bytes_full": out["bytes_full_scan"],
        "adapted_weight_bytes": out["adapted_weight_bytes"],
        "weight_sized_temps_lora": out["weight_sized_temps_factored_unrolled"],
        "compile_s": out["compile_s_factored_scan"],
    }
    res["ratio_flops_lora_over_full"] = res["flops_lora"] / res["flops_full"]
    res["ratio_flops_materialize_over_full"] = res["flops_materialize"] / res["flops_full"]
    times: dict[str, list[float]] = {k: [] for k in (*compiled_scan, "torch_peft")}
    worker, note, spec = None, "not timed (--steps=0)", None
    if cfg.steps > 0:
        note = "disabled (--torch=false)"
        if cfg.torch:
            spec = _harness.torch_model_spec(mcfg, ids_np, gguf)
            worker, note = _harness.torch_worker(
                {**spec, "lora": {"rank": cfg.rank, "alpha": cfg.alpha}, "adamw": True})
            note = note or f"torch {worker.version} + peft LoRA"

        def run_jax(name, i):
            compiled, args = compiled_scan[name]
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args, ids))
            if i >= cfg.warmup:
                times[name].append(time.perf_counter() - t)

        def run_torch(i):
            s, _ = worker.step()
            if i >= cfg.warmup:
                times["torch_peft"].append(s)

        try:
            if cfg.order == "interleaved":
                for i in range(cfg.warmup + cfg.steps):
                    for name in compiled_scan:
                        run_jax(name, i)
                    if worker is not None:
                        run_torch(i)
            else:  # blocked: all steps of one variant, then the next
                for name in compiled_scan:
                    for i in range(cfg.warmup + cfg.steps):
                        run_jax(name, i)
                if worker is not None:
                    for i in range(cfg.warmup + cfg.steps):
                        run_torch(i)
        finally:
            if worker is not None:
                worker.close()
            if spec is not None:
                os.unlink(spec["ids"])
    med = _harness.median
    res.update({
        "step_s_lora": med(times["factored"]), "step_s_materialize": med(times["materialize"]),
        "step_s_full": med(times["full"]), "step_s_torch_peft": med(times["torch_peft"]),
        "step_s_lora_unrolled": med(times["factored_unrolled"]),
        "tokens_per_s_lora": (cfg.batch * cfg.seq_len / med(times["factored"])
                              if times["factored"] else None),
        "step_s_min": {k: min(v) if v else None for k, v in times.items()},
        "times": times, "torch_note": note, "details": out,
        "config": dataclasses.asdict(cfg),
        "model": _harness.TINY_MODEL if cfg.smoke else
                 "SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32",
        "versions": _harness.machine(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })
    _harness.write_json(cfg.json, res)
    return res


def _parse(argv: list[str]) -> Config:
    cfg = train.parse_config(Config, argv, smoke=SMOKE)
    if cfg.order not in ("interleaved", "blocked"):
        raise SystemExit(f"--order must be 'interleaved' or 'blocked', got {cfg.order!r}")
    return cfg


if __name__ == "__main__":
    r = main(_parse(sys.argv[1:]))
    keys = [k for k in r if k not in ("times", "details", "config", "versions")]
    print(json.dumps({k: r[k] for k in keys}, indent=1))
