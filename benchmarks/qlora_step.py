# SPDX-License-Identifier: Apache-2.0
"""QLoRA-style step on SmolLM2-135M: LoRA on a quantised frozen base vs a float one.

Question: does keeping the frozen base as the GGUF file's own Q4_1/Q8_0 blocks
(``peftjax.quant``, dequantised a tile at a time inside each matmul by
``peftjax.factored``) shrink the base held on the device to <= 0.3x the float32
base, and what does the step cost in memory and time?

How: SmolLM2-135M-Instruct from the offline GGUF, loaded twice in the scanned
layout: dequantised to float32 (``load_llama_params``) and kept quantised
(``keep_quantized=True``: 210 Q4_1 kernels, the Q8_0 embedding that is also the
tied head; norms stay float32). Batch 4 x 128, LoRA r=8 alpha=16 on q,k,v,o,
AdamW, one jitted ``train.trainer`` step (factored) per base. Reported:
``base_bytes_float`` / ``base_bytes_quant`` (bytes of the frozen base as held
on the device, 4-bit types packed; ``quant.nbytes``), ``bytes_step_*``
(``argument + output + temp - alias`` of the compiled step), the number of
HLO instructions producing a float array of a quantised kernel's shape
(stacked, per layer or transposed; 0: no float copy of a kernel), and with
timing the median step times after ``--warmup`` (interleaved float, quant).
``--no_time`` compiles only and writes nulls for the times. Load averages are
recorded before and after: timings from a loaded machine are not comparable. The weights are a 4-bit
quantisation: losses are not comparable with published SmolLM2 figures.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/qlora_step.py --json=OUT
    .venv/bin/python benchmarks/qlora_step.py --no_time --json=OUT   # bytes only
    .venv/bin/python benchmarks/qlora_step.py --smoke --no_time      # tiny model
    .venv/bin/python benchmarks/qlora_step.py --help                 # every option
"""

import dataclasses
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
TARGETS = r"layers/self_attn/(q|k|v|o)_proj/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    """QLoRA-style step on SmolLM2-135M: LoRA on a quantised frozen base vs a float one."""

    batch: int = opt(4, "Sequences per step.")
    seq_len: int = opt(128, "Tokens per sequence (the ids hold one more for the targets).")
    rank: int = opt(8, "LoRA rank on q, k, v, o.")
    alpha: float = opt(16.0, "LoRA alpha (scaling alpha / rank).")
    steps: int = opt(5, "Timed steps per base after the warm-up.")
    warmup: int = opt(2, "Untimed steps before the timed ones.")
    no_time: bool = opt(False, "Compile only; the times are written as nulls.")
    smoke: bool = opt(False, "Tiny random Llama and small shapes (seconds).")
    json: str = opt("", "Write the result to this JSON file.")
    seed: int = opt(0, "Seed of the tiny model, the token ids and the adapters.")


SMOKE = {"batch": 2, "seq_len": 16, "warmup": 1, "steps": 2}


def _bases(cfg):
    """(model config, float32 params, quantised params), scanned layout."""
    from peftjax import models as pm
    from peftjax import quant, tree
    from peftjax.models import llama

    if not cfg.smoke:
        path = pm.smollm2_gguf()
        mcfg, qp = llama.load_llama_params(path, keep_quantized=True)
        _, fp = llama.load_llama_params(path)
        return mcfg, tree.stack_layers(fp), tree.stack_layers(qp)
    mcfg, fp = _harness.tiny_model(cfg.seed, scan_layers=True)
    qp = quant.quantize_params(fp, [
        tree.Rule(where="embed_tokens/embedding", then=quant.q8_0(axis=-1)),
        tree.Rule(where=r".*_proj/kernel", then=quant.q4_1())])
    return mcfg, fp, qp


def _float_kernel_buffers(text, shapes):
    """HLO instructions (not parameters) producing a float array of a kernel's shape."""
    out = []
    for ln in text.splitlines():
        m = re.search(r"= (f16|bf16|f32|f64)\[([\d,]*)\]", ln)
        if m and " parameter(" not in ln:
            if tuple(int(d) for d in m.group(2).split(",") if d) in shapes:
                out.append(ln.strip()[:160])
    return out


def main(cfg: Config) -> dict:
    """Runs the benchmark; returns (and optionally writes) the result dict."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from peftjax import adapters, quant, tree
    from peftjax.models import llama

    load_before = os.getloadavg()
    mcfg, fp, qp = _bases(cfg)
    gdef = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        mcfg, scan_layers=True, rngs=nnx.Rngs(0))))
    loss_fn = _harness.lm_loss(gdef)

    ids = jnp.asarray(np.random.default_rng(cfg.seed).integers(
        0, mcfg.vocab_size, (cfg.batch, cfg.seq_len + 1)), jnp.int32)
    opt = optax.adamw(1e-4)
    assignment = tree.assign(quant.abstract(qp), [tree.Rule(
        where=TARGETS, then=adapters.lora(cfg.rank, alpha=cfg.alpha))])
    state = adapters.init(assignment, jax.random.key(cfg.seed), quant.abstract(qp))
    trainer = train.trainer(loss_fn, opt, adapters=assignment, donate=False)  # factored
    ts = trainer.init(jax.random.key(cfg.seed), qp, state=state)

    def step(ts, base, ids):
        ts, metrics = trainer.step(ts, ids, base)
        return ts, metrics["loss"]

    # A quantised kernel's float shape: stacked, per layer, and transposed.
    shapes = set()
    for x in dict(tree.flatten(qp, is_leaf=quant.is_quantized)).values():
        if quant.is_quantized(x):
            for sh in (x.shape, x.shape[-2:]):
                shapes |= {tuple(sh), tuple(sh[:-2]) + tuple(sh[-2:][::-1])}
    out = {"base_bytes_float": quant.nbytes(fp), "base_bytes_quant": quant.nbytes(qp)}
    ratio = out["base_bytes_quant"] / out["base_bytes_float"]
    out["ratio_base_quant_over_float"] = ratio
    out["target_met"] = out["ratio_base_quant_over_float"] <= 0.3
    compiled, details = {}, {}
    for name, base in (("float", fp), ("quant", qp)):
        t = time.perf_counter()
        c = jax.jit(step).lower(ts, base, ids).compile()
        details[f"compile_s_{name}"] = time.perf_counter() - t
        mem = c.memory_analysis()
        out[f"bytes_step_{name}"] = _harness.step_bytes(c)
        details[f"argument_bytes_{name}"] = int(mem.argument_size_in_bytes)
        details[f"temp_bytes_{name}"] = int(mem.temp_size_in_bytes)
        bufs = _float_kernel_buffers(c.as_text(), shapes)
        details[f"float_kernel_buffers_{name}"] = len(bufs)
        details[f"float_kernel_buffer_examples_{name}"] = bufs[:4]
        compiled[name] = (c, base)
    out["float_kernel_buffers_quant"] = details["float_kernel_buffers_quant"]

    times: dict[str, list[float]] = {"float": [], "quant": []}
    losses = {}
    if not cfg.no_time:
        for i in range(cfg.warmup + cfg.steps):
            for name, (c, base) in compiled.items():
                t = time.perf_counter()
                _, loss = jax.block_until_ready(c(ts, base, ids))
                if i >= cfg.warmup:
                    times[name].append(time.perf_counter() - t)
                losses[name] = float(loss)

    med = _harness.median
    out.update({
        "step_s_lora_float": med(times["float"]),
        "step_s_lora_quant": med(times["quant"]),
        "step_s_min": {k: min(v) if v else None for k, v in times.items()},
        "times": times, "loss": losses, "details": details,
        "config": dataclasses.asdict(cfg),
        "model": _harness.TINY_MODEL if cfg.smoke else
                 "SmolLM2-135M-Instruct Q4_1/Q8_0 GGUF: blocks kept vs dequantised",
        "versions": _harness.machine(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })
    _harness.write_json(cfg.json, out)
    return out


def _parse(argv: list[str]) -> Config:
    return train.parse_config(Config, argv, smoke=SMOKE)


if __name__ == "__main__":
    r = main(_parse(sys.argv[1:]))
    print(json.dumps({k: r[k] for k in r if k not in ("times", "details", "config")},
                     indent=1))
