# SPDX-License-Identifier: Apache-2.0
"""SAID: structure-aware intrinsic dimension (Fastfood subspace + per-matrix scale).

Intrinsic Dimensionality Explains the Effectiveness of Language Model
Fine-Tuning. Aghajanyan, Zettlemoyer & Gupta, ACL 2021.
https://arxiv.org/abs/2012.13255

Section 3 of the paper: DID (Eq. 2) trains ``θ^D = θ_0^D + P(θ^d)`` with the
Fastfood projection ``P = H G Π H B`` (``H`` Walsh-Hadamard, ``G`` Gaussian
diagonal, ``Π`` a random permutation, ``B`` random ±1 diagonal; Le, Sarlós
& Smola 2013), computed per weight tensor, so the memory is ``O(D)`` and the
time ``O(D log d)``; SAID (Eq. 3) adds one trained scale per weight tensor:
``θ_i^D = θ_{0,i}^D + λ_i P(θ^{d-m})_i``. The authors' code (the
``IntrinsicDimensionLight`` hook released with the paper, reused by T-Few),
which this module follows: each tensor has its own Fastfood transform of
length ``L = 2^⌈log2(n_i)⌉`` (``n_i`` its entries); ``θ`` is zero-padded to
``L``; the first ``n_i`` outputs are divided by ``√(L·ΣG²)·√(n_i/L)``;
``θ`` starts at 0 and every ``λ_i`` at 1, so the model starts at ``θ_0``.

Here ``θ_d`` is ONE trainable vector shared by every adapted matrix
(``adapters.Shared``, ``AdapterState.trainable["@shared"][vector]``) and
``λ_i`` a trainable scalar per matrix (per layer of a stacked leaf). ``B, Π,
G`` are regenerated inside ``apply`` from ``seed`` and the matrix's index
(assigned by ``adapters.init`` over the assignment): never stored.
Deviations: ``dimension`` is ``θ_d``'s own length and the ``m`` scales come
on top (the paper counts them inside ``d``; the authors' code subtracts the
number of ALL the model's tensors plus one), so a stacked leaf and its
unrolled layers get the same adapter; pass ``dimension = d - m`` for the
paper's budget. The Fastfood output is reshaped to the Flax kernel ``(in,
out)`` in row-major order; JAX's generator does not reproduce torch's draws.

Factored form: ``x @ ΔW`` with the delta formed once (``O(L log L)`` for
the transform, ``2·in·out`` FLOPs per row); no cheaper form exists.

Exports: ``SAIDParams``, ``said``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _intrinsic_dim, _protocol


class SAIDParams(NamedTuple):
    """Trainable SAID parameters of one leaf.

    Attributes:
      theta_d: ``Shared(vector name)``: the one vector ``θ_d (d,)``.
      lam: ``()`` per matrix (batch shape on a stacked leaf), ``λ_i``, init 1.
    """

    theta_d: Any
    lam: jax.Array


def said(
    dimension: int,
    *,
    seed: int = 0,
    vector: str = "said",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SAID adapter: ``W_i' = W_i + λ_i · reshape(Fastfood_i(θ_d))``, one shared ``θ_d``.

    The identity at init (``θ_d = 0``, ``λ_i = 1``). Trainable parameters:
    ``d = dimension`` once, plus one ``λ_i`` per adapted matrix. Exact inverse
    (``unfold``): yes (up to rounding). Factored form: ``x @ ΔW`` with the
    delta formed once. Every adapted matrix needs ``d ≤ 2^⌈log2(in·out)⌉``.
    On one leaf alone use ``adapters.unshare``.

    Args:
      dimension: ``d``, the length of ``θ_d``.
      seed: the Fastfood seed (``B, Π, G`` regenerated, never stored).
      vector: the name of the shared vector; leaves whose adapters name the
        same vector share it.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``θ_d`` and ``λ``.

    Returns:
      An ``Adapter`` with trainable ``SAIDParams`` (``θ_d`` a ``Shared``
      placeholder) and frozen ``adapters.IntrinsicProjection``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"q": jnp.zeros((6, 4)), "v": jnp.zeros((6, 4))}
      >>> a = tree.assign(params, [tree.Rule(where="q|v", then=said(5))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> adapters.num_trainable(s.trainable)  # d + one λ per matrix
      7

    References:
      Aghajanyan et al., 2021, https://arxiv.org/abs/2012.13255
    """
    _intrinsic_dim._check_common("said", dimension, seed, vector)
    return _intrinsic_dim.build(
        fn="said", kind="fastfood", dimension=dimension, seed=seed, vector=vector,
        said=True, dimension_numbers=dimension_numbers, param_dtype=param_dtype,
        params_type=SAIDParams,
        hyperparameters=(("dimension", dimension), ("seed", seed), ("vector", vector)))
