# SPDX-License-Identifier: Apache-2.0
"""Adam with the Hugging Face / galore-torch epsilon placement.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014,
https://arxiv.org/abs/1412.6980. The HF-style variant (``transformers``'
legacy ``AdamW``, galore-torch ``GaLoreAdamW``, SpIEL) keeps raw moments and
computes ``sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)``. That equals
``optax.scale_by_adam`` with a time-varying ``eps_t = eps / sqrt(1-b2^t)``, so
the two differ when ``|g|`` is comparable to ``eps`` (docs/conventions.md#two-adam-conventions).

Exports: ``scale_by_adam_hf``, ``adamw_hf``; ``scale_and_decay_after`` (private,
shared with ``sft_adamw``).
"""

import jax
import jax.numpy as jnp
import optax


def scale_by_adam_hf(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformation:
    """Rescales updates with Adam, eps placed as in HF / galore-torch.

    ``u = sqrt(1-b2^t)/(1-b1^t) · m_t / (sqrt(v_t) + eps)`` with ``t = count+1``,
    ``m_t = b1 m + (1-b1) g``, ``v_t = b2 v + (1-b2) g²``. Use it as GaLore's
    ``inner`` for parity with galore-torch (its default ``eps=1e-6``).

    Args:
      b1: first-moment decay (injectable).
      b2: second-moment decay (injectable).
      eps: added to ``sqrt(v)`` before bias correction (injectable).

    Returns:
      An ``optax.GradientTransformation`` whose state is
      ``optax.ScaleByAdamState(count, mu, nu)``, ``mu``/``nu`` shaped like the
      updates. Static arguments: none.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = scale_by_adam_hf(eps=0.0)
      >>> u, _ = tx.update({"w": jnp.array([2.0, -3.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> jnp.round(u["w"], 4)  # sign-like first step
      Array([ 1., -1.], dtype=float32)

    References:
      Zhao et al., GaLore, 2024, https://arxiv.org/abs/2403.03507 (its
      ``adamw.py`` uses this form).
    """

    def init_fn(params):
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)

        # Moment arithmetic in float32, stored in the moments' dtype: in bf16,
        # 0.999 rounds to 1.0 and the second moment would never move.
        f32 = jnp.float32
        b1_, b2_ = jnp.asarray(b1, f32), jnp.asarray(b2, f32)

        def mom1(g, m):
            return (b1_ * m.astype(f32) + (1 - b1_) * g.astype(f32)).astype(m.dtype)

        def mom2(g, v):
            g2 = jnp.square(g.astype(f32))
            return (b2_ * v.astype(f32) + (1 - b2_) * g2).astype(v.dtype)

        mu = jax.tree.map(mom1, updates, state.mu)
        nu = jax.tree.map(mom2, updates, state.nu)
        t = count.astype(f32)
        step = jnp.sqrt(1 - b2_**t) / (1 - b1_**t)

        def norm(m, v):
            out = step * m.astype(f32) / (jnp.sqrt(v.astype(f32)) + jnp.asarray(eps, f32))
            return out.astype(m.dtype)

        out = jax.tree.map(norm, mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_and_decay_after(learning_rate: optax.ScalarOrSchedule,
                           weight_decay: jax.typing.ArrayLike
                           ) -> optax.GradientTransformation:
    """``δ' = (δ − lr·u)(1 − lr·wd)`` as an update: ``−lr·u − lr·wd·(δ − lr·u)``."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adamw_hf / sft_adamw: the decoupled weight decay needs "
                             "params in update()")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        wd = jnp.asarray(weight_decay, jnp.float32)

        def one(u, p):
            step = -lr * u.astype(jnp.float32)
            new = p.astype(jnp.float32) + step
            return (step - lr * wd * new).astype(p.dtype)

        out = jax.tree.map(one, updates, params)
        return out, optax.ScaleByScheduleState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_hf(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
    """AdamW as Hugging Face's legacy ``AdamW`` and galore-torch compute it.

    ``p ← p − lr·u`` with ``u`` from ``scale_by_adam_hf``, then the decay of
    the *new* weights ``p ← p − lr·wd·p``; ``optax.adamw`` instead decays the
    old weights inside the step (``p ← p − lr·(u + wd·p)``). The two agree
    when ``weight_decay`` is 0 and ``eps`` is placed alike.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay (injectable).
      b2: second-moment decay (injectable).
      eps: added to ``sqrt(v)`` before bias correction (galore-torch's
        default 1e-6).
      weight_decay: applied as ``lr·wd`` to the weights after the step.

    Returns:
      ``optax.chain(scale_by_adam_hf(...), <scale and decay>)``; its first
      state is ``optax.ScaleByAdamState``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = adamw_hf(0.1, eps=0.0, weight_decay=1.0)
      >>> p = {"w": jnp.array([1.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0])}, tx.init(p), p)
      >>> round(float(optax.apply_updates(p, u)["w"][0]), 6)  # (1 − 0.1)·(1 − 0.1)
      0.81

    References:
      Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101
    """
    return optax.chain(scale_by_adam_hf(b1, b2, eps),
                       scale_and_decay_after(learning_rate, weight_decay))
