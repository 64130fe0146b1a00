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

Output (``--json=OUT``): per-step milliseconds per category for both sides,
the top operations, effective matmul GFLOP/s, and the wall time of the
profiled steps.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/profile_lora_step.py --json=OUT
    .venv/bin/python benchmarks/profile_lora_step.py --smoke   # tiny model, seconds
    .venv/bin/python benchmarks/profile_lora_step.py --help    # every option
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (benchmarks/_harness.py)
import lora_step  # noqa: E402  (the same model, data and step)

from peftjax import train  # noqa: E402

opt = train.option


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
    """Where the time of a LoRA step goes: XLA (peftjax factored) vs torch (HF PEFT)."""

    batch: int = opt(4, "Sequences per step.")
    seq_len: int = opt(128, "Tokens per sequence (the ids hold one more for the targets).")
    rank: int = opt(8, "LoRA rank on q, k, v, o.")
    alpha: float = opt(16.0, "LoRA alpha (scaling alpha / rank).")
    steps: int = opt(3, "Profiled steps per side after the warm-up.")
    warmup: int = opt(2, "Unprofiled steps before the profiled ones.")
    scan: bool = opt(True, "Scanned layers (false: unrolled) on the peftjax side.")
    torch: bool = opt(True, "Profile torch PEFT in a .venv-torch worker too.")
    smoke: bool = opt(False, "Tiny random Llama and small shapes (seconds).")
    json: str = opt("", "Write the result to this JSON file.")
    seed: int = opt(0, "Seed of the tiny model, the token ids and the adapters.")
    top: int = opt(25, "Operations listed per side, slowest first.")


SMOKE = {"batch": 2, "seq_len": 16, "warmup": 1, "steps": 2}


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
    if not _harness.torch_ready():
        return {"note": "no .venv-torch (make bench-env)"}
    spec = _harness.torch_model_spec(mcfg, ids_np, gguf)
    try:
        res = json.loads(_harness.run_torch({
            **spec, "mode": "profile", "lora": {"rank": cfg.rank, "alpha": cfg.alpha},
            "adamw": True, "steps": cfg.steps, "warmup": cfg.warmup}))
    finally:
        os.unlink(spec["ids"])
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
    load_before = os.getloadavg()
    jx, (mcfg, ids_np, gguf) = profile_jax(cfg)
    th = profile_torch(cfg, mcfg, ids_np, gguf) if cfg.torch else {"note": "disabled"}
    res = {"jax": jx, "torch": th, "config": dataclasses.asdict(cfg),
           "versions": _harness.machine(),
           "model": _harness.TINY_MODEL if cfg.smoke else
                    "SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32",
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "date": time.strftime("%Y-%m-%d")}
    _harness.write_json(cfg.json, res)
    return res


def _parse(argv: list[str]) -> Config:
    return train.parse_config(Config, argv, smoke=SMOKE)


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
