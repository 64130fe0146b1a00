# SPDX-License-Identifier: Apache-2.0
"""Every fine-tuning method peftjax has, on the same budget: quality vs cost.

Question: at a fixed budget (same model, data, steps, batch and schedule
shape), how do the methods trade trainable parameters and optimizer memory
for held-out perplexity? Hypothesis (the papers' tables in miniature): full
fine-tuning and GaLore reach the lowest perplexity at the highest (full) or
reduced (GaLore) optimizer memory; LoRA/DoRA come close with < 1 % of the
trainable parameters; LoRA-XS trains the fewest parameters and lags.

Reading the output: a Markdown table (method, trainable params,
optimizer-state bytes, compiled step memory = argument + output + temp -
alias bytes from ``memory_analysis()`` (temp alone misleads: XLA writes
gradients into output buffers; ``peak_temp_bytes`` is in the JSON), median step time,
held-out perplexity after training (before it in parentheses)) printed and written
with a JSON copy and three plots
(loss curves; perplexity vs trainable parameters; perplexity vs optimizer
memory) to ``--out_dir`` (default ``experiments/results/compare_methods``).
Step times are single-run medians on whatever machine runs this, recorded
with the load average: indicative, not a benchmark. SmolLM2's checkpoint is
a 4-bit dequantisation: perplexities are not comparable with published ones.

Usage::

    python experiments/compare_methods.py                   # SmolLM2-135M, CPU
    python experiments/compare_methods.py --methods=lora,dora --steps=40
    python experiments/compare_methods.py --dtype=bf16      # bf16 base/activations
    python experiments/compare_methods.py --smoke           # tiny Llama, < 60 s
"""

import dataclasses
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _recipe  # noqa: E402

from peftjax import data, train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Comparison configuration; every field is a --field=value option."""

    methods: tuple[str, ...] = ("full", "lora", "dora", "lora_xs", "galore")
    steps: int = 30
    batch_size: int = 4
    block_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    targets: str = _recipe.ATTN
    galore_rank: int = 64
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    stat_batches: int = 8  # training batches for LoRA-SB's gradient statistics
    spiel_reselection_steps: int = 20  # sparse: drop-and-regrow every S steps
    spiel_accumulation_steps: int = 5  # sparse: gradient accumulation before each
    lr_scale: float = 1.0  # multiplies every method's learning rate in LR
    warmup_steps: int = 3
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    eval_docs: int = 4
    eval_blocks: int = 16
    dtype: str = "f32"  # or bf16: bf16 base and activations, float32 trainables/optimizer
    pack: bool = False  # pack training documents back to back (segment ids)
    model: str = ""
    data: str = ""
    out_dir: str = os.path.join(_recipe.RESULTS_DIR, "compare_methods")
    seed: int = 0
    progress: bool = True
    isolate: bool = True  # one fresh process per method (clean memory, no shared state)
    smoke: bool = False


# Per-method peak learning rates (the usual orders of magnitude for each family).
LR = {"full": 5e-5, "galore": 2e-4, "lora": 1e-3, "dora": 1e-3, "lora_xs": 1e-3,
      "lora-sb": 1e-3, "sparse": 5e-4,
      # soft prompts and prefixes train faster (PEFT's examples use 1e-2 to 3e-2)
      "prompt_tuning": 1e-2, "prefix_tuning": 1e-2, "p_tuning": 1e-2,
      "multitask_prompt_tuning": 1e-2, "cpt": 1e-2, "cartridge": 1e-2,
      "adaption_prompt": 9e-3, "xlora": 3e-3,
      "loldu": 1e-2,  # LoLDU's full-width scaling is 1/r
      "spp": 1e-2}  # SPP's update is relative to W0 (s·a·c of each entry), a ~ 1/sqrt(in)
SMOKE = dict(steps=6, block_len=32, eval_blocks=8, galore_rank=8, rank=4, alpha=8.0,
             warmup_steps=1, stat_batches=2, spiel_reselection_steps=3,
             spiel_accumulation_steps=1)
SMOKE_LR_SCALE = 10.0


def run_method(name: str, cfg: Config, lm: _recipe.LM, corpus: _recipe.Corpus) -> dict:
    """Trains one method on the shared budget; returns its row."""
    build = _recipe.method(name)
    lr = LR.get(name, 1e-3) * cfg.lr_scale * (SMOKE_LR_SCALE if cfg.smoke else 1.0)
    optim = _recipe.OptimConfig(lr=lr, total_steps=cfg.steps,
                                warmup_steps=cfg.warmup_steps, clip_norm=cfg.clip_norm,
                                weight_decay=cfg.weight_decay)
    loss_fn = _recipe.lm_loss(_recipe.apply_fn(lm.graphdef))
    batches = data.Batches(corpus.train, batch_size=cfg.batch_size, seed=cfg.seed)
    key = jax.random.key(cfg.seed)
    init_data = _recipe.InitData(loss_fn, [batches[i] for i in range(cfg.stat_batches)],
                                 lm.config)
    setup = _recipe.precision(build(cfg, lm.params, optim, key, init_data=init_data),
                              cfg.dtype)
    loss_fn = _recipe.model_loss(setup, lm.graphdef, name, pack=cfg.pack)
    run = _recipe.start(setup, loss_fn, optim, key)
    evals = data.Batches(corpus.eval, batch_size=min(cfg.batch_size, cfg.eval_blocks),
                         seed=cfg.seed, shuffle=False)
    rep = _recipe.report(run, batches[0])
    ppl_before = run.evaluate(run.state, evals)
    if setup.cycles:  # COLA: equal links, each merged into the base
        n = setup.cycles
        links = [cfg.steps // n + (i < cfg.steps % n) for i in range(n)]
        result = train.cola(run.trainer, run.base, batches, key=key, cycles=links,
                            progress=cfg.progress, desc=name)
        merged = _recipe.evaluator(loss_fn, lambda _, params: params)
        ppl = merged(None, result.params, evals)
    else:
        result = train.fit(run.step, run.state, batches, steps=cfg.steps,
                           schedule=optim.learning_rate(), progress=cfg.progress, desc=name)
        ppl = run.evaluate(result.state, evals)
    times = [h["seconds"] for h in result.history[1:]] or [result.history[0]["seconds"]]
    return {
        "method": name, "lr": lr, "dtype": cfg.dtype,
        "trainable_params": rep.trainable_params, "total_params": rep.total_params,
        "optimizer_state_bytes": rep.optimizer_state_bytes,
        "peak_temp_bytes": rep.temp_bytes, "compiled_bytes": rep.compiled_bytes,
        "step_seconds_median": statistics.median(times),
        "eval_ppl_before": ppl_before, "eval_ppl": ppl,
        "losses": [h["loss"] for h in result.history],
    }


def markdown(rows: list[dict]) -> str:
    """The comparison table in Markdown."""
    head = ("| method | trainable params | optimizer state | compiled step memory "
            "| step time (median) | held-out ppl (before) |\n|---|---:|---:|---:|---:|---:|\n")

    mib = _recipe.human_bytes
    return head + "".join(
        f"| {r['method']} | failed ({r['error']}) | | | | |\n" if "error" in r else
        f"| {r['method']} | {r['trainable_params']:,} | {mib(r['optimizer_state_bytes'])} "
        f"| {mib(r['compiled_bytes'])} | {r['step_seconds_median']:.2f} s "
        f"| {r['eval_ppl']:.2f} ({r['eval_ppl_before']:.2f}) |\n" for r in rows)


def plots(out: str, rows: list[dict], title: str) -> None:
    """Loss curves, perplexity vs trainable params, perplexity vs optimizer bytes."""
    train.plot_curves(os.path.join(out, "loss_curves.png"),
                        {r["method"]: r["losses"] for r in rows}, title=title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, fname, label in (("trainable_params", "ppl_vs_trainable.png",
                               "trainable parameters"),
                              ("optimizer_state_bytes", "ppl_vs_optimizer_memory.png",
                               "optimizer-state bytes")):
        fig, ax = plt.subplots(figsize=(5, 4))
        for r in rows:
            ax.scatter(r[key], r["eval_ppl"])
            ax.annotate(r["method"], (r[key], r["eval_ppl"]))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)


def _isolated_rows(cfg: Config, argv: list[str]) -> list[dict]:
    """Runs each method in its own process (this script, ``--isolate=false``)."""
    import subprocess

    rows, info = [], {}
    keep = [a for a in argv if not a.startswith(("--methods", "--out_dir", "--isolate"))]
    for name in cfg.methods:
        sub = os.path.join(os.path.abspath(cfg.out_dir), name)
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *keep,
                               f"--methods={name}", f"--out_dir={sub}",
                               "--isolate=false"])
        if done.returncode != 0:  # keep the other methods' rows; say which failed
            rows.append({"method": name, "error": f"exit status {done.returncode}"})
            continue
        with open(os.path.join(sub, "results.json"), encoding="utf-8") as f:
            res = json.load(f)
        rows += res["rows"]
        info = {"model": res["model"], "eval_documents": res["eval_documents"]}
    return rows, info



def parse(argv: list[str]) -> Config:
    """The configuration of this script's ARGS: options given are kept as given;
    ``--smoke`` fills ``SMOKE``'s values into the others only."""
    return train.parse_config(Config, argv, smoke=SMOKE)


def main(cfg: Config, argv: list[str] | None = None) -> dict:
    """Runs every method in ``cfg.methods``; returns the table as a dict."""
    _recipe.compute_dtype(cfg.dtype)  # a bad --dtype fails before any work
    for name in cfg.methods:  # unknown or unbuilt methods fail before any work
        build = _recipe.method(name)
        if getattr(build, "unavailable", False):
            build()
    t0 = time.perf_counter()
    if cfg.isolate and len(cfg.methods) > 1 and argv is not None:
        rows, info = _isolated_rows(cfg, argv)
        model_name, eval_names = info["model"], info["eval_documents"]
    else:
        lm = _recipe.load_lm(cfg.model, smoke=cfg.smoke, seed=cfg.seed,
                             dtype=_recipe.compute_dtype(cfg.dtype))
        docs = _recipe.documents(cfg.data, max_chars=20_000 if cfg.smoke else 0,
                                 model=cfg.model)
        corpus = _recipe.corpus(docs, lm.encode, block_len=cfg.block_len,
                                eval_docs=cfg.eval_docs, eval_blocks=cfg.eval_blocks,
                                seed=cfg.seed, eos_id=lm.eos_id, pack_documents=cfg.pack)
        rows = [run_method(name, cfg, lm, corpus) for name in cfg.methods]
        model_name, eval_names = lm.name, corpus.eval_names
    out = os.path.abspath(cfg.out_dir)
    os.makedirs(out, exist_ok=True)
    table = markdown(rows)
    env = _recipe.environment()
    title = (f"{model_name}: {cfg.steps} steps x {cfg.batch_size}x{cfg.block_len}"
             + ("" if cfg.dtype == "f32" else f", {cfg.dtype}"))
    header = (f"{title}; held out: {', '.join(eval_names)}; {env['date']}; "
              f"{env['cpu_count']} CPUs, {env['device_kind']}, load {env['loadavg']}\n\n")
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(header + table)
    results = {"rows": rows, "seconds": time.perf_counter() - t0,
               "eval_documents": eval_names, "model": model_name}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": dataclasses.asdict(cfg), "environment": env, **results}, f,
                  indent=2)
    plots(out, [r for r in rows if "error" not in r], title)
    _recipe.append_result("compare_methods", cfg, results)
    print(header + table)
    return results


if __name__ == "__main__":
    main(parse(sys.argv[1:]), sys.argv[1:])
