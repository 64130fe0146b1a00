# SPDX-License-Identifier: Apache-2.0
"""COLA (Chain of LoRA): train, merge into the base, re-initialise, repeat.

Chain of LoRA: Efficient Fine-tuning of Language Models via Residual
Learning. Xia, Qin & Hazan, 2024. https://arxiv.org/abs/2401.04151

COLA is a training schedule, not a new reparametrisation: the model is
``W = W_pt + Σ_j s·A_j B_j`` (a chain of LoRA modules), learnt one link at a
time, in the three steps of the paper's Algorithm 1 repeated for ``j = 1 ..
M``:

1. *Tune LoRA*: train the adapters ``A_j, B_j`` on the current base ``W``
   (``W`` frozen), for ``cycles[j]`` steps;
2. *Tie a knot*: merge them into the base, ``W ← W + s·A_j B_j``;
3. *Extend the chain*: re-initialise a fresh LoRA (``B = 0``, so the model
   does not change at the restart) and reset its optimizer state.

Each link is a rank-``r`` residual update, so the total change
``W_M - W_pt`` can reach rank ``M·r`` while every phase trains and stores
only rank-``r`` factors and their optimizer moments (the paper's "no extra
compute or memory"). The paper motivates the chain as Frank-Wolfe on the
residual; its experiments train every link for the same number of steps.

Here it is a schedule over the one training API: a ``train.trainer``'s step
runs every phase through ``train.fit`` unchanged. Step 2 is
``Trainer.params(state, base)``, the adapters folded into the base in its
dtype (``adapters.materialize`` with dropout off, i.e. ``adapters.fold``; a
hybrid trainer's full leaves are spliced in too, so they carry over to the
next phase). Step 3 is ``Trainer.init`` on the merged base with a fresh key
(``jax.random.fold_in(key, j)``): new adapter parameters, a new optimizer
state, ``state.step = 0``. The jitted step is compiled once: the base is an
argument of the step, and its shapes and dtypes never change.

Exports: ``ColaResult``, ``cola``.
"""

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from peftjax import data
from peftjax.train._loop import FitResult, fit
from peftjax.train._state import TrainState
from peftjax.train._step import Trainer

PyTree = Any


class ColaResult(NamedTuple):
    """What ``cola`` returns.

    Attributes:
      params: the base with every link of the chain merged in (the model to
        evaluate or export; no adapter is left).
      bases: with ``keep_bases=True``, the base at the start of each link and
        the final one (``len(cycles) + 1`` trees; ``bases[0]`` is the given
        ``params``, ``bases[-1] is params``; unadapted leaves are shared, each
        tree holds its own adapted leaves); otherwise None.
      state: the last link's final ``TrainState`` (already merged into
        ``params``).
      fits: one ``train.FitResult`` per link (its ``history`` counts steps
        from 1 within the link).
      history: every link's per-step rows, with ``"cycle"`` (0-based) and
        ``"step"`` counted over the whole chain.
    """

    params: PyTree
    bases: list[PyTree] | None
    state: TrainState
    fits: list[FitResult]
    history: list[dict[str, Any]]


def _check(t, cycles, key):
    if not isinstance(t, Trainer):
        raise TypeError(f"cola: t must be a train.Trainer (from train.trainer), got "
                        f"{type(t).__name__}")
    if isinstance(cycles, (str, bytes)) or not isinstance(cycles, Sequence) or not cycles:
        raise ValueError(f"cola: cycles must be a non-empty sequence of step counts (one "
                         f"per link of the chain), got {cycles!r}")
    for i, n in enumerate(cycles):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"cola: cycles[{i}] must be a positive int, got {n!r}")
    if not isinstance(key, jax.Array):
        raise TypeError(f"cola: key must be a jax.random.key, got {type(key).__name__}")


def cola(t: Trainer, params: PyTree, batches: Any, *, key: jax.Array,
         cycles: Sequence[int],
         eval_fn: Callable[[PyTree], Mapping[str, Any]] | None = None,
         eval_every: int = 0, schedule: Callable[[int], Any] | None = None,
         progress: bool = True, desc: str = "cola",
         max_skipped_in_a_row: int = 10, keep_bases: bool = False) -> ColaResult:
    """Trains a chain of LoRA modules (COLA): train, merge, re-initialise, repeat.

    Link ``j`` (0-based) starts ``t.init(jax.random.fold_in(key, j), base)``
    (fresh adapters and a fresh optimizer state), runs ``train.fit`` for
    ``cycles[j]`` steps of ``t.step`` with ``params=base``, and merges:
    ``base = t.params(state, base)``. The batches are consumed in order
    across links (link ``j`` continues where link ``j - 1`` stopped). With
    ``cycles=[n]`` this is plain training followed by ``adapters.fold``. A
    link stopped early (SIGTERM/SIGINT, or a finite iterable that ran out) is
    merged and ends the chain (``ColaResult.fits[-1]`` says which).

    Args:
      t: a ``train.trainer`` with ``adapters=`` (adapter-only, hybrid or
        sparse; an optimizer-only trainer has nothing to merge). Build it with
        an adapter whose init is the identity (LoRA's ``B = 0``) so that the
        model does not jump at a restart.
      params: the base tree (never modified).
      batches: a ``peftjax.data.Batches`` (link ``j`` reads positions
        ``sum(cycles[:j]) ..``) or any iterable of batches (drawn from one
        iterator across links).
      key: a ``jax.random.key``; link ``j`` initialises with
        ``fold_in(key, j)``.
      cycles: the number of steps of each link (the chain length ``M`` is
        ``len(cycles)``); the paper uses equal links.
      eval_fn: ``effective params -> {name: scalar}``, called with
        ``t.params(state, base)`` every ``eval_every`` steps of a link and at
        the end of each link (``train.fit``'s ``eval_fn``).
      eval_every: see ``train.fit``.
      schedule: the learning-rate schedule for the log (``train.fit``); the
        optimizer's own count restarts with each link, so does its schedule.
      progress: a tqdm bar per link.
      desc: the bars' label (``"<desc> 1/M"``, ...).
      max_skipped_in_a_row: see ``train.fit``.
      keep_bases: also return every intermediate base (``ColaResult.bases``;
        each holds a copy of the adapted leaves, so this costs memory).

    Returns:
      A ``ColaResult``.

    Raises:
      TypeError / ValueError: a bad argument (naming it); an optimizer-only
        trainer (its step refuses a base). Whatever ``train.fit`` raises
        (e.g. ``TooManySkippedSteps``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from peftjax import adapters, train, tree
      >>> w_target = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> params = {"w": jnp.zeros((3, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
      >>> loss = lambda p, x: jnp.mean((x @ p["w"] - x @ w_target) ** 2)
      >>> t = train.trainer(loss, optax.adam(0.2), adapters=a)
      >>> r = train.cola(t, params, [jnp.eye(3)] * 150, key=jax.random.key(0),
      ...                cycles=[50, 50, 50], progress=False, keep_bases=True)
      >>> [int(jnp.linalg.matrix_rank(b["w"], rtol=1e-3)) for b in r.bases]
      [0, 1, 2, 3]
    """
    _check(t, cycles, key)
    if isinstance(batches, data.Batches):
        offsets = list(itertools.accumulate(cycles, initial=0))

        def source(j):
            return (b for _, b in batches.iterate(offsets[j], offsets[j + 1]))
    else:
        it = iter(batches)

        def source(j):
            return itertools.islice(it, cycles[j])

    base = params
    bases, fits, history = [params], [], []
    done = 0
    state = None
    for j, n in enumerate(cycles):
        state = t.init(jax.random.fold_in(key, j), base)
        current = base

        def eval_state(s, current=current):
            return eval_fn(t.params(s, current))

        r = fit(lambda s, b, current=current: t.step(s, b, current), state, source(j),
                steps=n, eval_fn=None if eval_fn is None else eval_state,
                eval_every=eval_every, schedule=schedule, progress=progress,
                desc=f"{desc} {j + 1}/{len(cycles)}",
                max_skipped_in_a_row=max_skipped_in_a_row)
        fits.append(r)
        history.extend({**row, "cycle": j, "step": done + row["step"]} for row in r.history)
        done += r.step
        state = r.state
        base = t.params(state, current)
        if keep_bases:
            bases.append(base)
        if r.interrupted_by is not None or r.step < n:
            break  # a signal or a finite iterable that ran out: stop the chain here
    return ColaResult(params=base, bases=bases if keep_bases else None, state=state,
                      fits=fits, history=history)
