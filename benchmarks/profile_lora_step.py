# SPDX-License-Identifier: Apache-2.0
"""Where the time of a LoRA step goes: XLA (peftjax factored) vs torch (HF PEFT).

Question: ``benchmarks/lora_step.py`` measured peftjax's factored LoRA step on
SmolLM2-135M a few percent slower than Hugging Face PEFT on torch. Which
operations account for the difference?

How: the same step as ``lora_step.py`` (SmolLM2-135M from the offline GGUF,
float32, batch 4 x 128, LoRA r=8 alpha=16 on q,k,v,o, AdamW; scanned layers
unless ``--scan=false``). peftjax side: ``jax.profiler`` traces ``--steps``
steps after warm-up; every XLA CPU thunk event carries its HLO instruction
name, which is looked up in ``compiled.as_text()`` and put in a category
(matmul, attention matmul, reductions, elementwise, data movement, ...);
FLOPs per category come from the dot shapes. Containers (``while``, ``call``,
``conditional``) are reported apart, since their time includes their body's.
torch side (in ``.venv-torch``): ``torch.profiler`` over the same number of
steps, self CPU time per ``aten::`` op, in the same categories. Both run in
one invocation, one after the other, each with two threads; the load average
is recorded (figures from a loaded machine are not comparable).

Output (``--json OUT``): per-step milliseconds per category for both sides,
the top operations, effective matmul GFLOP/s, and the wall time of the
profiled steps.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/profile_lora_step.py --json OUT
    .venv/bin/python benchmarks/profile_lora_step.py --smoke   # tiny model, seconds
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import lora_step  # noqa: E402  (the same model, data and step)

TORCH_PROFILE = r'''
import json, os, sys, time, collections
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
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
for _ in range(spec["warmup"]):
    step()
walls = []
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(spec["steps"]):
        t = time.perf_counter(); step(); walls.append(time.perf_counter() - t)
ops = {}
for e in prof.key_averages():
    ops[e.key] = {"self_us": e.self_cpu_time_total, "count": e.count,
                  "flops": getattr(e, "flops", 0) or 0}
print(json.dumps({"torch": torch.__version__, "walls": walls, "ops": ops}))
'''

# torch op -> category (self CPU time; the rest is "other").
TORCH_CATEGORIES = [
    (r"aten::(mm|addmm|bmm|baddbmm)$", "matmul"),
    (r"aten::_scaled_dot_product|aten::_flash_attention|flash_attention", "attention (fused)"),
    (r"aten::(_log_softmax|_log_softmax_backward_data|nll_loss|nll_loss_forward|"
     r"nll_loss_backward|_softmax|_softmax_backward_data)", "softmax / cross-entropy"),
    (r"aten::(sum|mean|pow|rsqrt|norm|_foreach_norm)", "reductions / norms"),
    (r"aten::(copy_|clone|contiguous|cat|t|transpose|view|reshape|permute|expand|"
     r"index_select|embedding|embedding_dense_backward|index|slice|select|unsqueeze|"
     r"_unsafe_view|as_strided|empty|empty_like|zeros|zeros_like|fill_|zero_|"
     r"new_empty|new_zeros|embedding_backward|index_add_|index_put_|_to_copy|to)", "data movement"),
    (r"aten::_foreach|Optimizer|aten::(lerp_|addcmul_|addcdiv_|sqrt|_fused_adamw_)", "optimizer"),
    (r"aten::", "elementwise / other aten"),
]


@dataclasses.dataclass(frozen=True)
class Config:
    """Profile configuration (``--field=value``)."""

    batch: int = 4
    seq_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    steps: int = 3
    warmup: int = 2
    scan: bool = True
    torch: bool = True
    smoke: bool = False
    json: str = ""
    seed: int = 0
    top: int = 25


def _shape(s: str) -> tuple[int, ...]:
    inner = s[s.index("[") + 1:s.index("]")]
    return tuple(int(d) for d in inner.split(",") if d)


class Hlo:
    """Instruction lines of an HLO module, by name, with their computations."""

    def __init__(self, text: str):
        self.line: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.comp_of: dict[str, str] = {}
        self.comps: dict[str, list[str]] = collections.defaultdict(list)
        comp = ""
        for raw in text.splitlines():
            ln = raw.strip()
            m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", ln)
            if m and "=" not in ln.split("{")[0]:
                comp = m.group(1)
                continue
            m = re.match(r"^(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", ln)
            if m:
                name = m.group(1)
                self.line[name] = ln
                self.shape[name] = tuple(int(d) for d in m.group(3).split(",") if d)
                self.comp_of[name] = comp
                self.comps[comp].append(name)
            elif re.match(r"^(?:ROOT )?%([\w.\-]+) = \(", ln):
                name = re.match(r"^(?:ROOT )?%([\w.\-]+)", ln).group(1)
                self.line[name] = ln
                self.comp_of[name] = comp
                self.comps[comp].append(name)

    def called(self, name: str) -> list[str]:
        """Computations an instruction calls (fusions, loops), recursively flattened."""
        ln = self.line.get(name, "")
        out = []
        for key in ("calls=", "body=", "condition=", "to_apply=", "branch_computations={"):
            for m in re.finditer(re.escape(key) + r"%?([\w.\-]+)", ln):
                out.append(m.group(1))
        return out

    def body_lines(self, name: str) -> list[str]:
        """Instruction lines inside what ``name`` calls (one level of fusion)."""
        lines = []
        for c in self.called(name):
            lines += [self.line[n] for n in self.comps.get(c, [])]
        return lines

    def dot_flops(self, ln: str) -> tuple[float, bool]:
        """(FLOPs, batched) of one ``dot`` line, from the output and lhs shapes."""
        m = re.match(r"^(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]", ln)
        out = [int(d) for d in m.group(1).split(",") if d]
        ops = re.search(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", ln)
        lhs = self.shape.get(ops.group(1), ()) if ops else ()
        cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ln)
        k = 1
        for d in (cd.group(1).split(",") if cd and cd.group(1) else []):
            k *= lhs[int(d)] if int(d) < len(lhs) else 1
        batched = bool(re.search(r"lhs_batch_dims=\{\d", ln))
        return 2.0 * float(np.prod(out)) * k, batched

    def classify(self, name: str) -> tuple[str, float]:
        """(category, FLOPs) of one executed instruction."""
        ln = self.line.get(name, "")
        op = re.search(r"= [^ ]+ ([\w\-]+)\(", ln)
        op = op.group(1) if op else ""
        container = re.search(r"\) (while|call|conditional)\(", ln)
        if container:
            op = container.group(1)
        if op in ("while", "call", "conditional"):
            return "container (" + op + ")", 0.0
        lines = [ln] + (self.body_lines(name) if op == "fusion" else [])
        dots = [x for x in lines if re.search(r" dot\(", x)]
        if dots or "__onednn$matmul" in ln or "__ynn" in ln and dots:
            flops, batched = 0.0, False
            for d in dots:
                f, b = self.dot_flops(d)
                flops, batched = flops + f, batched or b
            return ("attention matmul (batched dot)" if batched else "matmul"), flops
        body = " ".join(lines)
        if op in ("copy", "transpose", "concatenate", "slice", "dynamic-slice",
                  "dynamic-update-slice", "pad", "gather", "scatter", "broadcast"):
            return "data movement", 0.0
        if re.search(r" (scatter|gather|dynamic-update-slice|dynamic-slice)\(", body):
            return "data movement", 0.0
        if re.search(r" reduce\(", body):
            if re.search(r" (exponential|log)\(", body):
                return "softmax / cross-entropy (reduce+exp/log)", 0.0
            return "reductions / norms", 0.0
        if op == "fusion" or op in ("add", "multiply", "exponential", "divide", "select",
                                    "convert", "rsqrt", "maximum", "subtract", "negate"):
            return "elementwise", 0.0
        return "other (" + (op or "?") + ")", 0.0


def profile_jax(cfg: Config):
    """Traces the compiled factored step; returns per-category ms/step and top ops."""
    import jax
    import jax.numpy as jnp

    from peftjax import tree

    lcfg = lora_step.Config(batch=cfg.batch, seq_len=cfg.seq_len, rank=cfg.rank,
                            alpha=cfg.alpha, smoke=cfg.smoke, seed=cfg.seed)
    mcfg, params, gguf = lora_step._params(lcfg)
    if cfg.scan:
        params = tree.stack_layers(params)
    ids_np = np.random.default_rng(cfg.seed).integers(
        0, mcfg.vocab_size, (cfg.batch, cfg.seq_len + 1), dtype=np.int64)
    ids = jnp.asarray(ids_np, jnp.int32)
    _, steps = lora_step._steps(mcfg, params, cfg.scan, lcfg)
    fn, args = steps["factored"]
    compiled = jax.jit(fn).lower(*args, ids).compile()
    hlo = Hlo(compiled.as_text())
    for _ in range(cfg.warmup):
        jax.block_until_ready(compiled(*args, ids))
    trace_dir = tempfile.mkdtemp(prefix="peftjax-trace-")
    walls = []
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        for _ in range(cfg.steps):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args, ids))
            walls.append(time.perf_counter() - t)
    finally:
        jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    shutil.rmtree(trace_dir, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op and not e["name"].startswith("end:"):
            per_op[op][0] += e.get("dur", 0.0)
            per_op[op][1] += 1
    cats: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"ms_per_step": 0.0, "gflop_per_step": 0.0, "ops": 0})
    top = []
    flops_once = {}
    for op, (us, count) in per_op.items():
        cat, flops = hlo.classify(op)
        calls_per_step = count / cfg.steps
        flops_once[op] = flops
        c = cats[cat]
        c["ms_per_step"] += us / 1e3 / cfg.steps
        c["gflop_per_step"] += flops * calls_per_step / 1e9
        c["ops"] += 1
        top.append({"op": op, "category": cat, "ms_per_step": us / 1e3 / cfg.steps,
                    "calls_per_step": calls_per_step, "gflop_per_call": flops / 1e9,
                    "hlo": hlo.line.get(op, "")[:200]})
    top.sort(key=lambda r: -r["ms_per_step"])
    for c in cats.values():
        c["gflop_per_s"] = (c["gflop_per_step"] / (c["ms_per_step"] / 1e3)
                            if c["ms_per_step"] > 0 and c["gflop_per_step"] > 0 else None)
    leaf_ms = sum(c["ms_per_step"] for k, c in cats.items() if not k.startswith("container"))
    return {"wall_s": walls, "categories": dict(cats), "ops_ms_per_step": leaf_ms,
            "top": top[:cfg.top], "xla_flops": float(compiled.cost_analysis()["flops"])}, (
        mcfg, ids_np, gguf)


def profile_torch(cfg: Config, mcfg, ids_np, gguf):
    """Runs the torch PEFT step under ``torch.profiler``; per-category ms/step."""
    torch_py = os.path.join(os.path.dirname(ROOT), ".venv-torch", "bin", "python")
    if not os.path.exists(os.path.join(os.path.dirname(ROOT), ".venv-torch", ".ready")):
        return {"note": "no .venv-torch (make bench-env)"}
    hf = mcfg.to_hf()
    with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
        np.save(f, ids_np)
    spec = {"gguf": gguf, "ids": f.name, "rank": cfg.rank, "alpha": cfg.alpha,
            "steps": cfg.steps, "warmup": cfg.warmup,
            "config": {k: hf[k] for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "rope_theta", "tie_word_embeddings", "max_position_embeddings")}}
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([torch_py, "-c", TORCH_PROFILE, json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=1800, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    cats: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"ms_per_step": 0.0, "ops": 0})
    top = []
    for name, o in res["ops"].items():
        cat = next((c for pat, c in TORCH_CATEGORIES if re.search(pat, name)), "other")
        ms = o["self_us"] / 1e3 / cfg.steps
        cats[cat]["ms_per_step"] += ms
        cats[cat]["ops"] += 1
        top.append({"op": name, "category": cat, "ms_per_step": ms,
                    "calls_per_step": o["count"] / cfg.steps})
    top.sort(key=lambda r: -r["ms_per_step"])
    return {"torch": res["torch"], "wall_s": res["walls"], "categories": dict(cats),
            "ops_ms_per_step": sum(c["ms_per_step"] for c in cats.values()),
            "top": top[:cfg.top]}


def main(cfg: Config) -> dict:
    """Profiles both sides; returns (and optionally writes) the result."""
    import jax

    load_before = os.getloadavg()
    jx, (mcfg, ids_np, gguf) = profile_jax(cfg)
    th = profile_torch(cfg, mcfg, ids_np, gguf) if cfg.torch else {"note": "disabled"}
    res = {"jax": jx, "torch": th, "config": dataclasses.asdict(cfg),
           "versions": {"jax": jax.__version__},
           "model": "tiny random Llama (smoke)" if cfg.smoke else
                    "SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32",
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d")}
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return res


def _parse(argv: list[str]) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ap.add_argument(f"--{field.name}", nargs="?", const="true",
                            default=str(field.default).lower())
        else:
            ap.add_argument(f"--{field.name}", default=field.default, type=type(field.default))
    ns = vars(ap.parse_args(argv))
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ns[field.name] = str(ns[field.name]).lower() in ("1", "true", "yes")
    cfg = Config(**ns)
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, batch=2, seq_len=16, warmup=1, steps=2)
    return cfg


def _table(res: dict) -> str:
    rows = ["| category | peftjax (XLA) ms/step | matmul GFLOP/s | torch PEFT ms/step |",
            "|---|---:|---:|---:|"]
    jc, tc = res["jax"]["categories"], res["torch"].get("categories", {})
    for k in sorted(set(jc) | set(tc), key=lambda k: -(jc.get(k, {}).get("ms_per_step", 0)
                                                      + tc.get(k, {}).get("ms_per_step", 0))):
        j, t = jc.get(k, {}), tc.get(k, {})
        gf = j.get("gflop_per_s")
        rows.append(f"| {k} | {j.get('ms_per_step', 0):.1f} | "
                    f"{'' if gf is None else f'{gf:.1f}'} | {t.get('ms_per_step', 0):.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    r = main(_parse(sys.argv[1:]))
    print(_table(r))
    print("wall s/step: peftjax", r["jax"]["wall_s"], " torch", r["torch"].get("wall_s"))
    for side in ("jax", "torch"):
        print(f"\ntop {side} ops:")
        for t in r[side].get("top", [])[:12]:
            print(f"  {t['ms_per_step']:8.1f} ms  {t['category']:<30} {t['op']}")
