# SPDX-License-Identifier: Apache-2.0
"""NOLA: LoRA factors as trained mixtures of fixed random low-rank bases.

NOLA: Compressing LoRA using Linear Combination of Random Basis (v1: "NOLA:
Networks as Linear Combination of Low Rank Random Basis"). Koohpayegani et al.,
2023 (ICLR 2024). https://arxiv.org/abs/2310.02556

LoRA's factors are replaced by linear combinations of fixed random matrices,
``A = Σ_i α_i A_i`` and ``B = Σ_j β_j B_j``, and only the mixing coefficients
``α (k_a,)`` and ``β (k_b,)`` are trained: ``W' = W + s·A@B`` with the LoRA
scaling ``s = alpha/r``. Flax layout: ``A_i (in, r)``, ``B_j (r, out)``.

Paper Eq. (ΔW = (Σ β_j B_j)(Σ α_i A_i), torch layout) ↔ ``apply``; the bases
regenerated from a seed ↔ ``nola_basis``.

Conventions (where the references differ):

* Bases: i.i.d. ``U(-1, 1)/sqrt(k)`` entries (``k`` the number of bases on
  that side, as the authors' GPT-2 code scales its uniform bases), drawn in
  one stream from ``jax.random.key(basis_seed)``, A-bases first. They depend
  only on the seed and the shape, so every leaf of one shape (and every layer
  of a stacked kernel) uses the same bases with its own coefficients; JAX's
  generator does not reproduce torch's values.
* Identity at init: ``β = 0`` (so ``B = 0``, as LoRA's ``B``), and
  ``α ~ N(0, 1/in)``, which gives ``A`` the entry variance ``1/(3·in)`` of
  LoRA's kaiming-uniform ``A``. The authors' GPT-2 code instead zeroes both
  coefficient vectors and adds a frozen kaiming-uniform offset ``A_0`` to
  ``A`` (the paper's formula has no offset); their ViT variant starts at
  ``α = 1/k_a``, ``β = 1/k_b`` (not an identity).
* The bases are kept in the frozen partition (``NOLABasis``), so ``init`` /
  ``materialize`` / ``fold`` are exact and an adapter state is
  self-contained; a checkpoint that wants only ``α, β`` can drop them and
  rebuild them with ``nola_basis(..., basis_seed)``.

Exports: ``NOLAParams``, ``NOLABasis``, ``nola_basis``, ``nola``.
"""

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class NOLAParams(NamedTuple):
    """Trainable mixing coefficients (per matrix).

    Attributes:
      coef_a: ``(k_a,)``, the paper's ``α``; init ``N(0, 1/in)``.
      coef_b: ``(k_b,)``, the paper's ``β``; init 0.
    """

    coef_a: jax.Array
    coef_b: jax.Array


class NOLABasis(NamedTuple):
    """Frozen random bases (per matrix).

    Attributes:
      a: ``(k_a, in, r)``, the ``A_i``.
      b: ``(k_b, r, out)``, the ``B_j``.
    """

    a: jax.Array
    b: jax.Array


def _check_count(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"nola: {arg} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"nola: {arg} must be > 0, got {arg}={value}")
    return int(value)


def nola_basis(rank: int, n_in: int, n_out: int, num_basis_a: int,
               num_basis_b: int, *, basis_seed: int = 0,
               dtype: Any = jnp.float32) -> NOLABasis:
    """Regenerates the NOLA bases of one ``(in, out)`` matrix from the seed.

    Args:
      rank: ``r``.
      n_in: input size of the matrix view.
      n_out: output size.
      num_basis_a: ``k_a``, the number of ``A_i``.
      num_basis_b: ``k_b``, the number of ``B_j``.
      basis_seed: the seed (an int).
      dtype: storage dtype.

    Returns:
      ``NOLABasis(a (k_a, in, r), b (k_b, r, out))`` with entries
      ``U(-1, 1)/sqrt(k)``.

    Example:
      >>> bs = nola_basis(2, 5, 4, 3, 6, basis_seed=1)
      >>> bs.a.shape, bs.b.shape
      ((3, 5, 2), (6, 2, 4))
    """
    return _basis(rank, n_in, n_out, num_basis_a, num_basis_b, jnp.dtype(dtype),
                  jax.random.key(basis_seed))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _basis(rank: int, n_in: int, n_out: int, num_basis_a: int, num_basis_b: int,
           dtype: Any, key: jax.Array) -> NOLABasis:
    # One draw for both sides (A-bases first), compiled once per shape: the
    # threefry kernel dominates the cost of an eager init.
    size_a = num_basis_a * n_in * rank
    u = jax.random.uniform(key, (size_a + num_basis_b * rank * n_out,), jnp.float32,
                           -1.0, 1.0)
    a = u[:size_a].reshape(num_basis_a, n_in, rank) * (1.0 / math.sqrt(num_basis_a))
    b = u[size_a:].reshape(num_basis_b, rank, n_out) * (1.0 / math.sqrt(num_basis_b))
    return NOLABasis(a=a.astype(dtype), b=b.astype(dtype))


def nola(
    rank: int,
    num_basis_a: int,
    num_basis_b: int,
    *,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    basis_seed: int = 0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """NOLA: ``W' = W + s·(Σ α_i A_i)@(Σ β_j B_j)`` with only ``α, β`` trainable.

    Identity at init (``β = 0``). Trainable parameters: ``k_a + k_b`` per
    matrix, independent of its size; optimizer state is that times the slots.
    Frozen (not trained, no optimizer state): ``k_a·in·r + k_b·r·out`` basis
    entries per matrix, regenerable from ``basis_seed``. Both ``apply`` and the
    factored path first mix the bases into ``A (in, r)`` and ``B (r, out)``
    (``O((k_a·in + k_b·out)·r)``); the factored path then computes
    ``s·(x@A)@B`` without a weight-sized matrix.

    Args:
      rank: ``r`` (static; ``<= min(in, out)``).
      num_basis_a: ``k_a`` (static), number of random bases of ``A``.
      num_basis_b: ``k_b`` (static), number of random bases of ``B``.
      alpha: ``lora_alpha``; ``s = alpha/r`` by default, as the reference.
      scaling: a ``Scaling`` member (as for ``lora``).
      basis_seed: seed of the random bases (static).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of coefficients and bases.
      dropout: adapter-input dropout (factored path only, as for ``lora``).

    Returns:
      An ``Adapter`` with trainable ``NOLAParams(coef_a, coef_b)`` and frozen
      ``NOLABasis(a, b)``.

    Static arguments: all.

    Raises:
      ValueError: a non-positive ``rank``, ``num_basis_a`` or ``num_basis_b``;
        at init, ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = nola(rank=2, num_basis_a=8, num_basis_b=4)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 5)))
      >>> t.coef_a.shape, t.coef_b.shape, f.a.shape, f.b.shape
      ((8,), (4,), (8, 6, 2), (4, 2, 5))

    References:
      Koohpayegani et al., 2023, https://arxiv.org/abs/2310.02556
    """
    rank = _lora.check_rank(rank, "nola")
    num_basis_a = _check_count(num_basis_a, "num_basis_a")
    num_basis_b = _check_count(num_basis_b, "num_basis_b")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("nola takes no stats")
        _lora.check_rank_fits(rank, w, "nola")
        n_in, n_out = w.shape
        basis = nola_basis(rank, n_in, n_out, num_basis_a, num_basis_b,
                           basis_seed=basis_seed, dtype=param_dtype)
        coef_a = jax.random.normal(key, (num_basis_a,), jnp.float32) / math.sqrt(n_in)
        t = NOLAParams(coef_a=coef_a.astype(param_dtype),
                       coef_b=jnp.zeros((num_basis_b,), param_dtype))
        return t, basis

    def factors(t, f):
        a = jnp.tensordot(t.coef_a.astype(f.a.dtype), f.a, axes=1)  # (in, r)
        b = jnp.tensordot(t.coef_b.astype(f.b.dtype), f.b, axes=1)  # (r, out)
        return _lowrank.LowRank(left=a, right=b, scale=s)

    return _lift.lift_matrix(
        name=(f"nola(rank={rank}, num_basis_a={num_basis_a}, "
              f"num_basis_b={num_basis_b}, alpha={alpha}, seed={basis_seed})"),
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        **_lowrank.low_rank_forms(factors),
    )
