# SPDX-License-Identifier: Apache-2.0
"""SpIEL's optimizer: HF-style AdamW with a per-slot age, decay towards θ0.

Scaling Sparse Fine-Tuning to Large Language Models (SpIEL). Ansell, Vulić,
Sterz, Korhonen, Ponti, 2024. https://arxiv.org/abs/2401.16405

Map to the reference ``SftAdamW`` (docs/methods.md#spiel):
``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²`` and the per-element bias
correction with ``age = slot_count + 1`` ↔ ``scale_by_sft_adam``; the step
``−lr·m / ((√v + ε)(1−β1^age)/√(1−β2^age))`` followed by weight decay on the
*new* deltas, ``δ ← δ − lr·wd·δ`` (towards zero delta, i.e. towards θ0) ↔
``sft_adamw``. Per-slot ages let regrown slots start from seeded moments
(``peftjax.optim.reset_slots``) while the others keep theirs.

Exports: ``SFTAdamState``, ``scale_by_sft_adam``, ``sft_adamw``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _adam

PyTree = Any


class SFTAdamState(NamedTuple):
    """State of ``scale_by_sft_adam``.

    Attributes:
      count: ``()`` int32, updates applied (the transform's own counter).
      slot_count: like the params, float32: updates already applied to each
        slot (the reference's ``age − 1``); reset to 0 or seeded on regrowth.
      mu: like the params, float32 first moment (raw, not bias-corrected).
      nu: like the params, float32 second moment (raw).
    """

    count: jax.Array  # shape=(), dtype=jnp.int32
    slot_count: PyTree
    mu: PyTree
    nu: PyTree

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "slot_count": tree.StateRole.LIKE_PARAMS,
                   "mu": tree.StateRole.LIKE_PARAMS,
                   "nu": tree.StateRole.LIKE_PARAMS}


def scale_by_sft_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformation:
    """Rescales updates with Adam using a per-slot bias-correction age.

    ``u = m / ((√v + eps)·(1 − b1^a)/√(1 − b2^a))`` with ``a = slot_count + 1``
    per element, eps placed as in HF / the reference (docs/conventions.md#two-adam-conventions).
    Moments are float32 whatever the params' dtype (the reference's
    ``momentum_dtype`` and its bf16 age bug do not arise: ages are stored).

    Args:
      b1: first-moment decay (injectable).
      b2: second-moment decay (injectable).
      eps: added to ``√v`` (injectable; reference default 1e-6).

    Returns:
      An ``optax.GradientTransformation`` with ``SFTAdamState``; state size
      3 floats per trainable value (``3k`` per sparse matrix). Static
      arguments: none.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = scale_by_sft_adam(eps=0.0)
      >>> u, s = tx.update({"w": jnp.array([2.0, -3.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"].round(4).tolist(), s.slot_count["w"].tolist()
      ([1.0, -1.0], [1.0, 1.0])

    References:
      Ansell et al., 2024, https://arxiv.org/abs/2401.16405
    """
    f32 = jnp.float32

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), f32)  # noqa: E731
        return SFTAdamState(
            count=jnp.zeros([], jnp.int32),
            slot_count=jax.tree.map(zeros, params),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        b1_, b2_, eps_ = (jnp.asarray(x, f32) for x in (b1, b2, eps))
        mu = jax.tree.map(lambda g, m: b1_ * m + (1 - b1_) * g.astype(f32),
                          updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2_ * v + (1 - b2_) * jnp.square(g.astype(f32)),
                          updates, state.nu)

        def norm(g, m, v, n):
            age = n + 1
            denom = (jnp.sqrt(v) + eps_) * (1 - b1_**age) / jnp.sqrt(1 - b2_**age)
            return (m / denom).astype(g.dtype)

        out = jax.tree.map(norm, updates, mu, nu, state.slot_count)
        slot_count = jax.tree.map(lambda n: n + 1, state.slot_count)
        return out, SFTAdamState(optax.safe_int32_increment(state.count),
                                 slot_count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def sft_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
    """The reference ``SftAdamW``: per-slot-age Adam, then decay of the new deltas.

    ``δ ← δ − lr·u`` (``u`` from ``scale_by_sft_adam``), then
    ``δ ← δ − lr·wd·δ``. On sparse ``values`` the decay pulls towards zero
    delta, i.e. towards the pretrained weights; the paper uses large
    ``wd`` (1 to 30).

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: reference default 1e-6.
      weight_decay: applied as ``lr·wd`` after the step.

    Returns:
      ``optax.chain(scale_by_sft_adam(...), <scale and decay>)``; its first
      state is ``SFTAdamState``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = sft_adamw(0.1, eps=0.0, weight_decay=1.0)
      >>> p = {"w": jnp.array([1.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0])}, tx.init(p), p)
      >>> round(float(optax.apply_updates(p, u)["w"][0]), 6)  # (1 − 0.1)·(1 − 0.1)
      0.81

    References:
      Ansell et al., 2024, https://arxiv.org/abs/2401.16405
    """
    return optax.chain(scale_by_sft_adam(b1, b2, eps),
                       _adam.scale_and_decay_after(learning_rate, weight_decay))
