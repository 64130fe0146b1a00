# SPDX-License-Identifier: Apache-2.0
"""The training recipe shared by the demo and the experiments (public API only).

Not an experiment itself: ``demo.py``, ``compare_methods.py``,
``init_comparison.py`` and ``pretrain_galore.py`` import it so they train the
same way. Training is ``peftjax.train``: ``start`` builds a
``train.trainer`` from a method's ``Setup`` (``_methods.METHODS``) with the
optimizer ``clip_by_global_norm -> the method's transform`` and gradient
accumulation over ``--accum_steps`` micro-batches, and ``train.fit`` runs it
(progress, JSONL metrics, checkpoints every N steps and on SIGTERM, resume).
What stays here is the experiments' own: precision (``--dtype=bf16``: a
bfloat16 frozen base, float32 trainables and optimizer state), exports, and
records (environment JSONL, tables' byte counts).
"""

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import peftjax
from peftjax import adapters, data, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# re-exported: experiments import _recipe only
from _lm import (  # noqa: E402,F401
    LM,
    Corpus,
    apply_fn,
    byte_decode,
    byte_encode,
    corpus,
    documents,
    evaluator,
    lm_loss,
    load_lm,
    tiny_llama,
)
from _methods import (  # noqa: E402,F401
    ATTN,
    LINEAR,
    METHODS,
    InitData,
    OptimConfig,
    Setup,
    available_methods,
    data_driven,
    method,
    unavailable,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# git-ignored; tests point PEFTJAX_RESULTS_DIR elsewhere so smoke runs leave no trace
RESULTS_DIR = os.environ.get("PEFTJAX_RESULTS_DIR") or os.path.join(ROOT, "experiments",
                                                                     "results")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """``--dtype`` -> the model's compute dtype (None for float32: the params')."""
    if name not in DTYPES:
        raise ValueError(f"--dtype={name!r}: choose one of {sorted(DTYPES)}")
    return None if name == "f32" else DTYPES[name]


def precision(setup: Setup, name: str) -> Setup:
    """The bf16 recipe (``peftjax.adapters.cast_floating``) applied to ``setup``.

    Adapter methods: the frozen base becomes bfloat16; adapters, their
    gradients and optimizer state stay float32. Methods that train the
    parameters (optimizer-side, or leaves trained in full) keep them float32
    (the master copy); the bfloat16 compute dtype of the model
    (``load_lm(dtype=...)``) casts each kernel where it is used.
    """
    dtype = compute_dtype(name)
    if dtype is None or setup.adapters is None or setup.full is not None:
        return setup
    return setup._replace(params=adapters.cast_floating(setup.params, dtype))


def micro_batches(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """A batch of ``n * B`` blocks as ``n`` micro-batches of ``B`` (leading axis)."""
    if n == 1:
        return batch
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


class Run(NamedTuple):
    """A method ready to train: the trainer, its initial state and the base."""

    trainer: Any  # train.trainer(...)
    state: train.TrainState
    base: Any  # the frozen parameters every step reads (None: they are trained)
    accum_steps: int
    evaluate: Callable[[Any, data.Batches], float]  # (state, batches) -> perplexity

    def step(self, state: train.TrainState, batch: dict[str, Any]) -> Any:
        """One update on ``batch`` (``accum_steps * B`` blocks: ``train.fit``'s step)."""
        batch = micro_batches(batch, self.accum_steps)
        if self.base is None:
            return self.trainer.step(state, batch)
        return self.trainer.step(state, batch, self.base)

    def params(self, state: train.TrainState) -> Any:
        """The parameter tree the model sees at ``state``."""
        return self.trainer.params(state, self.base)


def model_loss(setup: Setup, graphdef: Any, name: str, *, pack: bool = False) -> Callable:
    """``lm_loss`` of the model as ``setup`` calls it (``Setup.model``: a
    prompt, prefix or hooks fed to the model; else the plain model).

    Raises:
      ValueError: ``pack`` with a method that feeds the model a prompt or a
        prefix (peftjax's models take no packed segments with them).
    """
    if setup.model is None:
        return lm_loss(apply_fn(graphdef))
    if pack:
        raise ValueError(f"--method={name} feeds the model a prompt, prefix or hooks, "
                         "which peftjax's models do not combine with packed blocks "
                         "(segment ids); drop --pack")
    return lm_loss(setup.model(graphdef))


def start(setup: Setup, loss_fn: Callable, run: OptimConfig, key: jax.Array) -> Run:
    """``train.trainer`` for ``setup`` and its initial state (adapters
    initialised from ``key``, as ``trainer.init`` does).

    The optimizer clips before the method's transform; each update
    accumulates ``run.accum_steps`` micro-batches, read from batches of
    ``accum_steps * B`` blocks (``data.Batches(batch_size=accum_steps * B)``).
    """
    tx = optax.chain(optax.clip_by_global_norm(run.clip_norm), setup.optimizer)
    t = train.trainer(loss_fn, tx, adapters=setup.adapters, full=setup.full,
                      sparse=setup.sparse, accumulate=run.accum_steps)
    if setup.initial is None:  # jitted: eager init compiles one tiny program per op
        state = jax.jit(t.init)(key, setup.params)
    else:  # a data-driven initialiser computed the adapters; copied, as the step
        # donates the state and the setup keeps its initial values (PiSSA's export)
        trainable, frozen = jax.tree.map(jnp.copy, tuple(setup.initial))
        state = train.TrainState(trainable, frozen, jax.jit(tx.init)(trainable),
                                 jnp.int32(0), jax.random.split(key)[1])
    base = setup.base
    evaluate = evaluator(loss_fn, t.params)
    return Run(t, state, base, run.accum_steps,
               lambda s, batches: evaluate(s, base, batches))


def report(run: Run, batch: Any) -> peftjax.Report:
    """``peftjax.report`` of one training step (compiled, not run; donated state)."""
    batch = micro_batches(batch, run.accum_steps)
    return peftjax.report(run.trainer.step, run.state, batch, run.base,
                          params=run.base, trainable=run.state.trainable,
                          opt_state=run.state.opt_state, donate_argnums=(0,))


def export(run: Run, state: train.TrainState) -> Any:
    """What is saved as "the adapter": ``{"trainable", "frozen"}`` of adapter
    methods, the parameters of methods that train them."""
    if run.base is None:
        return state.trainable
    return {"trainable": state.trainable, "frozen": state.frozen}


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
