# SPDX-License-Identifier: Apache-2.0
"""The PyTorch side of the benchmarks, run in ``.venv-torch`` by ``_harness.py``.

Not imported by the JAX side (``.venv-torch`` has torch, transformers, peft
and galore-torch, but no JAX): ``_harness.torch_worker`` / ``run_torch``
start it as ``python _torch_worker.py '<spec as JSON>'``. ``spec["mode"]``:

* ``"serve"``: builds the model (the GGUF file ``spec["gguf"]`` dequantised
  to float32, or a random ``LlamaConfig(**spec["config"])`` seeded 0), wraps
  it in PEFT LoRA on q, k, v, o when ``spec["lora"]`` is ``{"rank", "alpha"}``,
  adds AdamW (lr 1e-4, trainable parameters only) when ``spec["adamw"]``,
  prints ``{"ready": true, "torch": version}``, then answers each ``step``
  line on stdin with ``{"seconds", "loss"}`` of one step on the token ids
  in ``spec["ids"]`` (a ``.npy`` file, labels = inputs). It computes only
  when asked, so torch and JAX never run at the same time. Timed: forward,
  backward and the optimizer step (gradients are cleared before the timer).
* ``"profile"``: the same model and step, ``spec["warmup"]`` untimed steps,
  then ``spec["steps"]`` steps under ``torch.profiler``; prints ``{"torch",
  "walls", "ops"}`` (self CPU microseconds, calls and FLOPs per op).
* ``"galore"``: galore-torch's ``GaLoreAdamW.step`` alone on random
  gradients of the shapes ``spec["mats"]`` (``[slices, in, out]`` each),
  rank ``spec["rank"]``, no refresh after the first step; prints the median
  seconds of ``spec["steps"]`` steps.

Threads: ``BENCH_TORCH_THREADS`` (default 2).
"""

import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types

import numpy as np
import torch


def _model(spec):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.get("gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(spec["gguf"]), gguf_file=os.path.basename(spec["gguf"]),
            dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**spec["config"])).float()
    if spec.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=spec["lora"]["rank"], lora_alpha=spec["lora"]["alpha"], lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    return model


def _step_fn(spec):
    """``step() -> (seconds, loss)`` of one training step of the spec's model."""
    model = _model(spec)
    opt = (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
           if spec.get("adamw") else None)
    ids = torch.from_numpy(np.load(spec["ids"]))

    def step():
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
        return time.perf_counter() - t, float(loss)

    return step


def serve(spec):
    step = _step_fn(spec)
    print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        s, loss = step()
        print(json.dumps({"seconds": s, "loss": loss}), flush=True)


def profile(spec):
    step = _step_fn(spec)
    for _ in range(spec["warmup"]):
        step()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(spec["steps"]):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    ops = {e.key: {"self_us": e.self_cpu_time_total, "count": e.count,
                   "flops": getattr(e, "flops", 0) or 0} for e in prof.key_averages()}
    print(json.dumps({"torch": torch.__version__, "walls": walls, "ops": ops}))


def galore(spec):
    # galore_torch.adamw alone, without running the package's __init__
    d = importlib.util.find_spec("galore_torch").submodule_search_locations[0]
    pkg = types.ModuleType("_galore_torch")
    pkg.__path__ = [d]
    sys.modules["_galore_torch"] = pkg
    adamw = importlib.import_module("_galore_torch.adamw")
    ps = [torch.nn.Parameter(torch.zeros(o, i)) for s, i, o in spec["mats"] for _ in range(s)]
    opt = adamw.AdamW([{"params": ps, "rank": spec["rank"], "update_proj_gap": 10**9,
                        "scale": 0.25, "proj_type": "std"}], lr=1e-3,
                      no_deprecation_warning=True)
    ts = []
    for _ in range(spec["steps"] + 1):
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        t = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t)
    print(statistics.median(ts[1:]))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "2")))
    SPEC = json.loads(sys.argv[1])
    {"serve": serve, "profile": profile, "galore": galore}[SPEC["mode"]](SPEC)
