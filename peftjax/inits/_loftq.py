# SPDX-License-Identifier: Apache-2.0
"""LoftQ: alternate quantisation and a low-rank fit of the residual.

LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models. Li et
al., 2023. https://arxiv.org/abs/2310.08659

Algorithm 1 (Eq. 5-6; PEFT 0.21.2 ``utils/loftq_utils.py::loftq_init``),
torch layout ``W (out, in)``, ``R₀ = W``; for ``t = 1..T``:

* ``Q_t = q_N(W − A_{t−1}B_{t−1}ᵀ)`` (Eq. 5: quantise, then dequantise;
  ``A₀B₀ᵀ = 0``),
* ``U S Vhᵀ = SVD(W − Q_t)``, ``L_t = U_r √S_r``, ``R_t = √S_r Vh_r``
  (Eq. 6, the rank-``r`` fit of the quantisation residual).

The frozen base becomes ``Q_T`` (dequantised, i.e. exactly representable in
the format) and the adapter ``lora_A = R_T``, ``lora_B = L_T``. As PEFT does,
the LoRA scaling ``s`` is *not* folded into the factors, so
``Q + s·B A`` is LoftQ's approximation ``Q + L R`` only when ``s = 1``
(``lora_alpha = r``), or with ``absorb_scaling=True`` (an option PEFT lacks:
``a, b /= √s``). Flax kernel ``K = Wᵀ``: ``a = R_Tᵀ``, ``b = L_Tᵀ``, from the
SVD of ``K − Q_K``. ``q_N`` is the caller's round trip, e.g.
``peftjax.quant``'s ``nf4()`` or ``int4()`` blocked along the kernel's input
axis (``inits`` does not import ``quant``): PEFT uses bitsandbytes' NF4 with
64-value blocks along ``in``, the same grouping and code book as
``quant.nf4()``.

Exports: ``loftq``.
"""

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common, _linalg


def _fit(res: Any, rank: int):
    u, sv, vt = _linalg.svd(res)
    root = jnp.sqrt(sv[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def loftq(
    rank: int,
    *,
    quantizer: Callable[[jax.Array], jax.Array],
    num_iter: int = 1,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    absorb_scaling: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _base.Initializer:
    """LoftQ: the base becomes ``Q`` (quantisable exactly), the adapter fits ``W − Q``.

    After ``inits.run``, ``res.params`` holds the dequantised ``Q`` at every
    LoftQ path; quantise it for training with the same format
    (``quant.quantize_params(res.params, [Rule(where=..., then=fmt)])``),
    which reproduces ``Q``'s codes exactly for ``peftjax.quant``'s absmax
    formats. ``‖W − Q − LR‖_F`` is below the
    quantisation-only error ``‖W − q_N(W)‖_F`` (by construction at
    ``num_iter=1``: ``LR`` is the best rank-``r`` fit of ``W − q_N(W)``) and
    usually falls with
    ``num_iter`` (alternating minimisation; not guaranteed: the rank-``r`` fit
    is optimal for its ``Q``, but rounding to the nearest code with an absmax
    block scale is not the Frobenius-optimal ``Q``, so an iteration can rise
    slightly: int4 on a 128×16 test matrix falls 7% over 4 iterations, with
    steps of ~0.1% whose sign depends on the CPU's kernels, and rises 0.8% at
    the 5th; keep the best ``num_iter``). Trainable parameters: ``r·(in+out)`` per
    matrix (a plain LoRA over ``Q``: export the state as is, over the
    quantised base; ``inits.to_lora`` refuses it, ``Q`` is not
    ``W − s·a₀@b₀``).

    Args:
      rank: ``r`` (``<= min(in, out)``).
      quantizer: ``w (in, out) float32 -> q_N(w)``, the quantise-dequantise
        round trip of one matrix, e.g. ``lambda w: quant.dequantize(
        quant.quantize(w, quant.nf4()))`` (64-value blocks along ``in``,
        PEFT's ``loftq_bits=4``); it runs on each matrix (slice) and must
        return its shape.
      num_iter: ``T`` alternating steps (PEFT ``loftq_iter``, default 1).
      alpha: ``lora_alpha``.
      scaling: ``adapters.Scaling`` member.
      absorb_scaling: divide ``a`` and ``b`` by ``√s`` so that
        ``Q + s·a@b = Q + LR`` for any ``alpha`` (PEFT: False).
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.

    Returns:
      An ``Initializer`` producing ``adapters.lora`` state over the base ``Q``.

    Raises:
      ValueError: ``num_iter < 1``, a ``quantizer`` that is not callable; at
        init, rank too large or a quantizer output of another shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, quant, tree
      >>> w = jax.random.normal(jax.random.key(1), (64, 8))
      >>> nf4 = lambda m: quant.dequantize(quant.quantize(m, quant.nf4()))
      >>> ini = inits.loftq(2, quantizer=nf4, alpha=2.0)
      >>> res = inits.run(tree.assign({"w": w}, [tree.Rule(where="w", then=ini)]),
      ...                 jax.random.key(0), {"w": w})
      >>> t = res.state.trainable["w"]
      >>> q_only = nf4(w)
      >>> bool(jnp.linalg.norm(w - res.params["w"] - t.a @ t.b) < jnp.linalg.norm(w - q_only))
      True

    References:
      Li et al., 2023, https://arxiv.org/abs/2310.08659
    """
    rank = _adapters.check_rank(rank, "loftq")
    if not callable(quantizer):
        raise ValueError(f"loftq: quantizer must be callable (w -> q_N(w)), got {quantizer!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, numbers.Integral) or num_iter < 1:
        raise ValueError(f"loftq: num_iter must be an int >= 1, got {num_iter!r}")
    param_dtype = jnp.dtype(param_dtype)
    s = _adapters.scaling_value(scaling, alpha, rank)
    adapter = _adapters.lora(rank, alpha=alpha, scaling=scaling,
                             dimension_numbers=dimension_numbers, param_dtype=param_dtype)

    def qdq(x):
        q = jnp.asarray(quantizer(x))
        if q.shape != x.shape:
            raise ValueError(f"loftq: the quantizer returned shape {q.shape} for a matrix "
                             f"of shape {x.shape}")
        return q.astype(jnp.float32)

    def init_matrix(key, w, stats):
        _common.check_fits(rank, w, "loftq")
        w32 = w.astype(jnp.float32)
        res = w32
        for _ in range(num_iter):
            q = qdq(res)
            a, b = _fit(w32 - q, rank)
            res = w32 - a @ b
        if absorb_scaling:
            root = jnp.sqrt(jnp.asarray(s, jnp.float32))
            a, b = a / root, b / root
        return q, _adapters.LoRAParams(a=a.astype(param_dtype), b=b.astype(param_dtype)), None

    qname = getattr(quantizer, "__name__", type(quantizer).__name__)
    label = f"loftq(rank={rank}, quantizer={qname}, num_iter={num_iter}, alpha={alpha})"
    return _base.Initializer(
        init=_base.lift(label, init_matrix, dimension_numbers, None),
        adapter=adapter, stats=None, modifies_base=True, rank=rank,
        alpha=float(alpha), scaling=scaling, dimension_numbers=dimension_numbers,
        param_dtype=param_dtype, name=label, exact_residual=False,
        relayout=lambda dims: loftq(rank, quantizer=quantizer, num_iter=num_iter, alpha=alpha,
                                    scaling=scaling, absorb_scaling=absorb_scaling,
                                    dimension_numbers=dims, param_dtype=param_dtype))
