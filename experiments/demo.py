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
    python experiments/demo.py --dtype=bf16         # bf16 base and activations
    python experiments/demo.py --pack               # several plays per block
    python experiments/demo.py --smoke              # tiny random Llama, < 60 s
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

import peftjax  # noqa: E402
from peftjax import data, models  # noqa: E402
from peftjax.io import checkpoint  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Demo configuration; every field is a --field=value option."""

    method: str = "lora"  # see _recipe.METHODS; unbuilt ones say which issue adds them
    rank: int = 8
    alpha: float = 16.0
    targets: str = _recipe.ATTN  # regex over parameter paths (adapter methods)
    steps: int = 60  # optimizer updates
    batch_size: int = 4
    block_len: int = 128
    accum_steps: int = 1
    lr: float = 1e-3
    warmup_steps: int = 6
    schedule: str = "cosine"
    end_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    galore_rank: int = 128
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    stat_batches: int = 8  # training batches for LoRA-SB's gradient statistics
    spiel_reselection_steps: int = 20  # sparse: drop-and-regrow every S steps
    spiel_accumulation_steps: int = 5  # sparse: gradient accumulation before each
    eval_docs: int = 4  # held-out plays, never trained on
    eval_blocks: int = 32
    dtype: str = "f32"  # or bf16: bf16 base and activations, float32 adapters/optimizer
    pack: bool = False  # pack training documents back to back (segment ids)
    model: str = ""  # .gguf file or HF directory; default: offline SmolLM2-135M
    data: str = ""  # .txt, directory of .txt, or .jsonl; default: Shakespeare plays
    prompt: str = "KING.\nWhat news, my lord? Speak, and"
    gen_tokens: int = 40  # 0 skips the samples
    out_dir: str = "demo_out"
    checkpoint_every: int = 20
    resume: bool = False
    seed: int = 0
    progress: bool = True
    smoke: bool = False  # tiny random Llama on byte-tokenised text


SMOKE = dict(steps=24, batch_size=4, block_len=32, lr=1e-2, warmup_steps=2,
             eval_blocks=16, gen_tokens=12, checkpoint_every=8, rank=4, alpha=8.0,
             prompt="KING.\n", stat_batches=2, spiel_reselection_steps=8,
             spiel_accumulation_steps=2)


def _generate(graphdef, params, encode, decode, cfg: Config) -> str:
    if cfg.gen_tokens <= 0:
        return ""
    prompt = np.asarray(encode(cfg.prompt), np.int32)[None]
    out = models.llama.generate(models.merge_params(graphdef, params),
                                jnp.asarray(prompt), max_new_tokens=cfg.gen_tokens)
    return cfg.prompt + decode(np.asarray(out[0]))


def save_peft(setup, trainable, lm, out: str, base_name: str) -> str | None:
    """Writes ``out/adapter_peft`` (Hugging Face PEFT format); None when the
    method has no PEFT format (the orbax adapter is then the only export)."""
    from peftjax import io

    peft_dir = os.path.join(out, "adapter_peft")
    if os.path.isdir(peft_dir):
        shutil.rmtree(peft_dir)
    if setup.peft is None or lm.config is None:
        print("adapter (Hugging Face PEFT): not written; this method has no PEFT format")
        return None
    assignment, state = setup.peft(trainable, setup.static)
    io.save_peft(peft_dir, assignment, state, lm.params,
                 key_map=models.llama.peft_key_map(lm.config),
                 base_model_name_or_path=base_name, task_type="CAUSAL_LM")
    print(f"adapter (Hugging Face PEFT): {peft_dir}")
    return peft_dir


def main(cfg: Config) -> dict:
    """Runs the demo; returns (and writes) ``demo_results.json``'s contents."""
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in SMOKE.items()
                                          if getattr(cfg, k) == getattr(Config, k)})
    t_start = time.perf_counter()
    build = _recipe.method(cfg.method)  # unbuilt methods raise here, before loading
    out = os.path.abspath(cfg.out_dir)
    ckpt_dir = os.path.join(out, "checkpoints")
    if not cfg.resume and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    os.makedirs(out, exist_ok=True)

    _recipe.compute_dtype(cfg.dtype)  # a bad --dtype fails before loading
    lm = _recipe.load_lm(cfg.model, smoke=cfg.smoke, seed=cfg.seed,
                         dtype=_recipe.compute_dtype(cfg.dtype))
    graphdef, params, encode, decode, eos_id, model_name = lm[:6]
    docs = _recipe.documents(cfg.data, max_chars=20_000 if cfg.smoke else 0,
                                 model=cfg.model)
    corpus = _recipe.corpus(docs, encode, block_len=cfg.block_len, eval_docs=cfg.eval_docs,
                            eval_blocks=cfg.eval_blocks, seed=cfg.seed, eos_id=eos_id,
                            pack_documents=cfg.pack)
    train_batches = data.Batches(corpus.train, batch_size=cfg.batch_size, seed=cfg.seed)
    eval_batches = data.Batches(corpus.eval, batch_size=min(cfg.batch_size, cfg.eval_blocks),
                                seed=cfg.seed, shuffle=False)
    print(f"model: {model_name}; data: {len(corpus.train_names)} training documents "
          f"({corpus.train.tokens.shape[0]} blocks of {cfg.block_len}), held out: "
          f"{', '.join(corpus.eval_names)} ({cfg.eval_blocks} blocks)")

    optim = _recipe.OptimConfig(
        lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
        schedule=cfg.schedule, end_lr_ratio=cfg.end_lr_ratio, clip_norm=cfg.clip_norm,
        weight_decay=cfg.weight_decay, accum_steps=cfg.accum_steps)
    key = jax.random.key(cfg.seed)
    init_key, loop_key = jax.random.split(key)
    loss_fn = _recipe.lm_loss(_recipe.apply_fn(graphdef))
    stat_batches = [train_batches[i] for i in range(cfg.stat_batches)]  # LoRA-SB
    init_data = _recipe.InitData(loss_fn, stat_batches, optim)
    setup = _recipe.precision(build(cfg, params, _recipe.schedule(optim), init_key,
                                    init_data=init_data), cfg.dtype)
    print(setup.describe)
    if cfg.dtype != "f32":
        print(f"precision: {cfg.dtype} compute"
              + (f", {cfg.dtype} frozen base" if setup.base is not None else "")
              + ", float32 trainable parameters and optimizer state")

    evaluate = _recipe.evaluator(setup, loss_fn)
    run = _recipe.trainer(setup, loss_fn, optim)
    opt_state0 = run.tx.init(setup.trainable)
    rep = peftjax.report(run.step, setup.trainable, opt_state0, setup.static,
                         train_batches[0], params=setup.base,
                         trainable=setup.trained(setup.trainable), opt_state=opt_state0)
    print(rep)

    ppl_before = evaluate(setup.trainable, eval_batches)
    sample_before = _generate(graphdef, setup.to_params(setup.trainable, setup.static),
                              encode, decode, cfg)
    print(f"held-out perplexity before: {ppl_before:.3f}")
    print(f"sample before:\n{sample_before}\n")

    log_path = os.path.join(out, "metrics.jsonl")
    if not cfg.resume and os.path.exists(log_path):
        os.remove(log_path)
    result = _recipe.train(setup=setup, run=run, optim=optim, batches=train_batches,
                           key=loop_key, log_path=log_path, ckpt_dir=ckpt_dir,
                           checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                           progress=cfg.progress, desc=f"{cfg.method} r={cfg.rank}")
    if result.interrupted_by is not None:
        print(f"interrupted by signal {result.interrupted_by} at step {result.step}; "
              f"state saved under {ckpt_dir}; continue with --resume", flush=True)
        raise SystemExit(128 + result.interrupted_by)

    ppl_after = evaluate(result.trainable, eval_batches)
    sample_after = _generate(graphdef, setup.to_params(result.trainable, setup.static),
                             encode, decode, cfg)
    print(f"held-out perplexity after:  {ppl_after:.3f} "
          f"({100 * (ppl_after / ppl_before - 1):+.1f} %)")
    print(f"sample after:\n{sample_after}\n")

    adapter_dir = os.path.join(out, "adapter")
    if os.path.isdir(adapter_dir):
        shutil.rmtree(adapter_dir)
    checkpoint.save(adapter_dir, result.step, setup.export(result.trainable, setup.static))
    print(f"adapter (orbax): {adapter_dir}")
    # PEFT loads the adapter onto a base named here: the Hub checkpoint that the
    # offline GGUF quantises, or the user's own model directory / file.
    base_name = ("HuggingFaceTB/SmolLM2-135M-Instruct" if not (cfg.model or cfg.smoke)
                 else cfg.model or model_name)
    peft_dir = save_peft(setup, result.trainable, lm, out, base_name)
    with open(log_path, encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    _recipe.plot_curves(os.path.join(out, "loss.png"), {cfg.method: losses},
                        title=f"{model_name}: {cfg.method}, training loss")
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
    main(_recipe.parse_cli(Config, sys.argv[1:]))
