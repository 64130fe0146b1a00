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
AdamW, one jitted ``exec.make_train_step`` per base. Reported:
``base_bytes_float`` / ``base_bytes_quant`` (bytes of the frozen base as held
on the device, 4-bit types packed; ``quant.nbytes``), ``bytes_step_*``
(``argument + output + temp - alias`` of the compiled step), the number of
HLO instructions producing a float array of a quantised kernel's shape
(stacked, per layer or transposed; 0: no float copy of a kernel), and with
timing the median step times after ``--warmup`` (interleaved float, quant).
``--no-time`` compiles only and writes nulls for the times. Load averages are recorded before and after:
timings from a loaded machine are not comparable. The weights are a 4-bit
quantisation: losses are not comparable with published SmolLM2 figures.

Usage::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/qlora_step.py --json OUT
    .venv/bin/python benchmarks/qlora_step.py --no-time --json OUT   # bytes only
    .venv/bin/python benchmarks/qlora_step.py --smoke --no-time      # tiny model
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TARGETS = r"layers/self_attn/(q|k|v|o)_proj/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark configuration (``--field=value`` on the command line)."""

    batch: int = 4
    seq_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    steps: int = 5
    warmup: int = 2
    no_time: bool = False
    smoke: bool = False
    json: str = ""
    seed: int = 0


def _bases(cfg):
    """(model config, float32 params, quantised params), scanned layout."""
    import jax
    from flax import nnx

    from peftjax import models as pm
    from peftjax import quant, tree
    from peftjax.models import llama

    if not cfg.smoke:
        path = pm.smollm2_gguf()
        mcfg, qp = llama.load_llama_params(path, keep_quantized=True)
        _, fp = llama.load_llama_params(path)
        return mcfg, tree.stack_layers(fp), tree.stack_layers(qp)
    mcfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True)
    _, fp = pm.split_params(llama.LlamaForCausalLM(mcfg, scan_layers=True,
                                                   rngs=nnx.Rngs(cfg.seed)))
    qp = quant.quantize_params(fp, [
        tree.Rule(where="embed_tokens/embedding", then=quant.q8_0(axis=-1)),
        tree.Rule(where=r".*_proj/kernel", then=quant.q4_1())])
    return mcfg, jax.tree.map(lambda x: x, fp), qp


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

    from peftjax import adapters, factored, quant, tree
    from peftjax import models as pm
    from peftjax.models import llama
    from peftjax.tree import _paths

    load_before = os.getloadavg()
    mcfg, fp, qp = _bases(cfg)
    gdef = nnx.graphdef(nnx.eval_shape(lambda: llama.LlamaForCausalLM(
        mcfg, scan_layers=True, rngs=nnx.Rngs(0))))

    def loss_fn(p, ids):
        logits = pm.apply(gdef, p, ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    ids = jnp.asarray(np.random.default_rng(cfg.seed).integers(
        0, mcfg.vocab_size, (cfg.batch, cfg.seq_len + 1)), jnp.int32)
    opt = optax.adamw(1e-4)
    assignment = tree.assign(quant.abstract(qp), [tree.Rule(
        where=TARGETS, then=adapters.lora(cfg.rank, alpha=cfg.alpha))])
    state = adapters.init(assignment, jax.random.key(cfg.seed), quant.abstract(qp))
    opt_state = opt.init(state.trainable)
    step = factored.make_train_step(assignment, loss_fn, opt)

    # A quantised kernel's float shape: stacked, per layer, and transposed.
    shapes = set()
    for x in dict(_paths.flatten(qp, is_leaf=quant.is_quantized)).values():
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
        c = jax.jit(step).lower(state.trainable, opt_state, base, state.frozen,
                                ids).compile()
        details[f"compile_s_{name}"] = time.perf_counter() - t
        mem = c.memory_analysis()
        out[f"bytes_step_{name}"] = int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
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
                _, _, loss = jax.block_until_ready(
                    c(state.trainable, opt_state, base, state.frozen, ids))
                if i >= cfg.warmup:
                    times[name].append(time.perf_counter() - t)
                losses[name] = float(loss)

    def med(xs):
        return statistics.median(xs) if xs else None

    out.update({
        "step_s_lora_float": med(times["float"]),
        "step_s_lora_quant": med(times["quant"]),
        "step_s_min": {k: min(v) if v else None for k, v in times.items()},
        "times": times, "loss": losses, "details": details,
        "config": dataclasses.asdict(cfg),
        "model": "tiny random Llama (smoke)" if cfg.smoke else
                 "SmolLM2-135M-Instruct Q4_1/Q8_0 GGUF: blocks kept vs dequantised",
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "backend": jax.default_backend()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


def _parse(argv: list[str]) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            ap.add_argument(flag, dest=field.name, nargs="?", const="true",
                            default=str(field.default).lower())
        else:
            ap.add_argument(flag, dest=field.name, default=field.default,
                            type=type(field.default))
    ns = vars(ap.parse_args(argv))
    for field in dataclasses.fields(Config):
        if field.type in (bool, "bool"):
            ns[field.name] = str(ns[field.name]).lower() in ("1", "true", "yes")
    cfg = Config(**ns)
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, batch=2, seq_len=16, warmup=1,
                                  steps=min(cfg.steps, 2))
    return cfg


if __name__ == "__main__":
    r = main(_parse(sys.argv[1:]))
    print(json.dumps({k: r[k] for k in r if k not in ("times", "details", "config")},
                     indent=1))
