# SPDX-License-Identifier: Apache-2.0
"""Full fine-tuning step of SmolLM2-135M: peftjax (JAX) vs transformers (torch).

Question: is peftjax's own Llama as fast as transformers' torch model for a
full forward+backward step (fp32, batch 4 x 128 on CPU), and does scanning
over layers cut compile time to <= 1/3 of the unrolled model's?

How: SmolLM2-135M-Instruct is loaded from the offline Q4_1 GGUF (dequantised
to float32) on both sides. Steps are timed interleaved, never concurrently:
one peftjax step (scanned layers), one peftjax step (unrolled), one torch step
in a worker process of the side virtualenv (``.venv-torch``, see ``make
bench-env``) that only runs when asked. Medians and minimums over ``--steps``
timed steps after ``--warmup`` untimed ones. Compile seconds come from
``jit(...).lower(...).compile()`` of each layout; FLOPs from the unrolled
compile's ``cost_analysis()`` (XLA counts a scan body once, so the scanned
figure is reported separately together with a loop-aware jaxpr count, and
the two full counts are checked to agree). ``os.getloadavg()`` is recorded
before and after: numbers taken on a loaded machine are not comparable.

Output keys (JSON): ``step_s_peftjax`` (median, scanned), ``step_s_torch``
(median, ``null`` without a torch side environment), ``compile_s_scan``,
``compile_s_unrolled``, ``flops``, plus minimums, the unrolled step, ratios,
the configuration, versions and load averages.

Usage::

    OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python \\
        benchmarks/model_step.py --json benchmarks/out/model_step.json
    .venv/bin/python benchmarks/model_step.py --smoke   # tiny random model, seconds
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")

# The torch worker: reads commands on stdin, answers one JSON line per command.
# It runs only when asked, so torch and JAX never compute at the same time.
TORCH_WORKER = r"""
import json, os, sys, time
import numpy as np
import torch
torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
spec = json.loads(sys.argv[1])
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
if spec["gguf"]:
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(spec["gguf"]), gguf_file=os.path.basename(spec["gguf"]),
        dtype=torch.float32)
else:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).float()
model.train()
ids = torch.from_numpy(np.load(spec["ids"]))
def step():
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return time.perf_counter() - t, float(loss)
print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    if line.strip() == "step":
        s, l = step()
        print(json.dumps({"seconds": s, "loss": l}), flush=True)
    else:
        break
"""


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark configuration (``--field=value`` on the command line)."""

    batch: int = 4
    seq_len: int = 128
    steps: int = 5
    warmup: int = 2
    torch: bool = True
    smoke: bool = False
    json: str = ""
    seed: int = 0


def _tiny_config():
    from peftjax.models import llama

    return llama.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def _load_params(cfg: Config):
    """Returns ``(model config, unrolled pure params, gguf path or None)``."""
    import jax
    from flax import nnx

    from peftjax import models as pm
    from peftjax.models import llama

    if not cfg.smoke:
        path = pm.smollm2_gguf()
        mcfg, params = llama.load_llama_params(path)
        return mcfg, params, path
    mcfg = _tiny_config()
    model = llama.LlamaForCausalLM(mcfg, rngs=nnx.Rngs(cfg.seed))
    _, params = pm.split_params(model)
    return mcfg, jax.tree.map(lambda x: x, params), None


def _step_fn(graphdef):
    import jax
    import jax.numpy as jnp

    from peftjax import models as pm

    def loss(params, ids):
        logits = pm.apply(graphdef, params, ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return jax.value_and_grad(loss)


def _compile(step, params, ids):
    import jax

    t = time.perf_counter()
    lowered = jax.jit(step).lower(params, ids)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t


def _flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned a list of dicts
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def _torch_worker(mcfg, ids_path: str, gguf: str | None):
    if not os.path.exists(os.path.join(ROOT, ".venv-torch", ".ready")):
        return None, "no torch side environment (.venv-torch/.ready missing)"
    hf = mcfg.to_hf()
    spec = {
        "gguf": gguf,
        "ids": ids_path,
        "config": {
            k: hf[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "rope_theta",
                "tie_word_embeddings",
                "max_position_embeddings",
            )
        },
    }
    env = dict(
        os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    proc = subprocess.Popen(
        [TORCH_PY, "-c", TORCH_WORKER, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    first = proc.stdout.readline()
    if not first:
        proc.wait()
        return None, f"torch worker failed to start (exit {proc.returncode})"
    return (proc, json.loads(first)["torch"]), None


def _torch_step(worker) -> tuple[float, float]:
    proc = worker[0]
    proc.stdin.write("step\n")
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())
    return reply["seconds"], reply["loss"]


def main(cfg: Config) -> dict:
    """Runs the benchmark; returns (and optionally writes) the result dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from peftjax import tree
    from peftjax.models import llama

    load_before = os.getloadavg()
    mcfg, unrolled, gguf = _load_params(cfg)
    rng = np.random.default_rng(cfg.seed)
    ids_np = rng.integers(
        0, mcfg.vocab_size, (cfg.batch, cfg.seq_len + 1), dtype=np.int64
    )
    ids = jnp.asarray(ids_np, jnp.int32)

    def graphdef(scan: bool):
        abstract = nnx.eval_shape(
            lambda: llama.LlamaForCausalLM(mcfg, scan_layers=scan, rngs=nnx.Rngs(0))
        )
        return nnx.graphdef(abstract)

    scanned = tree.stack_layers(unrolled)
    step_scan, step_unrolled = _step_fn(graphdef(True)), _step_fn(graphdef(False))
    compiled_scan, compile_s_scan = _compile(step_scan, scanned, ids)
    compiled_unrolled, compile_s_unrolled = _compile(step_unrolled, unrolled, ids)
    flops = _flops_of(compiled_unrolled)
    flops_scan_xla = _flops_of(compiled_scan)
    report = importlib.import_module("peftjax.report")
    flops_scan_jaxpr, _ = report.jaxpr_flops(step_scan, scanned, ids)
    flops_unrolled_jaxpr, _ = report.jaxpr_flops(step_unrolled, unrolled, ids)

    worker, torch_note = (None, "disabled (--torch=false)")
    ids_file = None
    if cfg.torch:
        with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
            ids_file = f.name
        np.save(ids_file, ids_np)
        worker, torch_note = _torch_worker(mcfg, ids_file, gguf)

    times: dict[str, list[float]] = {"scan": [], "unrolled": [], "torch": []}
    losses: dict[str, float] = {}
    try:
        for i in range(cfg.warmup + cfg.steps):
            t0 = time.perf_counter()
            out_scan = jax.block_until_ready(compiled_scan(scanned, ids))
            t_scan = time.perf_counter() - t0
            t0 = time.perf_counter()
            out_unrolled = jax.block_until_ready(compiled_unrolled(unrolled, ids))
            t_unr = time.perf_counter() - t0
            t_torch = None
            if worker is not None:
                t_torch, losses["torch"] = _torch_step(worker)
            if i >= cfg.warmup:
                times["scan"].append(t_scan)
                times["unrolled"].append(t_unr)
                if t_torch is not None:
                    times["torch"].append(t_torch)
            losses["scan"] = float(out_scan[0])
            losses["unrolled"] = float(out_unrolled[0])
    finally:
        if worker is not None:
            worker[0].stdin.close()
            worker[0].wait(timeout=60)
        if ids_file is not None:
            os.unlink(ids_file)

    def med(xs):
        return statistics.median(xs) if xs else None

    result = {
        "step_s_peftjax": med(times["scan"]),
        "step_s_torch": med(times["torch"]),
        "compile_s_scan": compile_s_scan,
        "compile_s_unrolled": compile_s_unrolled,
        "flops": flops,
        "step_s_peftjax_min": min(times["scan"]),
        "step_s_peftjax_unrolled": med(times["unrolled"]),
        "step_s_peftjax_unrolled_min": min(times["unrolled"]),
        "step_s_torch_min": min(times["torch"]) if times["torch"] else None,
        "ratio_peftjax_over_torch": (
            med(times["scan"]) / med(times["torch"]) if times["torch"] else None
        ),
        "ratio_compile_scan_over_unrolled": compile_s_scan / compile_s_unrolled,
        "flops_scan_xla_body_once": flops_scan_xla,
        "flops_jaxpr_scan": flops_scan_jaxpr,
        "flops_jaxpr_unrolled": flops_unrolled_jaxpr,
        # Same matmuls; the layouts differ only in a few elementwise ops.
        "flops_jaxpr_agree": abs(flops_scan_jaxpr - flops_unrolled_jaxpr)
        <= 1e-2 * flops_unrolled_jaxpr,
        "flops_xla_agrees_with_jaxpr": abs(flops - flops_unrolled_jaxpr)
        <= 5e-2 * flops_unrolled_jaxpr,
        "flops_xla_over_jaxpr": flops / flops_unrolled_jaxpr,
        "losses": losses,
        # Same GGUF weights and tokens on both sides: the losses must agree.
        "losses_agree": (
            None
            if "torch" not in losses or cfg.smoke
            else abs(losses["torch"] - losses["scan"]) <= 1e-3 * abs(losses["torch"])
        ),
        "times": times,
        "torch_note": torch_note if worker is None else f"torch {worker[1]}",
        "config": dataclasses.asdict(cfg),
        "model": "tiny random Llama (smoke)"
        if cfg.smoke
        else "SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


def _parse(argv: list[str]) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ap.add_argument(
                f"--{field.name}",
                nargs="?",
                const="true",
                default=str(field.default).lower(),
            )
        else:
            ap.add_argument(
                f"--{field.name}", default=field.default, type=type(field.default)
            )
    ns = vars(ap.parse_args(argv))
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ns[field.name] = str(ns[field.name]).lower() in ("1", "true", "yes")
    cfg = Config(**ns)
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, batch=2, seq_len=16, steps=2, warmup=1)
    return cfg


if __name__ == "__main__":
    res = main(_parse(sys.argv[1:]))
    keys = (
        "step_s_peftjax",
        "step_s_torch",
        "compile_s_scan",
        "compile_s_unrolled",
        "flops",
        "ratio_peftjax_over_torch",
        "ratio_compile_scan_over_unrolled",
        "flops_jaxpr_agree",
        "loadavg_before",
        "loadavg_after",
        "torch_note",
    )
    print(json.dumps({k: res[k] for k in keys}, indent=1))
