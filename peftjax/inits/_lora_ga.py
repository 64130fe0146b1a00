# SPDX-License-Identifier: Apache-2.0
"""LoRA-GA: LoRA factors from the SVD of the estimated full gradient, base offset.

LoRA-GA: Low-Rank Adaptation with Gradient Approximation. Wang, Yu & Li,
2024. https://arxiv.org/abs/2407.05000

Torch layout, ``G (out, in)`` = the mean full-weight gradient (Eq. 8,
``inits.accumulate_gradients(..., mean=True)``), ``G ≈ U S Vᵀ`` by
``svd_lowrank(q=min(4r, m, n), niter=4)``:

* direction (§3.2, Eq. 9-10 ↔ ``direction``): ``ArB2r`` ``A = Vᵀ[:r]``,
  ``B = U[:, r:2r]``; ``A2rBr`` ``A = Vᵀ[r:2r]``, ``B = U[:, :r]``; ``ArBr``
  ``A`` = odd rows, ``B`` = even columns of the first ``2r``; ``random`` a
  disjoint random split of the first ``2r``.
* scale (§3.3 "stable scale", Eq. 12 ↔ ``scale``): ``stable``
  ``A, B ×= m^{1/4}/√γ`` (``m`` = out features); ``gd`` ``A, B /= s``;
  ``unit``; ``weightS`` ``A, B ×= mean(√(S_W[:r]/s))``.
* offset: ``W_res = W − s·B A`` (the output is unchanged at init).

``variant="official"`` (default) is the official repository
(``Outsider565/LoRA-GA``; docs/methods.md#lora-ga): singular values of ``G`` are
not used. ``variant="peft"`` is PEFT 0.21.2's port (``lora_ga_init``): ``B`` is
multiplied by ``diag(S_B)``, the scales are ``stable`` (``B`` only),
``weight_svd`` (``B ×= σ₁(W)/S_B[0]``), ``gd_scale``, ``unit``, and
``random`` uses the same indices for ``A`` and ``B``. The official
``weightS`` uses an exact SVD of ``W`` here (the reference a randomized one).

Flax layout: ``a = A_torchᵀ``, ``b = B_torchᵀ``; the randomized SVD runs on
the Flax gradient ``G_K = Gᵀ`` (its left vectors are ``G``'s right ones).

Exports: ``lora_ga``.
"""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common, _linalg

_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
_SCALES = {"official": ("stable", "gd", "unit", "weightS"),
           "peft": ("stable", "weight_svd", "gd_scale", "unit")}


def lora_ga(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    niter: int | None = 4,
    norm_clip: bool = False,
    variant: str = "official",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """LoRA-GA: ``a``, ``b`` span the top-``2r`` singular subspaces of the gradient.

    Needs ``stats={path: G}``, the mean full-weight gradient of each target
    (same shape as the leaf; ``accumulate_gradients(..., mean=True)``; the
    reference uses 64 batches of 2, memory: one float32 copy per target).
    The base becomes ``K − s·a@b``; the model output is unchanged at init.
    Trainable parameters: ``r·(in+out)`` per matrix. Export with
    ``inits.to_lora`` (rank ``2r``).

    First-step property (official, ``scale="gd"``, ``ArB2r``): one SGD step of
    size ``η`` changes the effective weight by ``−η·trunc_{2r}(G) + O(η²)``.

    Args:
      rank: ``r`` (``2r <= min(in, out)``).
      alpha: ``lora_alpha``.
      scaling: ``adapters.Scaling`` member (rsLoRA: ``ALPHA_OVER_SQRT_RANK``).
      direction: ``"ArB2r"`` (default), ``"A2rBr"``, ``"ArBr"``, ``"random"``.
      scale: official ``"stable"`` (default), ``"gd"``, ``"unit"``,
        ``"weightS"``; peft ``"stable"``, ``"weight_svd"``, ``"gd_scale"``,
        ``"unit"``.
      stable_gamma: ``γ`` of the stable scale (16).
      niter: subspace iterations of the randomized SVD with
        ``q = min(4r, in, out)`` (the reference's 4); None for an exact SVD.
      norm_clip: official option: if ``max|s·B A| > max|W|``, shrink the
        offset (and ``A``, ``B`` by the square root) to ``max|W|``.
      variant: ``"official"`` (default) or ``"peft"`` (PEFT 0.21.2's port).
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.

    Returns:
      An ``Initializer`` producing ``adapters.lora`` state.

    Raises:
      ValueError: unknown direction/scale/variant; at init, ``2r > min(in,
        out)``, missing or non-finite gradient.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.eye(4)}
      >>> g = {"w": jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0]))}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.lora_ga(1, niter=None))])
      >>> t = inits.run(plan, jax.random.key(0), params, stats=g).state.trainable["w"]
      >>> t.a.shape, t.b.shape
      ((4, 1), (1, 4))

    References:
      Wang et al., 2024, https://arxiv.org/abs/2407.05000
    """
    rank = _adapters.check_rank(rank, "lora_ga")
    if variant not in _SCALES:
        raise ValueError(f"lora_ga: variant must be 'official' or 'peft', got {variant!r}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"lora_ga: direction must be one of {_DIRECTIONS}, got {direction!r}")
    if scale not in _SCALES[variant]:
        raise ValueError(
            f"lora_ga: scale for variant={variant!r} must be one of "
            f"{_SCALES[variant]}, got {scale!r}")
    if stable_gamma <= 0:
        raise ValueError(f"lora_ga: stable_gamma must be > 0, got {stable_gamma}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, numbers.Integral)
                              or niter < 0):
        raise ValueError(f"lora_ga: niter must be None or an int >= 0, got {niter!r}")
    official = variant == "official"

    def factors(key, w, g, s):
        g = g.astype(jnp.float32)
        k_svd, k_dir = jax.random.split(key)
        q = min(4 * rank, *g.shape)
        if niter is None:
            ug, sg, vtg = _linalg.svd(g)
        else:
            ug, sg, vtg = _linalg.randomized_svd(k_svd, g, q, niter)
        # Flax G_K = Gᵀ: torch U = vtgᵀ (out, q), torch Vᵀ = ugᵀ (q, in).
        u_t, vh_t = vtg[: 2 * rank].T, ug[:, : 2 * rank].T
        sv = sg[: 2 * rank]
        if direction == "ArB2r":
            ia, ib = jnp.arange(rank), jnp.arange(rank, 2 * rank)
        elif direction == "A2rBr":
            ia, ib = jnp.arange(rank, 2 * rank), jnp.arange(rank)
        elif direction == "ArBr":
            ia, ib = jnp.arange(1, 2 * rank, 2), jnp.arange(0, 2 * rank, 2)
        else:
            perm = jax.random.permutation(k_dir, 2 * rank)
            ia = perm[:rank]
            ib = perm[:rank] if not official else perm[rank:]
        a_t = vh_t[ia]  # (r, in)
        b_t = u_t[:, ib]  # (out, r)
        if not official:
            b_t = b_t * sv[ib][None, :]
        m_out = w.shape[1]
        sf = jnp.asarray(s, jnp.float32)
        if scale == "stable":
            c = m_out ** 0.25 / math.sqrt(stable_gamma)
            b_t = b_t * c
            if official:
                a_t = a_t * c
        elif scale in ("gd", "gd_scale"):
            a_t, b_t = a_t / sf, b_t / sf
        elif scale == "weightS":
            sw = _linalg.svd(w)[1][:rank] / sf
            c = jnp.mean(jnp.sqrt(sw))
            a_t, b_t = a_t * c, b_t * c
        elif scale == "weight_svd":
            sw1 = _linalg.svd(w)[1][0]
            b_t = b_t * jnp.where(sv[ib][0] > 0, sw1 / sv[ib][0], 1.0)
        if norm_clip:
            off = sf * (b_t @ a_t)
            ratio = jnp.max(jnp.abs(w)) / jnp.max(jnp.abs(off))
            shrink = jnp.where(ratio < 1, jnp.sqrt(ratio), 1.0)
            a_t, b_t = a_t * shrink, b_t * shrink
        return a_t.T, b_t.T

    label = f"lora_ga[{variant}, {direction}, {scale}]"
    return _common.lora_initializer(
        name=label, rank=rank, alpha=alpha, scaling=scaling, factors=factors,
        stats=_base.GRADIENT, dimension_numbers=dimension_numbers,
        param_dtype=param_dtype, min_dim_factor=2)
