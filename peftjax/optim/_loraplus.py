# SPDX-License-Identifier: Apache-2.0
"""LoRA+: a larger learning rate for the B factor of LoRA-family adapters.

Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
2024, https://arxiv.org/abs/2402.12354.

Paper ↔ code: ``η_B = λ·η_A`` (Sec. 4, ``λ = ratio``, 16 recommended) ↔
``scale_by_loraplus`` multiplying the update of every leaf whose canonical
path ends in ``/b`` (``LoRAParams(a, b)`` in ``dict[path, LoRAParams]``
adapter states) by ``ratio``. Adapters are found by key path, never imported.

Exports: ``LoRAPlusState``, ``scale_by_loraplus``, ``loraplus``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree


class LoRAPlusState(NamedTuple):
    """State of ``scale_by_loraplus``.

    Attributes:
      count: steps taken. # shape=(), dtype=jnp.int32
    """

    count: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED}


def _is_b(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "b"


def scale_by_loraplus(ratio: jax.typing.ArrayLike = 16.0) -> optax.GradientTransformation:
    """Multiplies the updates of adapter ``b`` leaves by ``ratio``.

    Place it after the normaliser (``optax.scale_by_adam``) and before the
    learning rate, so ``lr_b = ratio·lr_a``; the ``loraplus`` alias does this.

    Args:
      ratio: ``λ = η_B/η_A`` (injectable).

    Returns:
      An ``optax.GradientTransformation`` with ``LoRAPlusState``. Static
      arguments: none.

    Raises:
      ValueError: at ``init``, if no leaf path ends in ``/b`` (the message
        lists the paths seen).

    Example:
      >>> import jax.numpy as jnp
      >>> tr = {"dense/kernel": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 4))}}
      >>> tx = scale_by_loraplus(4.0)
      >>> u, _ = tx.update(tr, tx.init(tr))
      >>> float(u["dense/kernel"]["a"][0, 0]), float(u["dense/kernel"]["b"][0, 0])
      (1.0, 4.0)

    References:
      Hayou et al., 2024, https://arxiv.org/abs/2402.12354.
    """

    def init_fn(params):
        flat = tree.flatten(params)
        if flat and not any(_is_b(p) for p, _ in flat):
            raise ValueError(
                "scale_by_loraplus: no adapter leaf path ends in '/b' (LoRA's B "
                "factor); paths seen: "
                + ", ".join(f"{p} {tuple(x.shape)} {x.dtype}" for p, x in flat[:8])
            )
        return LoRAPlusState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params

        def one(path, u):
            if not _is_b(path):
                return u
            return u * jnp.asarray(ratio).astype(u.dtype)

        return tree.map_with_path(one, updates), LoRAPlusState(
            optax.safe_int32_increment(state.count)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def loraplus(
    learning_rate: optax.ScalarOrSchedule,
    ratio: jax.typing.ArrayLike = 16.0,
    inner: optax.GradientTransformation | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """LoRA+ optimizer: ``inner``, B-factor ratio, decoupled decay, lr.

    ``Δa = -lr·(inner(g)_a + wd·a)``, ``Δb = -lr·(ratio·inner(g)_b + wd·b)``
    (the paper's AdamW with ``η_B = ratio·η_A``; decay uses the base lr).

    Args:
      learning_rate: ``η_A``, float or schedule (injectable).
      ratio: ``η_B/η_A`` (injectable).
      inner: the normaliser (default ``optax.scale_by_adam()``) (static).
      weight_decay: decoupled weight decay (injectable).
      mask: weight-decay mask, as in ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformation``. Static arguments: ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tr = {"q/kernel": {"a": jnp.ones((3, 2)), "b": jnp.zeros((2, 4))}}
      >>> tx = loraplus(1e-3, ratio=16.0, inner=optax.identity())
      >>> u, _ = tx.update(tr, tx.init(tr), tr)
      >>> u["q/kernel"]["a"].shape
      (3, 2)

    References:
      Hayou et al., 2024, https://arxiv.org/abs/2402.12354.
    """
    return optax.chain(
        optax.scale_by_adam() if inner is None else inner,
        scale_by_loraplus(ratio),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
