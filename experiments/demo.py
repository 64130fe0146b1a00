# SPDX-License-Identifier: Apache-2.0
"""`make demo`: fine-tune SmolLM2-135M with LoRA on Shakespeare, on the CPU.

Question: does a few minutes of LoRA (r=8, alpha=16 on q, k, v, o) on a
2-core CPU make SmolLM2-135M-Instruct measurably better at Shakespeare?
Hypothesis: yes; held-out perplexity, measured on plays never seen in
training, drops by at least 5 %.

Reading the output: a progress bar (step, loss, tokens/s, ETA), then
perplexity before/after on held-out blocks, a greedy sample before/after,
parameter counts and optimizer-state bytes (``peftjax.report``). Files in
``--out_dir`` (default ``demo_out/``): ``demo_results.json``, ``metrics.jsonl``
(loss, lr, tokens/s, grad norm per step), ``loss.png``, ``adapter/`` (orbax),
``adapter_peft/`` (the same adapter in Hugging Face PEFT format:
``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained``; LoRA, DoRA and PiSSA, the latter as a
rank-2r LoRA over the unmodified base; LoRA-XS, LoRA-SB and sparse deltas
have no PEFT format and are saved with orbax only), ``checkpoints/`` (resumable
training state). The checkpoint is a 4-bit (Q4_1)
GGUF dequantised to float32, so perplexities are not comparable with
published SmolLM2 figures.

Usage::

    python experiments/demo.py                      # the default run
    python experiments/demo.py --steps=100 --rank=16 --lr=5e-4
    python experiments/demo.py --method=dora        # or full, lora_xs, galore
    python experiments/demo.py --method=lora-sb     # r x r core, gradient-based init
    python experiments/demo.py --method=sparse      # SpIEL at LoRA's budget
    python experiments/demo.py --model=/path/to/hf_dir_or.gguf --data=notes.txt
    python experiments/demo.py --resume             # continue after a kill
    python experiments/demo.py --help               # every option, explained
    python experiments/demo.py --dtype=bf16         # bf16 base and activations
    python experiments/demo.py --pack               # several plays per block
    python experiments/demo.py --smoke              # tiny random Llama, < 60 s

Options given explicitly are kept (``--smoke --rank=8`` trains rank 8;
``--smoke`` fills its small sizes into the options not given). ``--resume``
continues from the newest intact checkpoint and prints its step; a damaged
newer step is moved to ``checkpoints.damaged/``, and no usable checkpoint at
all stops the run before the model is loaded.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _recipe  # noqa: E402  (the shared training recipe, next to this file)

from peftjax import data, models, train  # noqa: E402
from peftjax.io import checkpoint  # noqa: E402

opt = train.option


@dataclasses.dataclass(frozen=True)
class Config:
    """Fine-tune a causal LM with one PEFT method and report what it changed."""

    method: str = opt("lora", "Fine-tuning method, one of: " + ", ".join(_recipe.METHODS)
                      + " (sparse: SpIEL at LoRA's parameter budget).")
    rank: int = opt(8, "Adapter rank r (LoRA-family methods; sparse: the LoRA rank "
                    "whose parameter count it matches).")
    alpha: float = opt(16.0, "LoRA scaling numerator: the update is scaled by "
                       "alpha / rank.")
    targets: str = opt(_recipe.ATTN, "Regular expression (full match) over parameter "
                       "paths choosing the kernels that get adapters.")
    steps: int = opt(60, "Number of optimizer updates.")
    batch_size: int = opt(4, "Blocks per micro-batch.")
    block_len: int = opt(128, "Tokens per training and evaluation block.")
    accum_steps: int = opt(1, "Micro-batches accumulated into each optimizer update "
                           "(peftjax.train.trainer's accumulate).")
    lr: float = opt(1e-3, "Peak learning rate, reached after the warm-up.")
    warmup_steps: int = opt(6, "Linear warm-up length in optimizer updates.")
    schedule: str = opt("cosine", "Decay after the warm-up: cosine or linear.")
    end_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of --lr.")
    clip_norm: float = opt(1.0, "Global gradient-norm clipping threshold.")
    max_skipped_in_a_row: int = opt(10, "Stop after this many consecutive steps with "
                                    "a non-finite loss or gradient (each such step is "
                                    "skipped: parameters and optimizer state are kept).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    galore_rank: int = opt(128, "GaLore/FRUGAL projection rank.")
    update_proj_gap: int = opt(200, "GaLore/FRUGAL: optimizer updates between "
                               "projector refreshes.")
    galore_scale: float = opt(0.25, "GaLore: scale applied to the projected-back "
                              "update.")
    stat_batches: int = opt(8, "LoRA-SB: training batches used for the gradient "
                            "statistics of its initialisation.")
    spiel_reselection_steps: int = opt(20, "Sparse (SpIEL): drop-and-regrow the "
                                       "support every this many steps.")
    spiel_accumulation_steps: int = opt(5, "Sparse (SpIEL): steps of gradient "
                                        "accumulation before each regrowth.")
    eval_docs: int = opt(4, "Held-out documents (plays), never trained on.")
    eval_blocks: int = opt(32, "Blocks of the held-out documents used for perplexity.")
    dtype: str = opt("f32", "Compute precision: f32, or bf16 (bfloat16 base and "
                     "activations, float32 adapters and optimizer state).")
    pack: bool = opt(False, "Pack training documents back to back in each block "
                     "(attention stays inside each document).")
    model: str = opt("", "A .gguf file or Hugging Face model directory; empty: the "
                     "offline SmolLM2-135M-Instruct.")
    data: str = opt("", "A .txt file, a directory of .txt files or a .jsonl file; "
                    "empty: the Shakespeare plays.")
    prompt: str = opt("KING.\nWhat news, my lord? Speak, and", "Prompt of the greedy "
                      "samples printed before and after training.")
    gen_tokens: int = opt(40, "Tokens generated for each sample; 0 skips the samples.")
    out_dir: str = opt("demo_out", "Directory for results, metrics, the loss plot, the "
                       "adapter and checkpoints.")
    checkpoint_every: int = opt(20, "Save the training state every this many steps "
                                "(and on SIGTERM/Ctrl-C).")
    resume: bool = opt(False, "Continue from the newest intact checkpoint in "
                       "OUT_DIR/checkpoints (damaged newer steps are set aside); fails "
                       "at once when there is none.")
    seed: int = opt(0, "Seed of the initialisation, data order and smoke model.")
    progress: bool = opt(True, "Show a progress bar (step, loss, tokens/s, ETA).")
    smoke: bool = opt(False, "Tiny random Llama on byte-tokenised text, under a "
                      "minute on a CPU; also sets the small sizes shown as --smoke "
                      "values for every option not given explicitly.")


SMOKE = dict(steps=24, batch_size=4, block_len=32, lr=1e-2, warmup_steps=2,
             eval_blocks=16, gen_tokens=12, checkpoint_every=8, rank=4, alpha=8.0,
             prompt="KING.\n", stat_batches=2, spiel_reselection_steps=8,
             spiel_accumulation_steps=2)


def parse(argv: list[str]) -> Config:
    """The configuration of ``demo.py ARGS``: options given are kept as given;
    ``--smoke`` fills ``SMOKE``'s values into the others only."""
    return train.parse_config(Config, argv, smoke=SMOKE)


def _generate(graphdef, params, encode, decode, cfg: Config) -> str:
    if cfg.gen_tokens <= 0:
        return ""
    prompt = np.asarray(encode(cfg.prompt), np.int32)[None]
    out = models.llama.generate(models.rebuild(graphdef, params),
                                jnp.asarray(prompt), max_new_tokens=cfg.gen_tokens)
    return cfg.prompt + decode(np.asarray(out[0]))


def save_peft(setup, state, lm, out: str, base_name: str) -> str | None:
    """Writes ``out/adapter_peft`` (Hugging Face PEFT format); None when the
    method has no PEFT format (the orbax adapter is then the only export)."""
    from peftjax import io

    peft_dir = os.path.join(out, "adapter_peft")
    if os.path.isdir(peft_dir):
        shutil.rmtree(peft_dir)
    if setup.peft is None or lm.config is None:
        print("adapter (Hugging Face PEFT): not written; this method has no PEFT format")
        return None
    assignment, adapter_state = setup.peft(state)
    io.save_peft(peft_dir, assignment, adapter_state, lm.params,
                 key_map=models.llama.peft_key_map(lm.config),
                 base_model_name_or_path=base_name, task_type="CAUSAL_LM")
    print(f"adapter (Hugging Face PEFT): {peft_dir}")
    return peft_dir


def main(cfg: Config) -> dict:
    """Runs the demo; returns (and writes) ``demo_results.json``'s contents."""
    t_start = time.perf_counter()
    build = _recipe.method(cfg.method)  # unbuilt methods raise here, before loading
    out = os.path.abspath(cfg.out_dir)
    ckpt_dir = os.path.join(out, "checkpoints")
    if cfg.resume:  # before loading anything: no usable checkpoint fails at once
        try:
            train.resume_step(ckpt_dir)
        except ValueError as e:
            raise SystemExit(f"--{e}") from None
    if not cfg.resume and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    os.makedirs(out, exist_ok=True)

    dtype = _recipe.compute_dtype(cfg.dtype)  # a bad --dtype fails before loading
    lm = _recipe.load_lm(cfg.model, smoke=cfg.smoke, seed=cfg.seed, dtype=dtype)
    graphdef, params, encode, decode, eos_id, model_name = lm[:6]
    docs = _recipe.documents(cfg.data, max_chars=20_000 if cfg.smoke else 0,
                             model=cfg.model)
    corpus = _recipe.corpus(docs, encode, block_len=cfg.block_len, eval_docs=cfg.eval_docs,
                            eval_blocks=cfg.eval_blocks, seed=cfg.seed, eos_id=eos_id,
                            pack_documents=cfg.pack)
    # one batch per update: accum_steps micro-batches of batch_size blocks
    train_batches = data.Batches(corpus.train, batch_size=cfg.batch_size * cfg.accum_steps,
                                 seed=cfg.seed)
    eval_batches = data.Batches(corpus.eval, batch_size=min(cfg.batch_size, cfg.eval_blocks),
                                seed=cfg.seed, shuffle=False)
    print(f"model: {model_name}; data: {len(corpus.train_names)} training documents "
          f"({corpus.train.tokens.shape[0]} blocks of {cfg.block_len}), held out: "
          f"{', '.join(corpus.eval_names)} ({cfg.eval_blocks} blocks)")

    optim = _recipe.OptimConfig(
        lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
        schedule=cfg.schedule, end_lr_ratio=cfg.end_lr_ratio, clip_norm=cfg.clip_norm,
        weight_decay=cfg.weight_decay, accum_steps=cfg.accum_steps)
    init_key, _ = jax.random.split(jax.random.key(cfg.seed))  # adapters, data-driven inits
    loss_fn = _recipe.lm_loss(_recipe.apply_fn(graphdef))
    stat_batches = [train_batches[i] for i in range(cfg.stat_batches)]  # LoRA-SB
    setup = _recipe.precision(build(cfg, params, optim, init_key,
                                    init_data=_recipe.InitData(loss_fn, stat_batches,
                                                               lm.config)),
                              cfg.dtype)
    if setup.model is not None:
        raise SystemExit(f"demo: --method={cfg.method} feeds the model a prompt, prefix or "
                         "hooks; the demo samples and exports weight-space methods only "
                         "(train it with experiments/compare_methods.py)")
    print(setup.describe)
    if cfg.dtype != "f32":
        print(f"precision: {cfg.dtype} compute"
              + (f", {cfg.dtype} frozen base" if setup.base is not None else "")
              + ", float32 trainable parameters and optimizer state")
    run = _recipe.start(setup, loss_fn, optim, init_key)
    rep = _recipe.report(run, train_batches[0])
    print(rep)

    ppl_before = run.evaluate(run.state, eval_batches)
    sample_before = _generate(graphdef, run.params(run.state), encode, decode, cfg)
    print(f"held-out perplexity before: {ppl_before:.3f}")
    print(f"sample before:\n{sample_before}\n")

    log_path = os.path.join(out, "metrics.jsonl")
    if cfg.resume and not cfg.progress:  # the progress bar says it otherwise
        print(f"resumed from step {train.resume_step(ckpt_dir)} (checkpoint under "
              f"{ckpt_dir})", flush=True)
    try:
        result = train.fit(run.step, run.state, train_batches, steps=cfg.steps,
                           schedule=optim.learning_rate(), log_path=log_path,
                           plot_path=os.path.join(out, "loss.png"), checkpoint_dir=ckpt_dir,
                           checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                           progress=cfg.progress, desc=f"{cfg.method} r={cfg.rank}",
                           max_skipped_in_a_row=cfg.max_skipped_in_a_row)
    except train.TooManySkippedSteps as e:
        raise SystemExit(f"demo: {e}") from None
    if result.skipped:
        print(f"skipped {result.skipped} steps with a non-finite loss or gradient "
              f"(see {log_path})", flush=True)
    if result.interrupted_by is not None:
        print(f"interrupted by signal {result.interrupted_by} at step {result.step}; "
              f"state saved under {ckpt_dir}; continue with --resume", flush=True)
        raise SystemExit(128 + result.interrupted_by)

    state = result.state
    ppl_after = run.evaluate(state, eval_batches)
    sample_after = _generate(graphdef, run.params(state), encode, decode, cfg)
    print(f"held-out perplexity after:  {ppl_after:.3f} "
          f"({100 * (ppl_after / ppl_before - 1):+.1f} %)")
    print(f"sample after:\n{sample_after}\n")

    adapter_dir = os.path.join(out, "adapter")
    if os.path.isdir(adapter_dir):
        shutil.rmtree(adapter_dir)
    checkpoint.save(adapter_dir, result.step, _recipe.export(run, state))
    print(f"adapter (orbax): {adapter_dir}")
    # PEFT loads the adapter onto a base named here: the Hub checkpoint that the
    # offline GGUF quantises, or the user's own model directory / file.
    base_name = ("HuggingFaceTB/SmolLM2-135M-Instruct" if not (cfg.model or cfg.smoke)
                 else cfg.model or model_name)
    peft_dir = save_peft(setup, state, lm, out, base_name)
    with open(log_path, encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    results = {
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "trainable_params": rep.trainable_params,
        "total_params": rep.total_params,
        "optimizer_state_bytes": rep.optimizer_state_bytes,
        "seconds": time.perf_counter() - t_start,
        "train_seconds": result.seconds,
        "steps": cfg.steps,
        "tokens_per_step": cfg.batch_size * cfg.block_len * cfg.accum_steps,
        "final_loss": losses[-1] if losses else None,
        "compiled_bytes": rep.compiled_bytes,
        "flops_per_step": rep.flops,
        "sample_before": sample_before,
        "sample_after": sample_after,
        "eval_documents": corpus.eval_names,
        "adapter_dir": adapter_dir,
        "peft_dir": peft_dir,
        "model": model_name,
        "config": dataclasses.asdict(cfg),
        "environment": _recipe.environment(),
    }
    with open(os.path.join(out, "demo_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    _recipe.append_result("demo", cfg, {k: v for k, v in results.items()
                                        if k not in ("config", "environment")})
    print(f"trainable params: {rep.trainable_params:,} / {rep.total_params:,}; "
          f"optimizer state: {rep.optimizer_state_bytes:,} bytes; "
          f"wall time {results['seconds']:.1f} s; outputs in {out}")
    return results


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
