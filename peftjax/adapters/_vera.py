# SPDX-License-Identifier: Apache-2.0
"""VeRA: shared frozen random projections with trainable scaling vectors.

VeRA: Vector-based Random Matrix Adaptation. Kopiczko et al., 2024.
https://arxiv.org/abs/2310.11454

Torch layout (paper Eq. 1): ``ΔW = Λ_b B Λ_d A`` with shared frozen
``A (r, n_max)``, ``B (m_max, r)`` (each layer uses the slices ``A[:, :n]``,
``B[:m, :]``) and trainable ``λ_b (m,)`` (init 0) and ``λ_d (r,)`` (init
``d_initial = 0.1``); no ``α/r`` scaling. On a Flax kernel ``(in, out)``:
``ΔW = (A_s · λ_d) @ (B_s · λ_b)`` with ``a = A[:, :n]ᵀ (in, r)`` and
``b = B[:m, :]ᵀ (r, out)``.

The shared matrices are regenerated from ``projection_seed`` (kaiming-uniform
with gain √2: ``U(±√(6/fan_in))``, fan-in ``n_max`` for A and ``r`` for B, A
drawn first), so a checkpoint need not store them; JAX's generator does not
reproduce torch's values. Each leaf's frozen part holds its slices.

Exports: ``VeRAParams``, ``VeRABasis``, ``vera_shared``, ``vera``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class VeRAParams(NamedTuple):
    """Trainable VeRA vectors.

    Attributes:
      lambda_d: ``(r,)``, init ``d_initial``.
      lambda_b: ``(out,)``, init 0.
    """

    lambda_d: jax.Array
    lambda_b: jax.Array


class VeRABasis(NamedTuple):
    """This leaf's slices of the shared frozen matrices.

    Attributes:
      a: ``(in, r)`` = ``A_shared[:, :in]ᵀ``.
      b: ``(r, out)`` = ``B_shared[:out, :]ᵀ``.
    """

    a: jax.Array
    b: jax.Array


def vera_shared(rank: int, max_in: int, max_out: int, *, projection_seed: int = 0,
                dtype: Any = jnp.float32) -> VeRABasis:
    """Regenerates the shared matrices (Flax layout) from the seed.

    Args:
      rank: ``r``.
      max_in: the largest input dimension over the targeted kernels.
      max_out: the largest output dimension.
      projection_seed: the seed (PEFT's ``projection_prng_key``).
      dtype: storage dtype.

    Returns:
      ``VeRABasis(a (max_in, r), b (r, max_out))``.

    Example:
      >>> s = vera_shared(4, 8, 6)
      >>> s.a.shape, s.b.shape
      ((8, 4), (4, 6))
    """
    ka, kb = jax.random.split(jax.random.key(projection_seed))
    bound_a = math.sqrt(6.0 / max_in)
    bound_b = math.sqrt(6.0 / rank)
    a_t = jax.random.uniform(ka, (rank, max_in), jnp.float32, -bound_a, bound_a)
    b_t = jax.random.uniform(kb, (max_out, rank), jnp.float32, -bound_b, bound_b)
    return VeRABasis(a=a_t.T.astype(dtype), b=b_t.T.astype(dtype))


def vera(
    rank: int,
    *,
    max_in: int,
    max_out: int,
    projection_seed: int = 0,
    d_initial: float = 0.1,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """VeRA adapter: ``W' = W + (a·λ_d) @ (b·λ_b)`` with frozen shared a, b.

    Identity at init (``λ_b = 0``). Trainable parameters: ``r + out`` per
    matrix; the frozen slices are regenerated from ``projection_seed``.

    Args:
      rank: ``r`` (static; PEFT's default is 256).
      max_in: the largest input dimension over all VeRA targets (the shared
        ``A`` has this many columns); every target must fit.
      max_out: the largest output dimension over all targets.
      projection_seed: seed of the shared matrices.
      d_initial: initial value of ``λ_d``.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype.

    Returns:
      An ``Adapter`` with trainable ``VeRAParams`` and frozen ``VeRABasis``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = vera(4, max_in=8, max_out=8)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((8, 6)))
      >>> t.lambda_d.shape, t.lambda_b.shape, f.a.shape, f.b.shape
      ((4,), (6,), (8, 4), (4, 6))

    References:
      Kopiczko et al., 2024, https://arxiv.org/abs/2310.11454
    """
    rank = _lora.check_rank(rank, "vera")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        del key  # the matrices come from projection_seed, not the leaf key
        if stats is not None:
            raise ValueError("vera takes no stats")
        n_in, n_out = w.shape
        if n_in > max_in or n_out > max_out:
            raise ValueError(
                f"vera: matrix (in={n_in}, out={n_out}) exceeds the shared shape "
                f"(max_in={max_in}, max_out={max_out}); raise max_in/max_out"
            )
        shared = vera_shared(rank, max_in, max_out, projection_seed=projection_seed,
                             dtype=param_dtype)
        basis = VeRABasis(a=shared.a[:n_in], b=shared.b[:, :n_out])
        t = VeRAParams(lambda_d=jnp.full((rank,), d_initial, param_dtype),
                       lambda_b=jnp.zeros((n_out,), param_dtype))
        return t, basis

    def factors(t, f):
        # (a · λ_d) @ (b · λ_b): the vectors scale the factors' columns.
        return _lowrank.LowRank(left=f.a * t.lambda_d.astype(f.a.dtype)[None, :],
                             right=f.b * t.lambda_b.astype(f.b.dtype)[None, :])

    return _lift.lift_matrix(
        name=f"vera(rank={rank}, seed={projection_seed})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        **_lowrank.low_rank_forms(factors),
    )
