# SPDX-License-Identifier: Apache-2.0
"""The training state: everything a run carries from one step to the next.

``TrainState`` is one pytree, so ``peftjax.io.checkpoint.save`` writes it and
``restore`` reads it back as a whole; the base parameters are not in it (they
come from the pretrained checkpoint and never change).

Exports: ``TrainState``.
"""

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    """What a training step reads and returns.

    Attributes:
      trainable: the differentiated tree. Adapter-only: ``{path:
        AdapterParams}``; hybrid: ``{"adapters": {...}, "full": {path:
        leaf}}``; optimizer-only: the whole parameter tree.
      frozen: the adapters' frozen parts (``AdapterState.frozen``: bases,
        sparse supports), ``{}`` when there are none.
      opt_state: the optimizer state (sparse fine-tuning: ``(optimizer
        state, SpIELState)``).
      step: ``()`` int32, steps taken, skipped ones included.
      key: a new-style PRNG key, split on every step (adapter dropout).
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    step: jax.Array  # shape=(), dtype=jnp.int32
    key: jax.Array  # shape=(), a typed PRNG key
