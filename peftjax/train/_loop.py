# SPDX-License-Identifier: Apache-2.0
"""The training loop: ``fit`` runs a step over batches until ``state.step == steps``.

Around the step it keeps a tqdm bar, one JSONL row per step (and per
evaluation), an optional loss plot, checkpoints every N steps and when
SIGTERM/SIGINT arrives, and exact resume. The loop knows nothing of what the
step trains: it reads ``state.step`` (the number of updates done, skipped
ones included), hands the step one batch per update, and checkpoints the
whole ``TrainState`` as one tree through ``peftjax.io.checkpoint``. The data
position is ``state.step``: resuming at step ``s`` continues with batch ``s``.

Exports: ``fit``, ``FitResult``, ``TooManySkippedSteps``, ``resume_step``.
"""

import importlib.util
import itertools
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from peftjax import data
from peftjax.train._plot import plot_curves, require_matplotlib
from peftjax.train._state import TrainState


class FitResult(NamedTuple):
    """What ``fit`` returns.

    Attributes:
      state: the final ``TrainState``.
      step: ``int(state.step)``.
      history: this call's per-step rows (the dicts written to the JSONL log).
      interrupted_by: the signal number that stopped the run, or None.
      seconds: wall time of the loop.
      skipped: steps skipped (non-finite loss or gradient) in this call.
      evals: ``[{"step": s, **eval_fn(state)}]`` in this call, as floats.
    """

    state: TrainState
    step: int
    history: list[dict[str, Any]]
    interrupted_by: int | None
    seconds: float
    skipped: int
    evals: list[dict[str, Any]]


class TooManySkippedSteps(FloatingPointError):
    """``fit`` saw ``max_skipped_in_a_row`` consecutive skipped steps.

    Attributes:
      first: the first step of the run of skips (1-based, as in the log).
      last: the last one.
      state: the state after the last one; its trainable leaves and optimizer
        state are those after step ``first - 1`` (skipped steps change only
        ``step`` and ``key``).

    Example:
      >>> e = TooManySkippedSteps("3 steps in a row", first=4, last=6, state=None)
      >>> (e.first, e.last)
      (4, 6)
    """

    def __init__(self, message: str, *, first: int, last: int, state: Any):
        super().__init__(message)
        self.first, self.last, self.state = first, last, state


def resume_step(checkpoint_dir: str | os.PathLike | None) -> int:
    """The step ``fit(..., resume=True)`` continues from: the newest intact checkpoint.

    Cheap next to loading a model (it reads the checkpoints' files once), so a
    script can call it before loading anything and fail at once when there is
    nothing to resume.

    Args:
      checkpoint_dir: the checkpoint root given to ``fit``.

    Returns:
      The step of the newest intact checkpoint.

    Raises:
      ValueError: no checkpoint under ``checkpoint_dir`` (or no directory), or
        every step is damaged (the newest one's damage is named).

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> from peftjax.io import checkpoint
      >>> d = tempfile.mkdtemp()
      >>> checkpoint.save(d, 4, {"w": jnp.zeros(2)})
      >>> resume_step(d)
      4
    """
    from peftjax.io import checkpoint

    if checkpoint_dir is None:
        raise ValueError("resume: no checkpoint_dir given; pass the directory the "
                         "interrupted run saved its checkpoints in")
    step = checkpoint.latest_intact_step(checkpoint_dir)
    if step is not None:
        return step
    steps = checkpoint.all_steps(checkpoint_dir)
    if not steps:
        raise ValueError(
            f"resume: no checkpoint under {os.fspath(checkpoint_dir)!r}; run once without "
            "resume (fit saves every checkpoint_every steps, at the end, and when it is "
            "stopped with SIGTERM or Ctrl-C)")
    try:
        checkpoint.validate(checkpoint_dir, steps[-1])
        why = ""
    except checkpoint.CheckpointError as e:
        why = f"; the newest: {e}"
    raise ValueError(f"resume: every checkpoint under {os.fspath(checkpoint_dir)!r} is "
                     f"damaged (steps {steps}){why}; start again without resume")


def _set_aside_damaged(checkpoint, directory: str, intact: int) -> dict[int, str]:
    """Moves the damaged steps newer than ``intact`` into ``<directory>.damaged/``
    (kept, never deleted) so those steps can be saved again; warns naming them."""
    moved, errors = {}, {}
    for s in checkpoint.all_steps(directory):
        if s <= intact:
            continue
        try:
            checkpoint.validate(directory, s)
        except checkpoint.CheckpointError as e:
            errors[s] = e
        dest = os.path.join(directory.rstrip(os.sep) + ".damaged", str(s))
        n = 1
        while os.path.lexists(dest):
            dest, n = os.path.join(os.path.dirname(dest), f"{s}-{n}"), n + 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(os.path.join(directory, str(s)), dest)
        moved[s] = dest
    if moved:
        warnings.warn(checkpoint.CheckpointWarning(
            f"fit: resumed from step {intact} under {directory!r}, the newest intact step; "
            + "; ".join(f"damaged step {s} moved to {d}" for s, d in moved.items()),
            step=intact, skipped=errors), stacklevel=3)
    return moved


def _truncate_log(path: str, step: int) -> None:
    """Keeps the log's rows up to ``step`` (a cut-off last line is dropped)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= step:
                kept.append(json.dumps(row) + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def _positions(batches: Any, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    """``(position, batch)`` for positions ``start .. stop - 1``."""
    if isinstance(batches, data.Batches):
        return batches.iterate(start, stop)
    if not isinstance(batches, Iterable):
        raise TypeError(f"fit: batches must be a peftjax.data.Batches or an iterable of "
                        f"batches, got {type(batches).__name__}")
    # range first: zip stops without drawing a batch past ``stop``.
    return zip(range(start, stop), itertools.islice(iter(batches), start, None),
               strict=False)


class _NoSignals:
    """Stands in for ``SignalFlag`` off the main thread (Python delivers signals
    to the main thread only)."""

    received = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __bool__(self):
        return False


def _scalar(where: str, name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        shape = getattr(value, "shape", None)
        raise TypeError(f"fit: {where} {name!r} must be a scalar, got "
                        f"{type(value).__name__}" + (f" of shape {shape}" if shape else "")
                        ) from e


def _check(step, state, steps, eval_fn, eval_every, schedule, checkpoint_dir,
           checkpoint_every, resume, max_skipped_in_a_row) -> None:
    if not callable(step):
        raise TypeError(f"fit: step must be callable (state, batch) -> (state, metrics), "
                        f"got {type(step).__name__}")
    if not isinstance(state, TrainState):
        raise TypeError(f"fit: state must be a peftjax.train.TrainState, got "
                        f"{type(state).__name__}")
    for name, value, low in (("steps", steps, 0), ("eval_every", eval_every, 0),
                             ("checkpoint_every", checkpoint_every, 0),
                             ("max_skipped_in_a_row", max_skipped_in_a_row, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"fit: {name} must be an int >= {low}, got {value!r}")
    if eval_every and eval_fn is None:
        raise ValueError(f"fit: eval_every={eval_every} needs an eval_fn")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"fit: eval_fn must be callable state -> dict, got "
                        f"{type(eval_fn).__name__}")
    if schedule is not None and not callable(schedule):
        raise TypeError(f"fit: schedule must be callable step -> learning rate, got "
                        f"{type(schedule).__name__}")
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError(f"fit: checkpoint_every={checkpoint_every}, resume={resume} "
                         "need a checkpoint_dir")


def fit(step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Any]]],
        state: TrainState, batches: Any, *, steps: int,
        eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
        eval_every: int = 0, schedule: Callable[[int], Any] | None = None,
        log_path: str | os.PathLike | None = None,
        plot_path: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
        resume: bool = False, progress: bool = True, desc: str = "train",
        max_skipped_in_a_row: int = 10) -> FitResult:
    """Runs ``step`` until ``state.step == steps``, with logs, checkpoints and resume.

    Batch ``p`` (0-based) feeds the update that takes ``state.step`` from ``p``
    to ``p + 1``; the loop starts at ``int(state.step)``. A step with a
    non-finite loss or gradient is skipped by the step itself (``metrics
    ["skipped"] == 1``); after ``max_skipped_in_a_row`` consecutive skips the
    loop raises ``TooManySkippedSteps`` naming the steps.

    Each step writes a row ``{"step", "loss", "lr", "grad_norm", "skipped",
    "tokens", "tokens_per_s", "seconds"}`` to ``log_path`` (``lr`` when a
    schedule is given: ``schedule(step - 1)``, the rate of that update;
    ``grad_norm`` and ``tokens`` when the step reports them). ``eval_fn(state)``
    runs every ``eval_every`` steps and once at the end (unless the run was
    interrupted); its row is ``{"step", "eval_<name>": value, ...,
    "eval_seconds"}``. Without ``resume`` the log is started afresh.

    With ``checkpoint_dir``, the state is saved every ``checkpoint_every``
    steps, at the end, and when SIGTERM or SIGINT arrives: the signal handler
    (``peftjax.io.checkpoint.SignalFlag``) only sets a flag; the loop finishes
    the step, saves, and returns with ``interrupted_by`` set (a second signal
    stops the process as usual). Signals are caught in the main thread only.
    ``resume=True`` restores the newest intact checkpoint into ``state``'s
    structure (``resume_step``; damaged newer steps are moved to
    ``<checkpoint_dir>.damaged/``, never deleted, with a ``CheckpointWarning``),
    drops the log's rows after it, and continues the data at that step: a
    ``peftjax.data.Batches`` through ``iterate(step, steps)``; any other
    iterable by skipping ``step`` batches, so it must yield the same sequence
    on every run for an exact resume.

    Args:
      step: ``(state, batch) -> (state, metrics)`` that advances
        ``state.step`` by one; ``metrics`` holds ``loss``, ``skipped`` (0/1)
        and optionally ``grad_norm`` and ``tokens`` (e.g.
        ``functools.partial(t.step, params=base)`` for a ``trainer`` ``t``).
      state: the ``TrainState`` to start from; with ``resume``, the structure
        the checkpoint is restored into (its values are not used).
      batches: a ``peftjax.data.Batches`` or any iterable of batches; a
        finite iterable that runs out ends the run early.
      steps: the total number of updates: the loop stops at ``state.step ==
        steps`` (not ``steps`` more).
      eval_fn: ``state -> {name: scalar}``, e.g. held-out loss or perplexity.
      eval_every: run ``eval_fn`` every this many steps (0: only at the end).
      schedule: the learning-rate schedule (an ``optax.Schedule``), for the log.
      log_path: the JSONL metrics file.
      plot_path: a PNG of the training loss (needs matplotlib: the ``demo``
        extra); drawn from the whole log when ``log_path`` is given.
      checkpoint_dir: the checkpoint root (``peftjax.io.checkpoint``); must hold
        no checkpoint unless ``resume``.
      checkpoint_every: save every this many steps (0: only at the end and on a
        signal).
      resume: continue from the newest intact checkpoint in ``checkpoint_dir``.
      progress: show a tqdm bar on stderr (needs tqdm: the ``train`` extra).
      desc: the bar's label and the plot's title.
      max_skipped_in_a_row: consecutive skipped steps that stop the run.

    Returns:
      A ``FitResult``.

    Raises:
      ValueError: bad arguments; ``resume`` without a usable checkpoint;
        ``checkpoint_dir`` already holds checkpoints without ``resume``;
        ``state.step`` is past ``steps``; the step did not advance
        ``state.step`` by one.
      TypeError: ``state`` is not a ``TrainState``; the step's metrics are
        not a mapping with a scalar ``loss``.
      TooManySkippedSteps: ``max_skipped_in_a_row`` skipped steps in a row.
      ImportError: ``progress`` without tqdm, ``plot_path`` without matplotlib.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import train
      >>> @jax.jit
      ... def sgd(state, batch):
      ...     loss, g = jax.value_and_grad(lambda w: jnp.sum((w - batch) ** 2))(
      ...         state.trainable)
      ...     return state._replace(trainable=state.trainable - 0.1 * g,
      ...                           step=state.step + 1), {"loss": loss, "skipped": 0}
      >>> s = train.TrainState(jnp.zeros(2), {}, (), jnp.int32(0), jax.random.key(0))
      >>> r = train.fit(sgd, s, [jnp.ones(2)] * 2, steps=2, progress=False)
      >>> r.step, [round(h["loss"], 2) for h in r.history]
      (2, [2.0, 1.28])
    """
    _check(step, state, steps, eval_fn, eval_every, schedule, checkpoint_dir,
           checkpoint_every, resume, max_skipped_in_a_row)
    if progress and importlib.util.find_spec("tqdm") is None:
        raise ImportError("fit: progress=True needs tqdm, which is not installed: "
                          "pip install 'peftjax[train]' (or tqdm), or pass progress=False")
    if plot_path is not None:
        require_matplotlib("fit: plot_path")
    from peftjax.io import checkpoint

    ckpt = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
    last_saved = None
    if resume:
        intact = resume_step(ckpt)  # raises without a usable checkpoint
        _set_aside_damaged(checkpoint, ckpt, intact)
        state = checkpoint.restore(ckpt, state, step=intact)
        if int(state.step) != intact:
            raise ValueError(f"fit: checkpoint {intact} under {ckpt!r} holds state.step "
                             f"{int(state.step)}; it was not written by fit")
        last_saved = intact
        if log_path is not None:
            _truncate_log(os.fspath(log_path), intact)
        if progress:
            print(f"{desc}: resumed from step {intact} (checkpoint under {ckpt})",
                  file=sys.stderr, flush=True)
    else:
        if ckpt is not None and checkpoint.all_steps(ckpt):
            raise ValueError(
                f"fit: {ckpt!r} already holds checkpoints (steps "
                f"{checkpoint.all_steps(ckpt)}); pass resume=True to continue that run, "
                "or use an empty directory")
        if log_path is not None:
            open(log_path, "w", encoding="utf-8").close()
    start = int(state.step)
    if start > steps:
        raise ValueError(f"fit: state.step is {start}, past steps={steps}")

    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    log = open(log_path, "a", encoding="utf-8") if log_path is not None else None

    def write(row):
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def evaluate(at):
        tick = time.perf_counter()
        out = eval_fn(state)
        if not isinstance(out, Mapping):
            raise TypeError(f"fit: eval_fn must return a dict of scalars, got "
                            f"{type(out).__name__}")
        values = {str(k): _scalar("eval_fn's", k, v) for k, v in out.items()}
        evals.append({"step": at, **values})
        write({"step": at, **{f"eval_{k}": v for k, v in values.items()},
               "eval_seconds": time.perf_counter() - tick})
        return at

    def save(at):
        checkpoint.save(ckpt, at, state)
        return at

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    main = threading.current_thread() is threading.main_thread()
    t0 = time.perf_counter()
    done = start
    interrupted = None
    last_eval = None
    in_a_row = skipped_total = 0
    try:
        with checkpoint.SignalFlag() if main else _NoSignals() as stop:
            for position, batch in _positions(batches, start, steps):
                tick = time.perf_counter()
                state, metrics = step(state, batch)
                if not isinstance(metrics, Mapping) or "loss" not in metrics:
                    raise TypeError("fit: step must return (state, metrics) with metrics "
                                    f"a dict holding 'loss'; got {type(metrics).__name__}"
                                    + (f" with keys {sorted(metrics)}"
                                       if isinstance(metrics, Mapping) else ""))
                loss = _scalar("metrics", "loss", metrics["loss"])  # waits for the step
                dt = time.perf_counter() - tick
                done = position + 1
                if not isinstance(state, TrainState) or int(state.step) != done:
                    raise ValueError(
                        f"fit: the step must return a TrainState with step advanced by one "
                        f"(expected {done}, got "
                        f"{getattr(state, 'step', type(state).__name__)})")
                skipped = int(metrics.get("skipped", 0))
                row: dict[str, Any] = {"step": done, "loss": loss}
                if schedule is not None:
                    row["lr"] = _scalar("schedule's", "value", schedule(position))
                if "grad_norm" in metrics:
                    row["grad_norm"] = _scalar("metrics", "grad_norm", metrics["grad_norm"])
                row["skipped"] = skipped
                if "tokens" in metrics:
                    row["tokens"] = int(metrics["tokens"])
                    row["tokens_per_s"] = row["tokens"] / dt
                row["seconds"] = dt
                history.append(row)
                write(row)
                in_a_row = in_a_row + 1 if skipped else 0
                skipped_total += skipped
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4g}", **(
                        {"tok_s": f"{row['tokens_per_s']:,.0f}"} if "tokens" in row else {}))
                    bar.update(1)
                if in_a_row >= max_skipped_in_a_row:
                    first = done - in_a_row + 1
                    raise TooManySkippedSteps(
                        f"training stopped: {in_a_row} steps in a row (steps {first} to "
                        f"{done}) had a non-finite loss or gradient (last loss {loss}); "
                        f"each was skipped, so the trained values are those after step "
                        f"{first - 1}. Check those batches, lower the learning rate or "
                        "use float32, or allow more consecutive skips "
                        "(max_skipped_in_a_row)", first=first, last=done, state=state)
                if eval_fn is not None and eval_every and done % eval_every == 0 and not stop:
                    last_eval = evaluate(done)
                if ckpt is not None and (stop or (checkpoint_every
                                                  and done % checkpoint_every == 0)):
                    last_saved = save(done)
                if stop:
                    interrupted = stop.received
                    break
        if interrupted is None:
            if eval_fn is not None and last_eval != done:
                evaluate(done)
            if ckpt is not None and last_saved != done:
                save(done)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t0
    if plot_path is not None:
        rows = history
        if log_path is not None:
            with open(log_path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
        if losses:
            plot_curves(os.fspath(plot_path), {desc: losses}, title=desc)
    return FitResult(state, done, history, interrupted, seconds, skipped_total, evals)
