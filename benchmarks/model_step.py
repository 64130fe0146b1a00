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
        benchmarks/model_step.py --json=benchmarks/out/model_step.json
    .venv/bin/python benchmarks/model_step.py --smoke   # tiny random model, seconds
    .venv/bin/python benchmarks/model_step.py --help    # every option
"""

import dataclasses
import importlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402  (benchmarks/_harness.py)

from peftjax import train  # noqa: E402

opt = train.option


@dataclasses.dataclass(frozen=True)
class Config:
    """Full fine-tuning step of SmolLM2-135M: peftjax (JAX) vs transformers (torch)."""

    batch: int = opt(4, "Sequences per step.")
    seq_len: int = opt(128, "Tokens per sequence (the ids hold one more for the targets).")
    steps: int = opt(5, "Timed steps after the warm-up.")
    warmup: int = opt(2, "Untimed steps before the timed ones.")
    torch: bool = opt(True, "Time transformers' model in a .venv-torch worker too.")
    smoke: bool = opt(False, "Tiny random Llama and small shapes (seconds).")
    json: str = opt("", "Write the result to this JSON file.")
    seed: int = opt(0, "Seed of the tiny model and the token ids.")


SMOKE = {"batch": 2, "seq_len": 16, "steps": 2, "warmup": 1}


def _load_params(cfg: Config):
    """Returns ``(model config, unrolled pure params, gguf path or None)``."""
    from peftjax import models as pm
    from peftjax.models import llama

    if not cfg.smoke:
        path = pm.smollm2_gguf()
        mcfg, params = llama.load_llama_params(path)
        return mcfg, params, path
    return (*_harness.tiny_model(cfg.seed, rope_theta=1e5), None)


def _step_fn(graphdef):
    import jax

    return jax.value_and_grad(_harness.lm_loss(graphdef))


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

    worker, torch_note, spec = None, "disabled (--torch=false)", None
    if cfg.torch:
        spec = _harness.torch_model_spec(mcfg, ids_np, gguf)
        worker, torch_note = _harness.torch_worker(spec)

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
                t_torch, losses["torch"] = worker.step()
            if i >= cfg.warmup:
                times["scan"].append(t_scan)
                times["unrolled"].append(t_unr)
                if t_torch is not None:
                    times["torch"].append(t_torch)
            losses["scan"] = float(out_scan[0])
            losses["unrolled"] = float(out_unrolled[0])
    finally:
        if worker is not None:
            worker.close()
        if spec is not None:
            os.unlink(spec["ids"])
    med = _harness.median

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
        "torch_note": torch_note if worker is None else f"torch {worker.version}",
        "config": dataclasses.asdict(cfg),
        "model": _harness.TINY_MODEL
        if cfg.smoke
        else "SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32",
        "versions": _harness.machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    _harness.write_json(cfg.json, result)
    return result


def _parse(argv: list[str]) -> Config:
    return train.parse_config(Config, argv, smoke=SMOKE)


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
