# SPDX-License-Identifier: Apache-2.0
"""Float32 SVD helpers shared by the initialisers (exact and randomized).

Finding Structure with Randomness. Halko, Martinsson & Tropp, 2011.
https://arxiv.org/abs/0909.4061 (Algorithm 4.4, randomized subspace
iteration ↔ ``randomized_svd``; it is the algorithm of ``torch.svd_lowrank``,
which PiSSA, LoRA-GA and LoRA-SB call).

Exports: ``svd``, ``randomized_svd``.
"""

import jax
import jax.numpy as jnp


def svd(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``m = u @ diag(s) @ vt`` in float32 (singular values descending).

    Example:
      >>> import jax.numpy as jnp
      >>> u, s, vt = svd(jnp.diag(jnp.array([1.0, 3.0])))
      >>> s.tolist()
      [3.0, 1.0]
    """
    return jnp.linalg.svd(m.astype(jnp.float32), full_matrices=False)


def randomized_svd(key: jax.Array, m: jax.Array, q: int, niter: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rank-``q`` randomized SVD with ``niter`` subspace iterations, no oversampling.

    ``torch.svd_lowrank(m, q, niter)``'s algorithm (Gaussian sketch ``m @ Ω``,
    QR re-orthonormalisation after every product), in float32.

    Args:
      key: PRNG key of the Gaussian test matrix ``Ω (n, q)``.
      m: ``(m, n)`` matrix.
      q: number of triplets (``<= min(m, n)``).
      niter: power (subspace) iterations.

    Returns:
      ``(u (m, q), s (q,), vt (q, n))``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> u, s, vt = randomized_svd(jax.random.key(0), jnp.diag(jnp.array([3.0, 1.0, 0.0])), 2, 2)
      >>> [round(x, 4) for x in s.tolist()]
      [3.0, 1.0]
    """
    m = m.astype(jnp.float32)
    omega = jax.random.normal(key, (m.shape[1], q), jnp.float32)
    qm, _ = jnp.linalg.qr(m @ omega)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(m.T @ qm)
        qm, _ = jnp.linalg.qr(m @ z)
    u, s, vt = jnp.linalg.svd(qm.T @ m, full_matrices=False)
    return qm @ u, s, vt
