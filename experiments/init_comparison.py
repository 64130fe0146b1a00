# SPDX-License-Identifier: Apache-2.0
"""Data-driven LoRA initialisations on one budget: LoRA, PiSSA, LoRA-GA, LoRA-SB, CorDA.

Question: at the same rank, steps, batch and schedule shape, does a
data-driven initialisation (``peftjax.inits``) lower held-out perplexity
after a short fine-tuning run, and at what trainable-parameter cost?
Hypothesis (the papers' claims in miniature): PiSSA, LoRA-GA and CorDA
(IPM) converge faster than LoRA's zero-B init; LoRA-SB matches LoRA with
``r²`` instead of ``r·(in+out)`` trainable parameters per matrix.

Reading the output: a Markdown table (method, trainable params, eval
perplexity before and after, mean ± spread over seeds) printed and written with
a JSON copy and a plot (``ppl_by_method.png``) to ``--out_dir`` (default
``experiments/results/init_comparison``). "before" is the model at init: equal
to the base for every method but LoRA-SB, which starts at ``W + trunc_r(ΔW)``.
Eval blocks come from plays never used in training (``--eval_docs``).
SmolLM2's checkpoint is a 4-bit dequantisation: perplexities are not
comparable with published ones.

Usage::

    python experiments/init_comparison.py            # SmolLM2-135M, 300 steps x 5 x 2 seeds
    python experiments/init_comparison.py --smoke    # tiny Llama, synthetic-size, < 60 s
"""

import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _recipe  # noqa: E402

from peftjax import adapters, data, factored, inits, train, tree  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Experiment configuration; every field is a --field=value option."""

    methods: tuple[str, ...] = ("lora", "pissa", "lora_ga", "lora_sb", "corda")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 300
    batch_size: int = 4
    block_len: int = 128
    rank: int = 8
    alpha: float = 16.0
    targets: str = _recipe.ATTN
    stat_batches: int = 8  # batches for gradients (LoRA-GA, LoRA-SB) and covariances (CorDA)
    warmup_steps: int = 10
    clip_norm: float = 1.0
    eval_docs: int = 4
    eval_blocks: int = 16
    model: str = ""
    data: str = ""
    out_dir: str = os.path.join(_recipe.RESULTS_DIR, "init_comparison")
    progress: bool = True
    smoke: bool = False


# Peak learning rates per method (LoRA-SB trains an r×r core with s = 1).
LR = {"lora": 1e-3, "pissa": 1e-4, "lora_ga": 1e-3, "lora_sb": 1e-3, "corda": 1e-4}
SMOKE = dict(steps=4, block_len=32, eval_blocks=4, rank=4, alpha=8.0, warmup_steps=1,
             stat_batches=2, seeds=(0,))


def initializer(name: str, cfg: Config, lr: float):
    """The rule payload of each method (real Python objects, no string dispatch)."""
    return {
        "lora": lambda: adapters.lora(cfg.rank, alpha=cfg.alpha),
        "pissa": lambda: inits.pissa(cfg.rank, alpha=cfg.alpha),
        "lora_ga": lambda: inits.lora_ga(cfg.rank, alpha=cfg.alpha),
        "lora_sb": lambda: inits.lora_sb(cfg.rank, learning_rate=lr,
                                         warmup_ratio=cfg.warmup_steps / cfg.steps,
                                         total_steps=cfg.steps),
        "corda": lambda: inits.corda(cfg.rank, alpha=cfg.alpha, mode="ipm"),
    }[name]()


def build(name: str, cfg: Config, lm: _recipe.LM, loss_fn, stat_batches,
          optim: _recipe.OptimConfig, key) -> _recipe.Setup:
    """Initialises one method (the data-driven ones from their statistics)."""
    payload = initializer(name, cfg, optim.lr)
    plan = tree.assign(lm.params, [tree.Rule(where=cfg.targets, then=payload)])
    tx = optax.adamw(optim.learning_rate(), weight_decay=0.0)
    if name == "lora":  # the trainer initialises it
        return _recipe.Setup(lm.params, tx, tree.describe(plan, lm.params), adapters=plan)
    stats = None
    if payload.stats == "gradient":
        stats = inits.accumulate_gradients(loss_fn, lm.params, stat_batches, list(plan),
                                           mean=(name == "lora_ga"))
    elif payload.stats == "covariance":
        stats = inits.collect_covariances(loss_fn, lm.params, stat_batches, list(plan),
                                          transform=factored.transform)
    assignment, base, state = _recipe.data_driven(plan, key, lm.params, stats)
    return _recipe.Setup(base, tx, tree.describe(assignment, lm.params),
                         adapters=assignment, initial=state)


def run_one(name: str, seed: int, cfg: Config, lm, corpus) -> dict:
    """Trains one (method, seed); returns its row."""
    lr = LR[name] * (10.0 if cfg.smoke else 1.0)
    optim = _recipe.OptimConfig(lr=lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                schedule="linear", clip_norm=cfg.clip_norm)
    loss_fn = _recipe.lm_loss(_recipe.apply_fn(lm.graphdef))
    batches = data.Batches(corpus.train, batch_size=cfg.batch_size, seed=seed)
    evals = data.Batches(corpus.eval, batch_size=min(cfg.batch_size, cfg.eval_blocks),
                         seed=seed, shuffle=False)
    stat_batches = [batches[i] for i in range(cfg.stat_batches)]
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    setup = build(name, cfg, lm, loss_fn, stat_batches, optim, key)
    run = _recipe.start(setup, loss_fn, optim, key)
    init_s = time.perf_counter() - t0
    before = run.evaluate(run.state, evals)
    result = train.fit(run.step, run.state, batches, steps=cfg.steps,
                       schedule=optim.learning_rate(), progress=cfg.progress,
                       desc=f"{name}/{seed}")
    return {"method": name, "seed": seed, "lr": lr, "init_seconds": init_s,
            "trainable_params": adapters.num_trainable(run.state.trainable),
            "ppl_before": before, "ppl_after": run.evaluate(result.state, evals),
            "losses": [h["loss"] for h in result.history]}


def _run_key(cfg: Config) -> dict:
    """The configuration fields a cached run must agree on."""
    keep = dataclasses.asdict(cfg)
    for k in ("methods", "seeds", "out_dir", "progress"):
        keep.pop(k)
    return keep


def cached_run(name: str, seed: int, cfg: Config, lm, corpus, out: str) -> dict:
    """``run_one``, reusing ``runs/<name>-seed<seed>.json`` under ``out`` when it
    was written with the same configuration (anything else is recomputed)."""
    path = os.path.join(out, "runs", f"{name}-seed{seed}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        if kept.get("config") == _run_key(cfg):
            print(f"{name}/{seed}: reusing {os.path.relpath(path)}")
            return kept["row"]
    row = run_one(name, seed, cfg, lm, corpus)
    env = _recipe.environment()
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"config": _run_key(cfg), "environment": env, "row": row}, f, indent=1)
    os.replace(path + ".tmp", path)
    return row


def summarise(rows: list[dict], methods) -> list[dict]:
    """Mean and spread (max - min) over seeds per method."""
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        after = [r["ppl_after"] for r in rs]
        out.append({"method": m, "trainable_params": rs[0]["trainable_params"],
                    "ppl_before": statistics.mean(r["ppl_before"] for r in rs),
                    "ppl_after_mean": statistics.mean(after),
                    "ppl_after_spread": max(after) - min(after), "seeds": len(rs)})
    return out


def markdown(summary: list[dict]) -> str:
    """The table in Markdown."""
    head = ("| method | trainable params | ppl before | ppl after (mean) | spread "
            "(max-min) | seeds |\n|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {s['method']} | {s['trainable_params']:,} | {s['ppl_before']:.2f} "
        f"| {s['ppl_after_mean']:.2f} | {s['ppl_after_spread']:.2f} | {s['seeds']} |\n"
        for s in summary)


def plot(path: str, rows: list[dict], summary: list[dict], title: str) -> None:
    """Held-out perplexity after training per method (points: seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(summary):
        ys = [r["ppl_after"] for r in rows if r["method"] == s["method"]]
        ax.scatter([i] * len(ys), ys)
        ax.bar(i, s["ppl_after_mean"], alpha=0.3)
    ax.set_xticks(range(len(summary)), [s["method"] for s in summary])
    ax.set_ylabel("held-out perplexity after training")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



def parse(argv: list[str]) -> Config:
    """The configuration of this script's ARGS: options given are kept as given;
    ``--smoke`` fills ``SMOKE``'s values into the others only."""
    return train.parse_config(Config, argv, smoke=SMOKE)


def main(cfg: Config) -> dict:
    """Runs every (method, seed); returns the summary."""
    t0 = time.perf_counter()
    lm = _recipe.load_lm(cfg.model, smoke=cfg.smoke, seed=0)
    docs = _recipe.documents(cfg.data, max_chars=20_000 if cfg.smoke else 0,
                                 model=cfg.model)
    corpus = _recipe.corpus(docs, lm.encode, block_len=cfg.block_len, eval_docs=cfg.eval_docs,
                            eval_blocks=cfg.eval_blocks, seed=0, eos_id=lm.eos_id)
    out = os.path.abspath(cfg.out_dir)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    # Seed-major order; each finished (method, seed) is kept in runs/ and reused
    # by a later invocation with the same configuration (the full grid takes
    # hours on two cores, so it may span several invocations).
    rows = [cached_run(m, s, cfg, lm, corpus, out) for s in cfg.seeds for m in cfg.methods]
    summary = summarise(rows, cfg.methods)
    env = _recipe.environment()
    title = f"{lm.name}: r={cfg.rank}, {cfg.steps} steps x {cfg.batch_size}x{cfg.block_len}"
    header = (f"{title}; held out: {', '.join(corpus.eval_names)}; {env['date']}; "
              f"{env['cpu_count']} CPUs, {env['device_kind']}, load {env['loadavg']}\n\n")
    table = markdown(summary)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(header + table)
    results = {"summary": summary, "rows": rows, "seconds": time.perf_counter() - t0,
               "eval_documents": corpus.eval_names, "model": lm.name}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": dataclasses.asdict(cfg), "environment": env, **results}, f,
                  indent=2)
    plot(os.path.join(out, "ppl_by_method.png"), rows, summary, title)
    _recipe.append_result("init_comparison", cfg, results)
    print(header + table)
    return results


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
