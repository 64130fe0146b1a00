# SPDX-License-Identifier: Apache-2.0
"""The training recipe shared by the demo and the experiments (public API only).

Not an experiment itself: ``demo.py``, ``compare_methods.py`` and
``pretrain_galore.py`` import it so they train the same way:

* an optimizer = ``clip_by_global_norm`` -> the method's transform driven by a
  warm-up + cosine (or linear) schedule, wrapped in ``optax.MultiSteps`` for
  gradient accumulation;
* a causal-LM loss on packed blocks (``peftjax.data.lm_targets`` weights, so
  no target crosses a document boundary; ``segment_ids`` keep attention
  inside each document, so blocks may hold several documents);
* precision: ``--dtype=bf16`` runs the model in bfloat16 with a bfloat16
  frozen base and float32 trainables / optimizer state
  (``peftjax.adapters.cast_floating``; ``precision`` below);
* a loop with a tqdm bar (step, loss, tokens/s, ETA), JSONL metrics (loss,
  lr, tokens/s, grad norm), checkpoints every N steps and on SIGTERM/SIGINT
  (``peftjax.io.checkpoint.SignalFlag``), and exact resume (parameters,
  optimizer state, step, PRNG key and loader position);
* ``METHODS``: method name -> a function building its trainable tree,
  optimizer transform and export; methods not built yet raise a clear error.
  Data-dependent initialisers (LoRA-SB) get a loss and a few training
  batches (``InitData``); methods with their own step (SpIEL sparse
  fine-tuning) bring it in ``Setup.make_trainer``.

Candidate for promotion into the library (``peftjax.train``) once its shape
settles; kept here so the library's API does not grow by accident.
"""

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax
from peftjax import adapters, data, inits, masks, tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lm import (  # noqa: E402,F401  (re-exported: experiments import _recipe only)
    LM,
    Corpus,
    apply_fn,
    byte_decode,
    byte_encode,
    corpus,
    documents,
    load_lm,
    tiny_llama,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# git-ignored; tests point PEFTJAX_RESULTS_DIR elsewhere so smoke runs leave no trace
RESULTS_DIR = os.environ.get("PEFTJAX_RESULTS_DIR") or os.path.join(ROOT, "experiments",
                                                                     "results")


# ----------------------------------------------------------------------------
# CLI: a frozen dataclass, fields set with --field=value (docs/architecture.md#experiments).
# ----------------------------------------------------------------------------
def _convert(name: str, typ: Any, text: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", ""):
            return None
        typ = args[0]
        origin = typing.get_origin(typ)
    if typ is bool:
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{name}: expected true/false, got {text!r}")
    if origin is tuple:
        inner = typing.get_args(typ)[0]
        return tuple(_convert(name, inner, t) for t in text.split(",") if t)
    try:
        return typ(text)
    except ValueError as e:
        raise ValueError(f"--{name}: cannot parse {text!r} as {typ.__name__}") from e


def option(default: Any, help: str) -> Any:  # noqa: A002  (argparse's name)
    """A ``Config`` field with its ``--help`` sentence: ``rank: int = option(8, "...")``."""
    if not help.strip():
        raise ValueError("option: every CLI option needs a help sentence")
    return dataclasses.field(default=default, metadata={"help": help.strip()})


def cli_help(cls: type, *, smoke: dict[str, Any] | None = None,
             prog: str | None = None) -> str:
    """The ``--help`` text of ``cls``: every field, its default (and ``--smoke``
    value) and its help sentence (``option(..., help=...)``)."""
    prog = prog or os.path.basename(sys.argv[0]) or "script"
    lines = [f"usage: {prog} [--option=value ...]   (--flag alone sets a flag to true)",
             "", (cls.__doc__ or "").strip(), "", "options:"]
    def shown(v: Any) -> str:  # as typed on the command line where that is clear
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str) and (not v or not v.isprintable() or " " in v):
            return repr(v)
        return str(v)

    for f in dataclasses.fields(cls):
        line = f"  --{f.name}  (default: {shown(f.default)}"
        if smoke and f.name in smoke:
            line += f"; --smoke: {shown(smoke[f.name])}"
        lines.append(line + ")")
        text = f.metadata.get("help", "")
        lines += ["      " + t for t in textwrap.wrap(text, 74)] if text else []
    lines += ["  -h, --help", "      Print this help and exit."]
    return "\n".join(lines)


def parse_cli(cls: type, argv: list[str], *, smoke: dict[str, Any] | None = None) -> Any:
    """Builds ``cls`` (a frozen dataclass) from ``--field=value`` arguments.

    ``--flag`` alone sets a bool field to True; ``--help`` prints every field
    with its help sentence and exits. Options given on the command line are
    kept as given, even when equal to the default: with ``--smoke`` (a bool
    field ``smoke`` set to true), ``smoke``'s values fill only the fields
    that were *not* given, so ``--smoke --rank=8`` trains rank 8.

    Args:
      cls: the frozen configuration dataclass.
      argv: the arguments (``sys.argv[1:]``).
      smoke: the small settings ``--smoke`` implies (the script's ``SMOKE``).

    Returns:
      The configuration.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if any(arg in ("-h", "--help") for arg in argv):
        print(cli_help(cls, smoke=smoke))
        raise SystemExit(0)
    kw = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}; use --field=value")
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise SystemExit(f"unknown option --{name}; known: "
                             + ", ".join(f"--{n}" for n in fields))
        try:
            kw[name] = _convert(name, hints[name], value)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if smoke and kw.get("smoke"):
        unknown = sorted(set(smoke) - set(fields))
        if unknown:
            raise ValueError(f"parse_cli: smoke settings {unknown} are not fields of "
                             f"{cls.__name__}")
        kw = {**smoke, **kw}  # what was given wins
    return cls(**kw)


# ----------------------------------------------------------------------------
# Optimizer: clip -> method transform with a schedule -> MultiSteps.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Schedule, clipping and accumulation (optimizer updates, not micro-steps)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"  # or "linear"
    end_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    accum_steps: int = 1


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to ``lr`` then cosine or linear decay to ``lr * end_lr_ratio``."""
    end = cfg.lr * cfg.end_lr_ratio
    warm = max(cfg.warmup_steps, 0)
    decay = max(cfg.total_steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay)
    else:
        raise ValueError(f"schedule: expected 'cosine' or 'linear', got {cfg.schedule!r}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def wrap_optimizer(inner: optax.GradientTransformation, cfg: OptimConfig
                   ) -> optax.GradientTransformation:
    """``clip_by_global_norm`` before ``inner``, then ``MultiSteps`` accumulation."""
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), inner)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx


# ----------------------------------------------------------------------------
# Methods: name -> builder of (trainable, static, to_params, optimizer, export).
# Builders: (cfg, params, sched, key, *, init_data: InitData | None) -> Setup.
# ----------------------------------------------------------------------------
def _whole(trainable: Any) -> Any:
    return trainable


class Setup(NamedTuple):
    """What a method contributes to a run.

    Attributes:
      trainable: the pytree the loop carries and checkpoints: the
        differentiated tree (adapter state or parameters), or for methods
        with their own step (``make_trainer``) whatever that step carries.
      static: non-differentiated arguments (base params, frozen adapter parts).
      to_params: ``(trainable, static) -> params`` for the model.
      optimizer: the method's transform (before clipping and accumulation).
      export: ``(trainable, static) -> tree`` saved as "the adapter".
      describe: a description of what is trained (``tree.describe`` output).
      base: the frozen base parameters (counted as non-trainable by
        ``peftjax.report``), or None when ``trainable`` is the parameters.
      peft: ``(trainable, static) -> (assignment, AdapterState)`` of an
        adapter over the *original* parameters, for
        ``peftjax.io.save_peft``; None when the method has no Hugging Face
        PEFT format (LoRA-XS, LoRA-SB, sparse deltas, optimizer-side methods).
      make_trainer: ``(setup, loss_fn, OptimConfig) -> Trainer`` for a method
        whose step is not "gradient, then ``tx.update``" (SpIEL also rewrites
        its support); None: ``trainer`` builds the usual one.
      trained: ``trainable -> the trained part`` (what ``peftjax.report``
        counts as trainable parameters); the whole tree unless the carried
        tree also holds non-trained arrays (the sparse support's indices).
    """

    trainable: Any
    static: Any
    to_params: Callable[[Any, Any], Any]
    optimizer: optax.GradientTransformation
    export: Callable[[Any, Any], Any]
    describe: str
    base: Any = None
    peft: Callable[[Any, Any], Any] | None = None
    make_trainer: Callable[..., Any] | None = None
    trained: Callable[[Any], Any] = _whole


class InitData(NamedTuple):
    """What data-dependent initialisers (LoRA-SB) need, passed to every builder.

    Attributes:
      loss_fn: ``(params, batch) -> scalar`` (``lm_loss``).
      batches: the training batches for the statistics (a list, used once).
      optim: the run's schedule (LoRA-SB scales its init by the peak learning
        rate, warm-up ratio and step count).
    """

    loss_fn: Callable[[Any, Any], jax.Array]
    batches: list[Any]
    optim: "OptimConfig"


ATTN = r"(.*/)?self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel"
LINEAR = r"(.*/)?(self_attn|mlp)/\w+_proj/kernel"


def _adamw(sched, wd):
    return optax.adamw(sched, weight_decay=wd)


def one_leaf_at_a_time(run: Callable[[dict], Any], plan: dict) -> list[Any]:
    """``[run({path: plan[path]}) for path in plan]``, each finished before the next.

    ``run`` initialises one target in its own jitted program. Why not one
    program for every target: jaxlib's CPU LAPACK kernels (SVD, QR, eigh) cut
    a *batched* call, such as an SVD ``vmap``-ed over stacked layers, into
    chunks on XLA's intra-op thread pool and block a pool thread until the
    chunks are done. When one program runs two such calls at once on a pool
    with two threads (a 2-core machine), both threads wait for chunks no
    thread is free to run, and the process hangs with no CPU use: this was
    the LoRA-XS "hang" on SmolLM2 (four batched SVDs, one per q/k/v/o kernel
    stack of 30 layers, hang deterministically in ``jax.jit(adapters.init)``;
    PiSSA's jitted init hangs intermittently). One batched call at a time
    always leaves a thread free for the chunks. Per-leaf PRNG keys are
    folded from each path, so the result equals one joint init (bit for bit
    on the tiny Llama, where a joint init does not hang). The library now
    maps initialisers over stacked layers with ``lax.map``
    (``peftjax.adapters.map_slices``), one unbatched LAPACK call per slice,
    which fixes this for every caller; the per-leaf programs remain here as
    a belt-and-braces measure.
    """
    return [jax.block_until_ready(run({path: plan[path]})) for path in plan]


def init_adapters(assignment: dict, key: jax.Array, params: Any) -> adapters.AdapterState:
    """``adapters.init`` one target per jitted program (see ``one_leaf_at_a_time``)."""

    def run(sub):  # jitted: eager initialisation compiles one tiny program per op
        return jax.jit(lambda k, p: adapters.init(sub, k, p))(key, params)

    parts = one_leaf_at_a_time(run, assignment)
    return adapters.AdapterState({k: v for st in parts for k, v in st.trainable.items()},
                                 {k: v for st in parts for k, v in st.frozen.items()})


def _adapter_method(make_adapter: Callable[[Any], adapters.Adapter], *,
                    peft: bool = True):
    def build(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
        del init_data
        targets = getattr(cfg, "targets", ATTN) or ATTN
        assignment = tree.assign(params, [tree.Rule(where=targets,
                                                    then=make_adapter(cfg))])
        state = init_adapters(assignment, key, params)

        def to_params(t, s):
            return adapters.materialize(assignment, s["base"], t, s["frozen"])

        def peft_export(t, s):
            return assignment, adapters.AdapterState(t, s["frozen"])

        return Setup(state.trainable, {"base": params, "frozen": state.frozen},
                     to_params, _adamw(sched, cfg.weight_decay),
                     lambda t, s: {"trainable": t, "frozen": s["frozen"]},
                     tree.describe(assignment, params), params,
                     peft_export if peft else None)

    return build


def _full(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
          init_data: InitData | None = None) -> Setup:
    del key, init_data
    return Setup(params, None, lambda t, s: t, _adamw(sched, cfg.weight_decay),
                 lambda t, s: t, "full fine-tuning: every parameter is trained")


def _optim_namespace():
    try:
        import peftjax.optim as optim
    except ImportError as e:  # pragma: no cover - depends on issue 5's progress
        raise NotImplementedError(f"peftjax.optim is not importable yet: {e}") from e
    return optim


def _galore(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
            init_data: InitData | None = None) -> Setup:
    del key, init_data
    optim = _optim_namespace()
    rank = int(getattr(cfg, "galore_rank", 0) or cfg.rank)
    labels = tree.labels(params, [tree.Rule(where=LINEAR, then="galore")],
                         default="adamw")
    tx = optax.partition({
        "galore": optim.galore(sched, rank=rank,
                               update_proj_gap=int(getattr(cfg, "update_proj_gap", 200)),
                               scale=float(getattr(cfg, "galore_scale", 0.25)),
                               weight_decay=cfg.weight_decay),
        "adamw": _adamw(sched, cfg.weight_decay),
    }, labels)
    return Setup(params, None, lambda t, s: t, tx, lambda t, s: t,
                 f"GaLore rank {rank} on attention/MLP kernels, AdamW elsewhere")


def _pissa(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
           init_data: InitData | None = None) -> Setup:
    """PiSSA: the adapter starts at the top-r SVD of W and trains over the residual."""
    del init_data
    targets = getattr(cfg, "targets", ATTN) or ATTN
    plan = tree.assign(params, [tree.Rule(where=targets,
                                          then=inits.pissa(cfg.rank, alpha=cfg.alpha))])
    assignment: dict = {}

    def run(sub):  # one jitted program per target (see one_leaf_at_a_time)
        (path,) = sub

        def f(k, p):
            res = inits.init(sub, k, p)
            assignment.update(res.assignment)  # static adapters, known at trace
            return tree.leaves_by_path(res.params)[path], res.state

        return path, *jax.jit(f)(key, params)

    parts = one_leaf_at_a_time(run, plan)
    residual = {path: leaf for path, leaf, _ in parts}
    base = tree.map_with_path(lambda p, x: residual.get(p, x), params)
    state = adapters.AdapterState(
        {k: v for *_, st in parts for k, v in st.trainable.items()},
        {k: v for *_, st in parts for k, v in st.frozen.items()})
    initial = state.trainable

    def to_params(t, s):
        return adapters.materialize(assignment, s["base"], t, s["frozen"])

    def peft_export(t, s):  # a rank-2r LoRA over the unmodified base
        return inits.to_lora(plan, initial, t)

    return Setup(state.trainable, {"base": base, "frozen": state.frozen},
                 to_params, _adamw(sched, cfg.weight_decay),
                 lambda t, s: {"trainable": t, "frozen": s["frozen"]},
                 "PiSSA (residual base)\n" + tree.describe(assignment, params), base,
                 peft_export)


def _frugal(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
            init_data: InitData | None = None) -> Setup:
    del key, init_data
    optim = _optim_namespace()
    density = float(getattr(cfg, "frugal_density", 0.25))
    labels = tree.labels(params, [tree.Rule(where=LINEAR, then="frugal")],
                         default="adamw")
    tx = optax.partition({
        "frugal": optim.frugal(sched, density=density,
                               update_gap=int(getattr(cfg, "update_proj_gap", 200)),
                               weight_decay=cfg.weight_decay),
        "adamw": _adamw(sched, cfg.weight_decay),
    }, labels)
    return Setup(params, None, lambda t, s: t, tx, lambda t, s: t,
                 f"FRUGAL density {density} on attention/MLP kernels, AdamW elsewhere")


def _lisa(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
          init_data: InitData | None = None) -> Setup:
    del key, init_data
    optim = _optim_namespace()
    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    tx = optim.lisa(sched, n_layers=n_layers, n_active=int(getattr(cfg, "lisa_active", 2)),
                    interval=int(getattr(cfg, "lisa_interval", 20)),
                    weight_decay=cfg.weight_decay, layers=None, stacked=r"layers/.*",
                    key=0)
    return Setup(params, None, lambda t, s: t, tx, lambda t, s: t,
                 "LISA: embeddings, head and norms always, 2 sampled layers at a time")


def _loraplus(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
              init_data: InitData | None = None) -> Setup:
    optim = _optim_namespace()
    setup = _adapter_method(_lora)(cfg, params, sched, key, init_data=init_data)
    tx = optim.loraplus(sched, ratio=float(getattr(cfg, "loraplus_ratio", 16.0)),
                        weight_decay=cfg.weight_decay)
    return setup._replace(optimizer=tx)


def _lora_sb(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
             init_data: InitData | None = None) -> Setup:
    """LoRA-SB: a trainable ``r x r`` core between frozen bases set from the
    top-r SVD of an approximate first update (summed full-weight gradients
    over ``init_data.batches``); the base is not modified."""
    if init_data is None or not init_data.batches:
        raise ValueError(
            "--method=lora-sb initialises from accumulated full-weight gradients: "
            "build it with init_data=InitData(loss_fn, batches, optim) holding at "
            "least one batch (demo.py and compare_methods.py pass --stat_batches "
            "training batches)")
    targets = getattr(cfg, "targets", ATTN) or ATTN
    run_optim = init_data.optim
    payload = inits.lora_sb(cfg.rank, learning_rate=run_optim.lr,
                            warmup_ratio=run_optim.warmup_steps / run_optim.total_steps,
                            total_steps=run_optim.total_steps)
    plan = tree.assign(params, [tree.Rule(where=targets, then=payload)])
    stats = inits.accumulate_gradients(init_data.loss_fn, params, init_data.batches,
                                       list(plan), mean=False)
    assignment: dict = {}

    def run(sub):  # one jitted program per target (see one_leaf_at_a_time)
        (path,) = sub

        def f(k, p, g):
            res = inits.init(sub, k, p, stats=g)
            assignment.update(res.assignment)  # static adapters, known at trace
            return res.state

        return jax.jit(f)(key, params, {path: stats[path]})

    parts = one_leaf_at_a_time(run, plan)
    state = adapters.AdapterState(
        {k: v for st in parts for k, v in st.trainable.items()},
        {k: v for st in parts for k, v in st.frozen.items()})

    def to_params(t, s):
        return adapters.materialize(assignment, s["base"], t, s["frozen"])

    return Setup(state.trainable, {"base": params, "frozen": state.frozen}, to_params,
                 _adamw(sched, cfg.weight_decay),
                 lambda t, s: {"trainable": t, "frozen": s["frozen"]},
                 f"LoRA-SB (r x r core, {len(init_data.batches)} gradient batches)\n"
                 + tree.describe(assignment, params), params)


def _sparse(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array, *,
            init_data: InitData | None = None) -> Setup:
    """SpIEL sparse fine-tuning at LoRA's budget: ``k = r·(in + out)`` entries
    per targeted kernel (per layer of a stack), dropped and regrown on the
    SpIEL-AG schedule.

    The loop carries ``AdapterState(values, support)`` as "trainable" (the
    support's indices change on regrowth) and ``(sft_adamw state, SpIELState)``
    as "opt_state"; only the values are trained and counted.
    """
    del init_data
    optim = _optim_namespace()
    targets = getattr(cfg, "targets", ATTN) or ATTN
    lora_plan = tree.assign(params, [tree.Rule(where=targets,
                                               then=adapters.lora(cfg.rank))])
    flat = tree.leaves_by_path(params)
    assignment = tree.assign(params, [
        tree.Rule(where=re.escape(p), then=adapters.sparse_delta(
            k=cfg.rank * (flat[p].shape[-2] + flat[p].shape[-1])))
        for p in lora_plan])
    state = init_adapters(assignment, key, params)
    reselect = int(getattr(cfg, "spiel_reselection_steps", 20))
    accumulate = int(getattr(cfg, "spiel_accumulation_steps", 5))

    def to_params(c, s):
        return adapters.materialize(assignment, s["base"], c.trainable, c.frozen)

    return Setup(state, {"base": params}, to_params,
                 optim.sft_adamw(sched, weight_decay=cfg.weight_decay),
                 lambda c, s: {"trainable": c.trainable, "frozen": c.frozen},
                 f"SpIEL sparse deltas, k = {cfg.rank}·(in + out) per kernel (LoRA's "
                 f"budget), reselection every {reselect} steps after {accumulate} "
                 "steps of gradient accumulation\n" + tree.describe(assignment, params),
                 params, make_trainer=_spiel_trainer(reselect, accumulate),
                 trained=lambda c: c.trainable)


def _spiel_trainer(reselection_steps: int, accumulation_steps: int
                   ) -> Callable[..., "Trainer"]:
    """``make_trainer`` for ``_sparse``: ``optim.make_spiel_step`` in the loop's shape.

    Clipping is honoured (``clip_by_global_norm`` before ``sft_adamw``, inside
    the SpIEL step, so regrowth reseeds the moments there); gradient
    accumulation is refused: the step makes one optimizer step per batch and
    its reselection schedule counts those steps.
    """

    def make(setup: Setup, loss_fn: Callable, run_optim: OptimConfig) -> Trainer:
        if run_optim.accum_steps > 1:
            raise ValueError(
                f"--method=sparse: --accum_steps={run_optim.accum_steps} is not "
                "supported: the SpIEL step (optim.make_spiel_step) makes one optimizer "
                "step per batch and its reselection schedule counts those steps; use "
                "--accum_steps=1 with a larger --batch_size")
        optim = _optim_namespace()
        selector = masks.spiel_selector(total_steps=run_optim.total_steps,
                                        reselection_steps=reselection_steps,
                                        accumulation_steps=accumulation_steps)
        sopt = wrap_optimizer(setup.optimizer, run_optim)  # clip -> sft_adamw

        def init(carry):
            return (sopt.init(carry.trainable),
                    optim.spiel_init(carry.trainable, carry.frozen))

        def update(*_: Any, **__: Any):
            raise TypeError("--method=sparse: the SpIEL step updates the values, "
                            "support and optimizer state itself; call Trainer.step")

        def step(carry, opt_state, static, batch):
            spiel = optim.make_spiel_step(
                lambda t, f: setup.to_params(adapters.AdapterState(t, f), static),
                loss_fn, sopt, selector=selector, return_metrics=True)
            t, f, o, s, loss, m = spiel(carry.trainable, carry.frozen, *opt_state, batch)
            return adapters.AdapterState(t, f), (o, s), {"loss": loss, **m}

        return Trainer(optax.GradientTransformation(init, update), jax.jit(step))

    return make


def unavailable(name: str, issue: int, what: str) -> Callable[..., Setup]:
    """A method builder that raises: ``name`` is not built yet (``issue``)."""

    def build(*_: Any, **__: Any) -> Setup:
        raise NotImplementedError(
            f"--method={name}: {what} is not available here yet (tracked in issue "
            f"{issue}). Available now: " + ", ".join(available_methods()))

    build.unavailable = True  # type: ignore[attr-defined]
    return build


def _lora(cfg):
    return adapters.lora(cfg.rank, alpha=cfg.alpha)


def _dora(cfg):
    return adapters.dora(cfg.rank, alpha=cfg.alpha)


def _lora_xs(cfg):
    return adapters.lora_xs(cfg.rank, alpha=cfg.alpha)


def _if_built(name: str, attr: str, build: Callable[..., Setup]) -> Callable[..., Setup]:
    """``build`` when ``peftjax.optim.<attr>`` exists, else an ``unavailable`` stub."""
    try:
        optim = _optim_namespace()
    except NotImplementedError:
        optim = None
    if optim is None or not hasattr(optim, attr):
        return unavailable(name, 5, f"peftjax.optim.{attr}")
    return build


METHODS: dict[str, Callable[..., Setup]] = {
    "lora": _adapter_method(_lora),
    "dora": _adapter_method(_dora),
    "lora_xs": _adapter_method(_lora_xs, peft=False),  # PEFT has no LoRA-XS format
    "full": _full,
    "galore": _if_built("galore", "galore", _galore),
    "frugal": _if_built("frugal", "frugal", _frugal),
    "lisa": _if_built("lisa", "lisa", _lisa),
    "loraplus": _if_built("loraplus", "loraplus", _loraplus),
    "lora-sb": _lora_sb,  # needs init_data (gradient statistics)
    "pissa": _pissa,
    "sparse": _sparse,  # SpIEL: its own step (Setup.make_trainer)
}


def available_methods() -> list[str]:
    """Names in ``METHODS`` that are built."""
    return [n for n, b in METHODS.items() if not getattr(b, "unavailable", False)]


def method(name: str) -> Callable[..., Setup]:
    """Looks a method up; unknown names raise with the known ones."""
    if name not in METHODS:
        raise ValueError(f"--method={name!r} is unknown; choose one of {sorted(METHODS)}")
    return METHODS[name]


# ----------------------------------------------------------------------------
# Precision (--dtype).
# ----------------------------------------------------------------------------
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """``--dtype`` -> the model's compute dtype (None for float32: the params')."""
    if name not in DTYPES:
        raise ValueError(f"--dtype={name!r}: choose one of {sorted(DTYPES)}")
    return None if name == "f32" else DTYPES[name]


def precision(setup: Setup, name: str) -> Setup:
    """The bf16 recipe (``peftjax.adapters.cast_floating``) applied to ``setup``.

    Adapter methods (``setup.base`` set): the frozen base becomes bfloat16;
    adapters, their gradients and optimizer state stay float32. Optimizer-side
    methods: the trainable parameters stay float32 (the master copy, and the
    optimizer state with them); the bfloat16 compute dtype of the model
    (``load_lm(dtype=...)``) casts each kernel where it is used, inside the
    differentiated function, so gradients arrive in float32.
    """
    dtype = compute_dtype(name)
    if dtype is None or setup.base is None:
        return setup
    base = adapters.cast_floating(setup.base, dtype)
    return setup._replace(static={**setup.static, "base": base}, base=base)


# ----------------------------------------------------------------------------
# Loss, step, evaluation.
# ----------------------------------------------------------------------------
def lm_loss(apply_fn: Callable[..., jax.Array]) -> Callable[[Any, dict], jax.Array]:
    """Mean next-token cross-entropy over the weighted targets of a packed batch.

    ``apply_fn(params, tokens, attention_mask=..., positions=...,
    segment_ids=...) -> logits``: the model keeps attention inside each
    segment, so a block may hold several documents (``pack`` without
    ``one_document_per_block``); with one document per block the segment ids
    are 1 and 0 (padding) and the logits are those of a padding mask.
    """

    def loss_fn(params, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        logits = apply_fn(params, tokens, attention_mask=seg != 0,
                          positions=batch["positions"], segment_ids=seg)
        targets, weights = data.lm_targets(tokens, seg)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss_fn


def check_one_document(blocks: data.Blocks, what: str) -> None:
    """Raises if a block holds two documents (for models that mask padding only;
    ``lm_loss`` with peftjax's Llama handles packed blocks)."""
    if blocks.segment_ids.size and int(blocks.segment_ids.max()) > 1:
        raise ValueError(
            f"{what}: a block holds several documents, but the model's attention "
            "masks padding only; pack with one_document_per_block=True")


class Trainer(NamedTuple):
    """The full optimizer (clip, method, accumulation) and the jitted step."""

    tx: optax.GradientTransformation
    step: Callable[..., Any]


def trainer(setup: Setup, loss_fn: Callable, optim: OptimConfig) -> Trainer:
    """Builds the optimizer chain and the jitted step for ``setup`` (the
    method's own ``setup.make_trainer`` when it has one)."""
    if setup.make_trainer is not None:
        return setup.make_trainer(setup, loss_fn, optim)
    tx = wrap_optimizer(setup.optimizer, optim)
    return Trainer(tx, make_step(setup, loss_fn, tx))


def make_step(setup: Setup, loss_fn: Callable, tx: optax.GradientTransformation):
    """Jitted ``(trainable, opt_state, static, batch) -> (trainable, opt_state, metrics)``.

    A step with a non-finite loss or gradient is skipped
    (``adapters.update_if_finite``: state returned unchanged, ``metrics["skipped"]``
    is 1); under ``MultiSteps`` that drops the micro-batch.
    """

    def step(trainable, opt_state, static, batch):
        def objective(t):
            return loss_fn(setup.to_params(t, static), batch)

        loss, grads = jax.value_and_grad(objective)(trainable)
        trainable, opt_state, skipped = adapters.update_if_finite(
            tx, grads, opt_state, trainable, loss)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                                      "skipped": skipped}

    return jax.jit(step)


def evaluator(setup: Setup, loss_fn: Callable) -> Callable[[Any, data.Batches], float]:
    """``evaluate(trainable, batches) -> perplexity`` (exp of the token-weighted
    mean NLL over one pass of ``batches``); compiled once per batch shape."""

    @jax.jit
    def nll_sum(t, static, batch):
        mean = loss_fn(setup.to_params(t, static), batch)
        w = jnp.sum(data.lm_targets(batch["tokens"], batch["segment_ids"])[1])
        return mean * w, w

    def evaluate(trainable: Any, batches: data.Batches) -> float:
        total, count = 0.0, 0.0
        for _, batch in batches.iterate(0, batches.steps_per_epoch):
            s, w = nll_sum(trainable, setup.static, batch)
            total, count = total + float(s), count + float(w)
        return math.exp(total / max(count, 1.0))

    return evaluate


# ----------------------------------------------------------------------------
# The loop: progress bar, JSONL metrics, checkpoints, resume on signal.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class LoopResult:
    """What ``train`` returns."""

    trainable: Any
    opt_state: Any
    step: int
    history: list[dict[str, Any]]
    interrupted_by: int | None
    seconds: float
    skipped: int = 0  # steps skipped for a non-finite loss or gradient


class TooManySkippedSteps(FloatingPointError):
    """``train`` saw ``max_skipped_in_a_row`` consecutive non-finite steps."""


def resume_step(ckpt_dir: str | None) -> int:
    """The step ``--resume`` continues from: the newest intact checkpoint.

    Cheap next to loading a model (it reads the checkpoint's files once), so
    scripts call it before loading anything: ``--resume`` without a usable
    checkpoint fails at once.

    Raises:
      ValueError: no checkpoint under ``ckpt_dir``, or every step is damaged
        (the newest one's damage is named).
    """
    from peftjax.io import checkpoint

    step = checkpoint.latest_intact_step(ckpt_dir) if ckpt_dir else None
    if step is not None:
        return step
    steps = checkpoint.all_steps(ckpt_dir) if ckpt_dir else []
    if not steps:
        raise ValueError(
            f"--resume: no checkpoint under {ckpt_dir!r}; run once without --resume "
            "(the run saves its state every --checkpoint_every steps and when it is "
            "stopped with SIGTERM or Ctrl-C)")
    try:
        checkpoint.validate(ckpt_dir, steps[-1])
        why = ""
    except checkpoint.CheckpointError as e:
        why = f"; the newest: {e}"
    raise ValueError(f"--resume: every checkpoint under {ckpt_dir!r} is damaged "
                     f"(steps {steps}){why}; start again without --resume")


def set_aside_damaged(ckpt_dir: str, intact: int) -> dict[int, str]:
    """Moves the (damaged) steps newer than ``intact`` out of ``ckpt_dir`` into
    ``<ckpt_dir>.damaged/`` so that training can save those steps again; they
    are kept there, not deleted. Returns ``{step: where it went}``."""
    from peftjax.io import checkpoint

    moved = {}
    for s in checkpoint.all_steps(ckpt_dir):
        if s <= intact:
            continue
        dest = os.path.join(ckpt_dir.rstrip(os.sep) + ".damaged", str(s))
        n = 1
        while os.path.lexists(dest):
            dest, n = os.path.join(os.path.dirname(dest), f"{s}-{n}"), n + 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(os.path.join(ckpt_dir, str(s)), dest)
        moved[s] = dest
    return moved


def train(*, setup: Setup, run: Trainer, optim: OptimConfig, batches: data.Batches, key: jax.Array, log_path: str | None = None,
          ckpt_dir: str | None = None, checkpoint_every: int = 0, resume: bool = False,
          progress: bool = True, desc: str = "train",
          max_skipped_in_a_row: int = 10) -> LoopResult:
    """Runs ``optim.total_steps * optim.accum_steps`` micro-steps.

    A step with a non-finite loss or gradient is skipped by the step itself
    (state unchanged; ``"skipped": 1`` in its metrics row); after
    ``max_skipped_in_a_row`` consecutive skips the loop raises
    ``TooManySkippedSteps`` naming the steps (the state it holds is the one
    before the first of them).

    Checkpoints ``{"trainable", "opt_state", "step", "key", "data_position"}``
    every ``checkpoint_every`` micro-steps and when SIGTERM/SIGINT arrives (the
    handler only sets a flag; the loop saves, waits, and returns with
    ``interrupted_by`` set). ``resume=True`` continues from the newest intact
    checkpoint in ``ckpt_dir`` (``resume_step``; damaged newer steps are set
    aside, ``set_aside_damaged``), says which, and gives bit-identical results.
    """
    from peftjax.io import checkpoint

    if max_skipped_in_a_row < 1:
        raise ValueError(f"max_skipped_in_a_row must be >= 1, got {max_skipped_in_a_row}")
    sched = schedule(optim)
    trainable = setup.trainable
    opt_state = jax.jit(run.tx.init)(trainable)  # one program, not one per leaf op
    start = 0
    if resume:
        intact = resume_step(ckpt_dir)  # raises without a usable checkpoint
        moved = set_aside_damaged(str(ckpt_dir), intact)
        like = {"trainable": trainable, "opt_state": opt_state, "step": 0,
                "key": key, "data_position": 0}
        restored = checkpoint.restore(ckpt_dir, like, step=intact)
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        start, key = restored["step"], restored["key"]
        if restored["data_position"] != start:
            raise ValueError(f"--resume: data position {restored['data_position']} "
                             f"!= step {start} in {ckpt_dir!r}")
        print(f"resumed from step {start} (checkpoint under {ckpt_dir})"
              + "".join(f"; damaged step {s} moved to {d}" for s, d in moved.items()),
              flush=True)
        if log_path and os.path.exists(log_path):  # drop rows after the resumed step
            with open(log_path, encoding="utf-8") as f:
                rows = [r for r in f if r.strip() and json.loads(r)["step"] <= start]
            with open(log_path, "w", encoding="utf-8") as f:
                f.writelines(rows)
    step_fn = run.step
    total = optim.total_steps * optim.accum_steps
    history: list[dict[str, Any]] = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None

    def save(step):
        if ckpt_dir and checkpoint.latest_step(ckpt_dir) != step:
            checkpoint.save(ckpt_dir, step, {
                "trainable": trainable, "opt_state": opt_state, "step": step,
                "key": key, "data_position": step})

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=desc, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    step = start
    interrupted = None
    in_a_row = skipped_total = 0
    try:
        with checkpoint.SignalFlag() as stop:
            for position, batch in batches.iterate(start, total):
                tick = time.perf_counter()
                key, _ = jax.random.split(key)  # reserved for stochastic methods
                trainable, opt_state, metrics = step_fn(trainable, opt_state,
                                                        setup.static, batch)
                loss = float(metrics["loss"])
                dt = time.perf_counter() - tick
                step = position + 1
                ntok = int((batch["segment_ids"] != 0).sum())
                rec = {"step": step, "loss": loss,
                       "lr": float(sched(position // optim.accum_steps)),
                       "tokens_per_s": ntok / dt, "seconds": dt}
                if "grad_norm" in metrics:  # the SpIEL step reports none
                    rec["grad_norm"] = float(metrics["grad_norm"])
                skipped = int(metrics["skipped"])
                rec["skipped"] = skipped
                in_a_row = in_a_row + 1 if skipped else 0
                skipped_total += skipped
                history.append(rec)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{ntok / dt:,.0f}")
                    bar.update(1)
                if in_a_row >= max_skipped_in_a_row:
                    raise TooManySkippedSteps(
                        f"training stopped: {in_a_row} steps in a row (steps "
                        f"{step - in_a_row + 1} to {step}) had a non-finite loss or "
                        f"gradient (last loss {loss}); each was skipped, so the state is "
                        f"the one after step {step - in_a_row}. Check those batches, "
                        "lower the learning rate or use float32, or allow more "
                        "consecutive skips (max_skipped_in_a_row)")
                if stop or (checkpoint_every and step % checkpoint_every == 0):
                    save(step)
                if stop:
                    interrupted = stop.received
                    break
    finally:
        if bar is not None:
            bar.close()
        if log:
            log.close()
    return LoopResult(trainable, opt_state, step, history, interrupted,
                      time.perf_counter() - t0, skipped_total)


# ----------------------------------------------------------------------------
# Records, plots.
# ----------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """git SHA, library versions, backend and device kind, host facts."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    import flax

    return {
        "git_sha": sha, "peftjax": peftjax.__version__, "jax": jax.__version__,
        "optax": optax.__version__, "flax": flax.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "loadavg": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def append_result(name: str, cfg: Any, results: dict[str, Any]) -> str:
    """Appends ``{config, results, environment}`` to ``experiments/results/<name>.jsonl``."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"config": dataclasses.asdict(cfg), "results": results,
                            "environment": environment()}, default=str) + "\n")
    return path


def human_bytes(b: int | None) -> str:
    """``1536 -> '1.5 KiB'``."""
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b} B"


def plot_curves(path: str, curves: dict[str, list[float]], *, title: str) -> None:
    """Saves loss curves (one line per name) to a PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        x = np.arange(1, len(ys) + 1)
        line, = ax.plot(x, ys, alpha=0.35, linewidth=1)
        w = min(10, max(len(ys) // 5, 1))
        if w > 1:  # a moving average makes the trend readable on small batches
            smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], smooth, color=line.get_color(), label=f"{name} ({w}-step mean)")
        else:
            line.set_label(name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
