# SPDX-License-Identifier: Apache-2.0
"""The types every method builder returns or reads (public API only).

``OptimConfig`` (schedule, clipping, accumulation), ``Setup`` (what a method
contributes to a run), ``InitData`` (what builders may read beyond the
parameters). Shared by ``_methods`` and ``_methods_inputs``; re-exported by
``_recipe``.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from peftjax import masks


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Schedule, clipping and accumulation, counted in optimizer updates."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"  # or "linear"
    end_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    accum_steps: int = 1  # micro-batches per update (train.trainer(accumulate=...))

    def learning_rate(self) -> optax.Schedule:
        """Linear warm-up to ``lr``, then cosine or linear decay to ``lr * end_lr_ratio``."""
        warm, decay = max(self.warmup_steps, 0), max(self.total_steps - self.warmup_steps, 1)
        if self.schedule == "cosine":
            after = optax.cosine_decay_schedule(self.lr, decay, alpha=self.end_lr_ratio)
        elif self.schedule == "linear":
            after = optax.linear_schedule(self.lr, self.lr * self.end_lr_ratio, decay)
        else:
            raise ValueError(f"schedule: expected 'cosine' or 'linear', got {self.schedule!r}")
        if warm == 0:
            return after
        return optax.join_schedules([optax.linear_schedule(0.0, self.lr, warm), after], [warm])


class Setup(NamedTuple):
    """What a method contributes to a run.

    Attributes:
      params: the model parameters the run starts from (PiSSA: its residual
        base). Adapter methods train over them frozen; optimizer-side
        methods (``adapters is None``) train them.
      optimizer: the method's transform (the recipe clips before it).
      describe: what is trained (``tree.describe`` output or a sentence).
      adapters: the ``{path: Adapter}`` assignment, or None.
      full: rules of leaves trained in full next to the adapters, or None.
      sparse: a ``masks.Selector`` (SpIEL drop-and-regrow), or None.
      initial: the adapter state a data-driven initialiser computed; None:
        the trainer initialises the adapters.
      peft: ``TrainState -> (assignment, AdapterState)``, an adapter over the
        original parameters for ``peftjax.io.save_peft``; None when the
        method has no Hugging Face PEFT format.
      model: ``graphdef -> apply(params, tokens, **kw) -> logits``, how the
        model is called on ``params`` when the method feeds it inputs (a soft
        prompt, a prefix, hooks): ``params`` is then ``{"model": the base,
        <method>: its own parameters}``, the method's parameters are trained
        as ``full`` leaves and ``adapters`` is ``{}``; None: the model is
        called on the parameters as they are.
      cycles: COLA's number of equal links (``train.cola``: train, merge,
        re-initialise the adapters and the optimizer state, repeat); 0 trains
        one run with ``train.fit``.
    """

    params: Any
    optimizer: optax.GradientTransformation
    describe: str
    adapters: dict | None = None
    full: list | None = None
    sparse: masks.Selector | None = None
    initial: Any = None  # an adapters.AdapterState
    peft: Callable[[Any], Any] | None = None
    model: Callable[[Any], Callable[..., jax.Array]] | None = None
    cycles: int = 0

    @property
    def base(self) -> Any:
        """The frozen parameters the step reads (None: the parameters are trained)."""
        return None if self.adapters is None else self.params


class InitData(NamedTuple):
    """What builders may read beyond the parameters: ``loss_fn(params,
    batch)`` and training batches for data-dependent initialisers (LoRA-SB's
    statistics, CPT's context; used once), and the model's config (the
    geometry of prefixes and hooks)."""

    loss_fn: Callable[[Any, Any], jax.Array]
    batches: list[Any]
    config: Any = None


def adamw(run: OptimConfig) -> optax.GradientTransformation:
    """AdamW at ``run``'s schedule and weight decay."""
    return optax.adamw(run.learning_rate(), weight_decay=run.weight_decay)
