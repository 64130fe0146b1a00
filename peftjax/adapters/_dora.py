# SPDX-License-Identifier: Apache-2.0
"""DoRA: weight-decomposed low-rank adaptation.

DoRA: Weight-Decomposed Low-Rank Adaptation. Liu et al., 2024.
https://arxiv.org/abs/2402.09353

``W' = m ⊙ (W + s·A@B) / ||W + s·A@B||``, the norm taken per output unit over
the input axis (axis 0 of a Flax ``(in, out)`` kernel; torch's ``dim=1``).
Paper Eq. (5) ↔ ``apply``; §4.3 (the norm is a constant in backprop, though
recomputed in the forward pass) ↔ the ``stop_gradient`` on the norm; the
initialisation ``m = ||W||`` ↔ ``init``.

Exports: ``DoRAParams``, ``dora``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class DoRAParams(NamedTuple):
    """Trainable DoRA parameters (per matrix).

    Attributes:
      a: ``(in, r)``.
      b: ``(r, out)``.
      magnitude: ``(out,)``, initialised to the column norms of ``W``.
    """

    a: jax.Array
    b: jax.Array
    magnitude: jax.Array


def _column_norm(v: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0))
    # A zero column has no direction; keep it zero instead of producing NaN.
    return jnp.where(norm == 0, jnp.ones_like(norm), norm)


def _column_norm_from_square(sq: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.maximum(sq, jnp.zeros_like(sq)))
    return jnp.where(norm == 0, jnp.ones_like(norm), norm)


def dora(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    init: _lora.LoRAInit = _lora.LoRAInit.KAIMING_UNIFORM,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """DoRA: a LoRA direction update with a trainable per-output magnitude.

    Identity at init (``B = 0`` and ``m = ||W||``). Trainable parameters:
    ``r·(in + out) + out`` per matrix. ``fold(..., return_aux=True)`` returns
    the column norms it used; ``unfold`` needs them to be exact.

    Args:
      rank: ``r`` (static).
      alpha: ``lora_alpha``.
      scaling: a ``Scaling`` member (as for ``lora``).
      init: a ``LoRAInit`` member for ``a``/``b``.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the adapter parameters.
      dropout: adapter-input dropout (factored path only, as for ``lora``).

    Returns:
      An ``Adapter`` with trainable ``DoRAParams(a, b, magnitude)``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = dora(rank=2)
      >>> w = jnp.arange(12.0).reshape(4, 3)
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> bool(jnp.allclose(ad.apply(w, t, f), w))
      True

    References:
      Liu et al., 2024, https://arxiv.org/abs/2402.09353
    """
    base = _lora.lora(rank, alpha=alpha, scaling=scaling, init=init,
                      param_dtype=param_dtype)
    rank = _lora.check_rank(rank, "dora")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("dora takes no stats")
        t, _ = base.init(key, w)
        m = _column_norm(w.astype(_lowrank.compute_dtype(w.dtype, jnp.float32)))
        return DoRAParams(a=t.a, b=t.b, magnitude=m.astype(param_dtype)), None

    def directions(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        v = w.astype(ct) + (t.a.astype(ct) @ t.b.astype(ct)) * s
        return ct, v

    def apply_matrix(w, t, f):
        ct, v = directions(w, t)
        norm = jax.lax.stop_gradient(_column_norm(v))
        return v * (t.magnitude.astype(ct) / norm)[None, :]

    def aux_matrix(w, t, f):
        return _column_norm(directions(w, t)[1])

    def unapply_matrix(w, t, f, norm):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        v = w.astype(ct) * (norm.astype(ct) / t.magnitude.astype(ct))[None, :]
        return v - (t.a.astype(ct) @ t.b.astype(ct)) * s

    def factored_matrix(w, t, f):
        # ||W_j + s·(AB)_j||² = ||W_j||² + 2s·(AᵀW)_j·B_j + s²·B_jᵀ(AᵀA)B_j: the
        # column norms without forming W + s·A@B (a constant in backprop).
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        wc, a, b = w.astype(ct), t.a.astype(ct), t.b.astype(ct)
        sq = (jnp.sum(jnp.square(wc), axis=0)
              + 2.0 * s * jnp.sum((a.T @ wc) * b, axis=0)
              + s * s * jnp.sum(b * ((a.T @ a) @ b), axis=0))
        norm = jax.lax.stop_gradient(_column_norm_from_square(sq))
        return _protocol.FactoredTerms(
            out_scale=t.magnitude.astype(ct) / norm,
            delta=lambda x: _lowrank.low_rank(x, t.a, t.b, s))

    return _lift.lift_matrix(
        name=f"dora(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        aux_matrix=aux_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=factored_matrix,
    )
