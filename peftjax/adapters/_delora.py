# SPDX-License-Identifier: Apache-2.0
"""DeLoRA: a normalised low-rank update with a learnable strength λ.

DeLoRA: Decoupling Angles and Strength in Low-rank Adaptation. Bini,
Girrbach & Akata, ICLR 2025. https://arxiv.org/abs/2503.18225

The paper's update ``ΔW = (λ‖W0‖ / r) · B Ξ A`` (torch layout ``W0 (out,
in)``, ``B (out, r)``, ``A (r, in)``) normalises each rank-one term: ``Ξ =
diag(1 / (‖b_i‖ ‖a_i‖))`` with ``b_i`` the ``i``-th column of ``B`` and ``a_i``
the ``i``-th row of ``A``, so ``‖ΔW‖_F <= λ‖W0‖``: the factors learn
directions (angles) and the trainable scalar ``λ`` the strength. Hugging Face
PEFT's ``tuners/delora`` (followed here, also for its files) takes ``‖W0‖``
per input feature, ``w_norm = ‖W0[:, j]‖`` (norms over the output axis),
computed once from the base at init and kept frozen (PEFT's persistent buffer
``delora_w_norm``, saved in its files), clamps each factor norm at ``1e-4``
and computes

  ``ΔW = B · diag(λ / r / (‖a_i‖ ‖b_i‖)) · A · diag(w_norm)``.

On a Flax kernel ``W0 (in, out)``: ``a = Aᵀ (in, r)``, ``b = Bᵀ (r, out)``
and ``ΔW = diag(w_norm) · a · diag(c) · b`` with ``c_i = λ / r / (‖a_:i‖
‖b_i:‖)``.

The update ↔ ``apply``; PEFT's ``reset_delora_parameters`` (``A``
kaiming-uniform, ``B = 0``, ``λ = delora_lambda``, ``w_norm`` from the base)
↔ ``init``.

Factored form: the normalisation only rescales the rank-``r`` factors and
``w_norm`` is a frozen constant, so ``x @ ΔW = (((x ⊙ w_norm) @ a) ⊙ c) @ b``,
as PEFT's own forward: ``O(r·(in + out))`` per row, no ``(in, out)`` matrix.

Exports: ``DeLoRAParams``, ``DeLoRANorm``, ``delora``.
"""

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol

# PEFT clamps ‖a_i‖ and ‖b_i‖ at this value (torch.clamp(min=1e-4)).
NORM_FLOOR = 1e-4


class DeLoRAParams(NamedTuple):
    """Trainable DeLoRA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` = PEFT ``delora_A.T``, init ``U(±1/sqrt(in))``.
      b: ``(r, out)`` = PEFT ``delora_B.T``, init 0.
      boundary: ``(1,)`` = PEFT ``delora_lambda`` (``λ``), init the
        factory's ``delora_lambda``.
    """

    a: jax.Array
    b: jax.Array
    boundary: jax.Array


class DeLoRANorm(NamedTuple):
    """Frozen per-input-feature norms of the base (PEFT's ``delora_w_norm``).

    Attributes:
      w_norm: ``(in,)``: ``‖W0[j, :]‖`` of the Flax kernel (torch: the norm
        of column ``j`` of ``W0 (out, in)``), computed at init.
    """

    w_norm: jax.Array


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
    """``max(‖x‖, 1e-4)`` along ``axis``, with a finite gradient at ``x = 0``.

    ``sqrt(max(Σx², 1e-8))`` equals PEFT's ``clamp(norm, min=1e-4)``; written
    this way the clamped branch has a zero gradient instead of ``0·∞``.
    """
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis),
                                jnp.asarray(NORM_FLOOR**2, x.dtype)))


def _factors(t: DeLoRAParams, f: DeLoRANorm, rank: int) -> _lowrank.LowRank:
    """``ΔW = left @ b`` with ``left = diag(w_norm) · a · diag(c)`` (in float32 or wider)."""
    ct = _lowrank.compute_dtype(jnp.float32, t.a.dtype, t.b.dtype, f.w_norm.dtype)
    a, b = t.a.astype(ct), t.b.astype(ct)
    c = t.boundary.astype(ct) / rank / (_safe_norm(a, 0) * _safe_norm(b, 1))
    left = f.w_norm.astype(ct)[:, None] * a * c[None, :]
    return _lowrank.LowRank(left, b, 1.0)


def delora(
    rank: int,
    *,
    delora_lambda: float = 15.0,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """DeLoRA: ``W' = W0 + diag(w_norm) · a · diag(λ/r / (‖a_:i‖‖b_i:‖)) · b``.

    ``a (in, r)``, ``b (r, out)`` and ``λ`` are trainable; ``w_norm (in,)``,
    the base's per-input-feature norm, is computed at init and frozen.
    Identity at init (``b = 0``). Trainable parameters: ``r·(in + out) + 1``
    per matrix, PEFT's count. The factored path computes ``(((x ⊙ w_norm) @ a)
    ⊙ c) @ b`` (``O(r·(in + out))`` per row); ``unapply`` subtracts the same
    delta (exact up to rounding).

    Args:
      rank: ``r`` (static; PEFT's default 8).
      delora_lambda: the initial ``λ`` (PEFT's default 15), which bounds
        ``‖ΔW‖_F <= λ·‖W0‖_F``.
      init_weights: True (PEFT's default): ``a ~ U(±1/sqrt(in))``
        (kaiming-uniform, ``a=sqrt(5)``), ``b = 0``; False: also ``b ~
        U(±1/sqrt(r))`` (not the identity, PEFT's debugging option).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a``, ``b``, ``λ`` and ``w_norm``.
      dropout: PEFT's ``module_dropout``, which drops entries of the adapter
        input (``dropout(x)``; PEFT applies ``nn.Dropout`` to ``x``); only the
        factored path can apply it.

    Returns:
      An ``Adapter`` with trainable ``DeLoRAParams(a, b, boundary)`` and frozen
      ``DeLoRANorm(w_norm)``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0`` or a non-finite ``delora_lambda``.
      TypeError: ``init_weights`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = delora(2, delora_lambda=4.0)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, t.boundary, f.w_norm.shape
      ((6, 2), (2, 5), Array([4.], dtype=float32), (6,))
      >>> bool((ad.apply(w, t, f) == w).all())
      True

    References:
      Bini et al., ICLR 2025, https://arxiv.org/abs/2503.18225
    """
    rank = _lora.check_rank(rank, "delora")
    if (isinstance(delora_lambda, bool) or not isinstance(delora_lambda, numbers.Real)
            or not math.isfinite(delora_lambda)):
        raise ValueError(f"delora: delora_lambda must be a finite number, got {delora_lambda!r}")
    if not isinstance(init_weights, bool):
        raise TypeError(f"delora: init_weights must be a bool, got {init_weights!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("delora takes no stats")
        n_in, n_out = w.shape
        ka, kb = jax.random.split(key)
        a = _lora.kaiming_uniform_a(ka, n_in, rank, param_dtype)
        if init_weights:
            b = jnp.zeros((rank, n_out), param_dtype)
        else:
            bound = 1.0 / math.sqrt(rank)
            b = jax.random.uniform(kb, (rank, n_out), param_dtype, -bound, bound)
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        w_norm = jnp.linalg.norm(w.astype(ct), axis=1).astype(param_dtype)
        boundary = jnp.full((1,), delora_lambda, param_dtype)
        return DeLoRAParams(a=a, b=b, boundary=boundary), DeLoRANorm(w_norm)

    return _lift.lift_matrix(
        name=f"delora(rank={rank}, delora_lambda={delora_lambda})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        **_lowrank.low_rank_forms(lambda t, f: _factors(t, f, rank)),
        hyperparameters=(("rank", rank), ("delora_lambda", float(delora_lambda)),
                         ("init_weights", init_weights), ("dropout", float(dropout))),
    )
