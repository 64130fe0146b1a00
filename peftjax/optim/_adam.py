# SPDX-License-Identifier: Apache-2.0
"""Adam with the Hugging Face / galore-torch epsilon placement.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014,
https://arxiv.org/abs/1412.6980. The HF-style variant (``transformers``'
legacy ``AdamW``, galore-torch ``GaLoreAdamW``, SpIEL) keeps raw moments and
computes ``sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)``. That equals
``optax.scale_by_adam`` with a time-varying ``eps_t = eps / sqrt(1-b2^t)``, so
the two differ when ``|g|`` is comparable to ``eps`` (docs/conventions.md#two-adam-conventions).

Exports: ``scale_by_adam_hf``.
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
