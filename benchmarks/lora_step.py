# SPDX-License-Identifier: Apache-2.0
"""LoRA training step on SmolLM2-135M: factored vs materialize vs full FT vs PEFT.

Question: does the factored path (``peftjax.factored``) make a LoRA step cheaper
than full fine-tuning (FLOPs <= 0.70x, no weight-sized temporaries of the
adapted kernels) and as fast as Hugging Face PEFT on torch?

How: SmolLM2-135M-Instruct from the offline Q4_1 GGUF (dequantised to
float32), batch 4 x 128, LoRA r=8 alpha=16 on q,k,v,o, AdamW. Three jitted
steps (differentiating only what each trains): ``full`` (every parameter,
tied embedding included), ``materialize`` (``adapters.make_train_step``) and
``factored`` (``exec.make_train_step``). FLOPs and the weight-sized-temporary
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

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/lora_step.py --json OUT
    .venv/bin/python benchmarks/lora_step.py --smoke --steps=0   # tiny model
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")
TARGETS = r"layers/(\d+/)?self_attn/(q|k|v|o)_proj/kernel"

TORCH_WORKER = r'''
import json, os, sys, time
import numpy as np
import torch
torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
spec = json.loads(sys.argv[1])
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
if spec["gguf"]:
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(spec["gguf"]), gguf_file=os.path.basename(spec["gguf"]),
        dtype=torch.float32)
else:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).float()
model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"],
    lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.from_numpy(np.load(spec["ids"]))
def step():
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return time.perf_counter() - t, float(loss)
print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    if line.strip() != "step":
        break
    s, l = step()
    print(json.dumps({"seconds": s, "loss": l}), flush=True)
'''


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark configuration (``--field=value`` on the command line)."""

    batch: int = 4
    seq_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    steps: int = 5
    warmup: int = 2
    torch: bool = True
    smoke: bool = False
    json: str = ""
    seed: int = 0
    order: str = "interleaved"


def _params(cfg):
    import jax
    from flax import nnx

    from peftjax import models as pm
    from peftjax.models import llama

    if not cfg.smoke:
        path = pm.smollm2_gguf()
        mcfg, params = llama.load_llama_params(path)
        return mcfg, params, path
    mcfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True)
    _, params = pm.split_params(llama.LlamaForCausalLM(mcfg, rngs=nnx.Rngs(cfg.seed)))
    return mcfg, jax.tree.map(lambda x: x, params), None


def _steps(mcfg, params, scan, cfg):
    """Returns {name: (step_fn, args)} for one layout."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from peftjax import adapters, factored, tree
    from peftjax import models as pm
    from peftjax.models import llama

    gdef = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        mcfg, scan_layers=scan, rngs=nnx.Rngs(0))))

    def loss_fn(p, ids):
        logits = pm.apply(gdef, p, ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    opt = optax.adamw(1e-4)
    assignment = tree.assign(params, [tree.Rule(
        where=TARGETS, then=adapters.lora(cfg.rank, alpha=cfg.alpha))])
    state = adapters.init(assignment, jax.random.key(cfg.seed), params)

    def full(p, o, ids):
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    t_opt = opt.init(state.trainable)
    lora_args = (state.trainable, t_opt, params, state.frozen)
    return assignment, {
        "full": (full, (params, opt.init(params))),
        "materialize": (adapters.make_train_step(assignment, loss_fn, opt), lora_args),
        "factored": (factored.make_train_step(assignment, loss_fn, opt), lora_args),
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
            mem = compiled.memory_analysis()
            key = f"{name}_{layout}"
            out[f"compile_s_{key}"] = secs
            out[f"bytes_{key}"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
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
    worker, note = None, "not timed (--steps=0)"
    if cfg.steps > 0:
        worker, note = _torch_worker(cfg, mcfg, ids_np, gguf) if cfg.torch else (
            None, "disabled (--torch=false)")
        def run_jax(name, i):
            compiled, args = compiled_scan[name]
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args, ids))
            if i >= cfg.warmup:
                times[name].append(time.perf_counter() - t)

        def run_torch(i):
            worker.stdin.write("step\n")
            worker.stdin.flush()
            s = json.loads(worker.stdout.readline())["seconds"]
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
                worker.stdin.close()
                worker.wait(timeout=60)

    def med(xs):
        return statistics.median(xs) if xs else None

    res.update({
        "step_s_lora": med(times["factored"]), "step_s_materialize": med(times["materialize"]),
        "step_s_full": med(times["full"]), "step_s_torch_peft": med(times["torch_peft"]),
        "step_s_lora_unrolled": med(times["factored_unrolled"]),
        "tokens_per_s_lora": (cfg.batch * cfg.seq_len / med(times["factored"])
                              if times["factored"] else None),
        "step_s_min": {k: min(v) if v else None for k, v in times.items()},
        "times": times, "torch_note": note, "details": out,
        "config": dataclasses.asdict(cfg),
        "model": "tiny random Llama (smoke)" if cfg.smoke else
                 "SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32",
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "backend": jax.default_backend()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return res


def _torch_worker(cfg, mcfg, ids_np, gguf):
    if not os.path.exists(os.path.join(ROOT, ".venv-torch", ".ready")):
        return None, "no torch side environment (.venv-torch/.ready missing)"
    hf = mcfg.to_hf()
    with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
        np.save(f, ids_np)
    spec = {"gguf": gguf, "ids": f.name, "rank": cfg.rank, "alpha": cfg.alpha,
            "config": {k: hf[k] for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "rope_theta", "tie_word_embeddings", "max_position_embeddings")}}
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([TORCH_PY, "-c", TORCH_WORKER, json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    first = proc.stdout.readline()
    if not first:
        proc.wait()
        return None, f"torch worker failed to start (exit {proc.returncode})"
    return proc, "torch " + json.loads(first)["torch"] + " + peft LoRA"


def _parse(argv: list[str]) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ap.add_argument(f"--{field.name}", nargs="?", const="true",
                            default=str(field.default).lower())
        else:
            ap.add_argument(f"--{field.name}", default=field.default,
                            type=type(field.default))
    ns = vars(ap.parse_args(argv))
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ns[field.name] = str(ns[field.name]).lower() in ("1", "true", "yes")
    cfg = Config(**ns)
    if cfg.order not in ("interleaved", "blocked"):
        ap.error(f"--order must be 'interleaved' or 'blocked', got {cfg.order!r}")
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, batch=2, seq_len=16, warmup=1,
                                  steps=min(cfg.steps, 2))
    return cfg


if __name__ == "__main__":
    r = main(_parse(sys.argv[1:]))
    keys = [k for k in r if k not in ("times", "details", "config", "versions")]
    print(json.dumps({k: r[k] for k in keys}, indent=1))
