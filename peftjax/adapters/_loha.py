# SPDX-License-Identifier: Apache-2.0
"""LoHa: a low-rank Hadamard product delta, as Hugging Face PEFT's ``LOHA`` tuner.

FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning. Hyeon-Woo, Ye-Bin & Oh, 2021. https://arxiv.org/abs/2108.06098
LyCORIS: Navigating Text-to-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation. Yeh et al., 2023. https://arxiv.org/abs/2309.14859

FedPara's parameterisation ``W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ)`` (§3) used as an
additive update (LyCORIS's "LoHa"): ``ΔW = s·(W1a W1b) ⊙ (W2a W2b)`` on a torch weight ``(out, in)``
with PEFT's ``hada_w1_a, hada_w2_a (out, r)`` and ``hada_w1_b, hada_w2_b (r,
in)`` and ``s = alpha / r``. On a Flax kernel ``(in, out)`` the factors are
transposed and the pairs read ``a_k = hada_wk_bᵀ (in, r)``, ``b_k = hada_wkaᵀ
(r, out)``, so ``ΔK = s·(a1@b1) ⊙ (a2@b2)``; the rank of ``ΔK`` is up to
``r²`` (FedPara Proposition 1) for ``4·r`` LoRA-sized factors.

Initialisation as PEFT's ``init_weights=True`` (FedPara uses He init, LyCORIS
a normal one; PEFT's choice is followed): every factor kaiming-uniform with
``a=sqrt(5)`` (bound ``1/sqrt(fan_in)``, torch's fan-in is the factor's second
axis) except ``hada_w2_b = 0``, so the adapter starts at the identity.

Factored form: the delta is the ABBA/Khatri-Rao product
``(a1@b1) ⊙ (a2@b2) = a_kr @ b_kr`` with ``a_kr (in, r²)``, ``b_kr (r², out)``
(``abba_khatri_rao``); ``x@ΔK = s·(x@a_kr)@b_kr`` costs ``r²·(in + out)`` per
row of ``x`` instead of the ``in·out`` of ``x@(W + ΔW)`` and forms no ``(in,
out)`` matrix, a saving whenever ``r² < in·out / (in + out)`` (``r <= 45`` on a
4096-square matrix).

Not modelled: PEFT's training-time ``rank_dropout`` and ``module_dropout``
and the Tucker ``hada_t1/t2`` cores of ``use_effective_conv2d`` (convolutions
with a spatial kernel); ``io.load_peft`` refuses a config that sets any of
them, naming the field. PEFT format: ``io.save_peft`` / ``io.load_peft``
(``peft_type: LOHA``, ``alpha`` and ``alpha_pattern`` as PEFT's).

Exports: ``LoHaParams``, ``loha``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _abba, _lift, _lora, _protocol


class LoHaParams(NamedTuple):
    """Trainable LoHa factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a1: ``(in, r)`` = PEFT ``hada_w1_b.T``, init ``U(±1/sqrt(in))``.
      b1: ``(r, out)`` = PEFT ``hada_w1_a.T``, init ``U(±1/sqrt(r))``.
      a2: ``(in, r)`` = PEFT ``hada_w2_b.T``, init 0.
      b2: ``(r, out)`` = PEFT ``hada_w2_a.T``, init ``U(±1/sqrt(r))``.
    """

    a1: jax.Array
    b1: jax.Array
    a2: jax.Array
    b2: jax.Array


def loha(
    rank: int,
    *,
    alpha: float = 8.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """LoHa: ``W' = W + (alpha/r)·(a1@b1) ⊙ (a2@b2)``, all four factors trainable.

    Identity at init (``a2 = 0``, PEFT's ``hada_w2_b``). Trainable parameters:
    ``2·r·(in + out)`` per matrix, PEFT's count. The factored path uses the
    Khatri-Rao factors: ``s·(x@a_kr)@b_kr`` at ``O(r²·(in + out))`` per row,
    never an ``(in, out)`` matrix; ``apply`` forms the two ``(in, out)``
    products and ``unapply`` subtracts the same delta (exact up to rounding).

    Args:
      rank: ``r`` (static; PEFT's ``r``, default there 8).
      alpha: PEFT's ``alpha`` (default 8); the scale is ``alpha / r``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the factors.

    Returns:
      An ``Adapter`` with trainable ``LoHaParams(a1, b1, a2, b2)`` and frozen
      part None.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0`` or ``alpha <= 0``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = loha(2, alpha=4.0)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a1.shape, t.b1.shape, t.a2.shape, t.b2.shape, f
      ((6, 2), (2, 5), (6, 2), (2, 5), None)
      >>> bool((ad.apply(w, t, f) == w).all())
      True

    References:
      Hyeon-Woo et al., 2021, https://arxiv.org/abs/2108.06098 ; Yeh et al.,
      2023, https://arxiv.org/abs/2309.14859
    """
    rank = _lora.check_rank(rank, "loha")
    s = _lora.check_alpha(alpha, "loha") / rank
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("loha takes no stats")
        n_in, n_out = w.shape
        k1, k2, k3 = jax.random.split(key, 3)
        bound_in, bound_r = 1.0 / math.sqrt(n_in), 1.0 / math.sqrt(rank)
        t = LoHaParams(
            a1=jax.random.uniform(k1, (n_in, rank), param_dtype, -bound_in, bound_in),
            b1=jax.random.uniform(k2, (rank, n_out), param_dtype, -bound_r, bound_r),
            a2=jnp.zeros((n_in, rank), param_dtype),
            b2=jax.random.uniform(k3, (rank, n_out), param_dtype, -bound_r, bound_r),
        )
        return t, None

    return _lift.lift_matrix(
        name=f"loha(rank={rank}, alpha={alpha})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("alpha", float(alpha))),
        **_abba.hadamard_forms(s),
    )
