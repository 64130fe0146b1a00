# SPDX-License-Identifier: Apache-2.0
"""L4Q: quantisation-aware training of ``W0 + s·A@B`` with learned step sizes.

L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
Models. Jeon, Kim & Kim, ACL 2025 (arXiv 2024).
https://arxiv.org/abs/2402.04902

L4Q (§3, "memory-optimized layer design") merges the LoRA factors into the
frozen weight *before* quantising, and quantises the sum with learned
quantisation parameters (LSQ, Esser et al. 2020,
https://arxiv.org/abs/1902.08153)::

    W' = W0 + s·A@B
    W_q = α · clip(round((W' - β)/α), Q_n, Q_p) + β

so the trained model is one linearly quantised matrix (integers ``q`` and a
step ``α`` per block of ``block_size`` input rows and output column), with no
float adapter beside it. Training is LoRA's (``W0`` frozen) plus the step
sizes; the rounding is passed straight through (STE) and the step size gets
LSQ's gradient, written here as a ``jax.custom_vjp``: with ``v = (W' - β)/α``
and ``I`` the indicator of ``Q_n <= v <= Q_p``,

* ``∂W_q/∂W' = I`` (straight-through inside the range, 0 where clipped),
  so ``∂L/∂A = s·(G⊙I)@Bᵀ`` and ``∂L/∂B = s·Aᵀ@(G⊙I)``: the gradient of
  ``W'`` is never a trainable leaf (the paper's point: no full-weight
  gradient is stored beyond the one the chain rule passes through);
* ``∂W_q/∂α = round(v) - v`` inside, ``Q_n`` or ``Q_p`` where clipped (LSQ),
  times LSQ's gradient scale ``1/sqrt(n·Q_p)`` (``n`` weights per step);
* ``∂W_q/∂β = 1 - I`` (LSQ+'s offset, ``asymmetric=True`` only).

Symmetric (default): signed integers ``Q_n = -2^(b-1)``, ``Q_p = 2^(b-1)-1``,
``β = 0``, ``α = max|W0_block| / Q_p`` (absmax: the block's largest weight
lands on a level, never on a rounding tie, which would make the result
depend on the float width): at init ``W_q`` is the round-to-nearest
quantisation of ``W0`` (``|W_q - W0| <= α/2``), and after
training ``l4q_codes`` gives ``W_q`` as exactly ``q`` and ``α``, which
``peftjax.quant.from_codes`` stores as an ``int4`` or ``int8``
``QuantizedArray`` (dequantising it
gives ``W_q`` bit for bit). Asymmetric: unsigned ``Q_n = 0``, ``Q_p = 2^b-1``,
``β = min W0_block`` and ``α = (max - min)/Q_p``, both trained.

LoRA's init (``A`` kaiming-uniform, ``B = 0``), so at init ``W_q = Q(W0)``,
the quantised base, not ``W0``: L4Q is not the identity at init. The paper
also warms up on ``Q(W0) + A@B`` before switching to ``Q(W0 + A@B)``; that is
a schedule outside the adapter (train ``adapters.lora`` on
``quant``-dequantised weights first, then load ``a, b`` into ``L4QParams``).

Layout (Flax kernel ``W0 (in, out)``): ``a (in, r)``, ``b (r, out)``,
``step (in/block_size, out)``, ``offset`` likewise (asymmetric) or absent.
Trainable: ``r·(in + out) + (in/block_size)·out`` (twice the last term if
asymmetric).

No factored form: ``W_q`` is a non-linear function of the whole matrix and is
the weight itself (the paper's layer forms it in the forward pass), so the
factored path materialises it, as it does for any weight-space adapter.
``unapply`` does not exist (rounding loses ``W0``): ``adapters.unfold``
refuses L4Q; keep ``W0``.

Exports: ``L4QParams``, ``l4q``, ``l4q_codes``, ``fake_quant``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class L4QParams(NamedTuple):
    """Trainable L4Q parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` LoRA down factor.
      b: ``(r, out)`` LoRA up factor.
      step: ``(in/block_size, out)`` LSQ step sizes ``α`` (one per block).
      offset: ``(in/block_size, out)`` offsets ``β`` (asymmetric), or a
        ``(0, out)`` empty array (symmetric: ``β = 0``).
    """

    a: jax.Array
    b: jax.Array
    step: jax.Array
    offset: jax.Array


def _levels(bits: int, asymmetric: bool) -> tuple[int, int]:
    if asymmetric:
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fq(w, step, offset, qn, qp, grad_scale):
    v = (w - offset) / step
    return jnp.clip(jnp.round(v), qn, qp) * step + offset


def _fq_fwd(w, step, offset, qn, qp, grad_scale):
    v = (w - offset) / step
    q = jnp.clip(jnp.round(v), qn, qp)
    return q * step + offset, (v, q, step.shape, offset.shape)


def _fq_bwd(qn, qp, grad_scale, res, g):
    v, q, step_shape, offset_shape = res
    inside = ((v >= qn) & (v <= qp)).astype(g.dtype)
    gw = g * inside
    gstep = jnp.sum(g * (q - v * inside), axis=-2, keepdims=True) * grad_scale
    goff = jnp.sum(g * (1 - inside), axis=-2, keepdims=True)
    return gw, gstep.reshape(step_shape), goff.reshape(offset_shape)


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(w: jax.Array, step: jax.Array, offset: jax.Array | None = None, *,
               bits: int = 4, asymmetric: bool = False,
               lsq_grad_scale: bool = True) -> jax.Array:
    """``α·clip(round((w - β)/α), Q_n, Q_p) + β`` per block, with LSQ's gradients.

    Blocks are ``block_size = in / step.shape[0]`` consecutive rows of one
    column of ``w (in, out)``. Gradients: straight-through for ``w`` inside
    the range (0 where clipped), LSQ's for ``α`` (scaled by ``1/sqrt(block_size·Q_p)``
    when ``lsq_grad_scale``), ``1 - I`` for ``β`` (see the module docstring).

    Args:
      w: ``(in, out)`` float weights.
      step: ``(nb, out)`` positive step sizes, ``nb`` dividing ``in``.
      offset: ``(nb, out)`` offsets, or None (0; symmetric).
      bits: integer width ``b`` (2 to 8).
      asymmetric: unsigned levels ``0..2^b-1`` (else ``-2^(b-1)..2^(b-1)-1``).
      lsq_grad_scale: scale the step's gradient as LSQ does.

    Returns:
      ``(in, out)`` fake-quantised weights in the computation dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[0.26], [-0.74], [2.0], [0.1]])
      >>> fake_quant(w, jnp.full((1, 1), 0.25), bits=3)[:, 0]
      Array([ 0.25, -0.75,  0.75,  0.  ], dtype=float32)
    """
    n_in, n_out = w.shape
    nb = step.shape[0]
    if n_in % nb:
        raise ValueError(f"fake_quant: step of shape {tuple(step.shape)} does not "
                         f"block w of shape {tuple(w.shape)}")
    qn, qp = _levels(bits, asymmetric)
    bs = n_in // nb
    gs = 1.0 / math.sqrt(bs * qp) if lsq_grad_scale else 1.0
    ct = _lowrank.compute_dtype(jnp.float32, w.dtype, step.dtype)
    wb = w.astype(ct).reshape(nb, bs, n_out)
    off = (jnp.zeros((nb, 1, n_out), ct) if offset is None
           else offset.astype(ct)[:, None, :])
    out = _fq(wb, step.astype(ct)[:, None, :], off, float(qn), float(qp), gs)
    return out.reshape(n_in, n_out)


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"l4q: {name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def l4q(
    rank: int,
    *,
    bits: int = 4,
    block_size: int | None = 128,
    asymmetric: bool = False,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    lsq_grad_scale: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """L4Q: ``W' = α·clip(round((W0 + s·A@B - β)/α), Q_n, Q_p) + β`` (§3).

    LoRA merged into the frozen weight, then quantised with learned LSQ step
    sizes ``α`` per block of ``block_size`` input rows and output column; the
    rounding is straight-through (``fake_quant``'s ``custom_vjp``). Trainable:
    ``r·(in + out) + (in/block_size)·out`` (``asymmetric``: plus the offsets
    ``β``, as many again). At init ``W' = Q(W0)``, the quantised base (not
    the identity). Weight space only (no factored form, no ``unapply``); after
    training ``l4q_codes`` gives the integer model.

    Args:
      rank: ``r`` (static).
      bits: integer width (2 to 8; 4 by default, the paper's main setting).
      block_size: input rows per step size (the paper's group size; 128 by
        default), or None: one step per output column (per-channel). Must
        divide the matrix view's ``in``.
      asymmetric: unsigned levels with a trained offset ``β`` (LSQ+), else
        symmetric signed levels with ``β = 0`` (default).
      alpha: ``lora_alpha`` (``s = alpha/r``).
      scaling: ``Scaling.ALPHA_OVER_RANK`` (default), ``ALPHA_OVER_SQRT_RANK``
        or ``NONE``.
      lsq_grad_scale: scale the step-size gradient by LSQ's
        ``1/sqrt(block_size·Q_p)`` (default True).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the trainable parameters.

    Returns:
      An ``Adapter`` with trainable ``L4QParams(a, b, step, offset)`` and no
      frozen part.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``bits`` outside 2..8, ``block_size <= 0``;
        at init, ``block_size`` not dividing ``in``.
      TypeError: ``asymmetric`` or ``lsq_grad_scale`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = l4q(2, bits=4, block_size=3)
      >>> w = jnp.linspace(-1.0, 1.0, 30).reshape(6, 5)
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, t.step.shape, t.offset.shape, f
      ((6, 2), (2, 5), (2, 5), (0, 5), None)
      >>> wq = ad.apply(w, t, f)
      >>> bool(jnp.all(jnp.abs(wq - w) <= t.step.repeat(3, 0) / 2 + 1e-6))
      True

    References:
      Jeon, Kim & Kim, ACL 2025, https://arxiv.org/abs/2402.04902;
      Esser et al., ICLR 2020 (LSQ), https://arxiv.org/abs/1902.08153
    """
    rank = _lora.check_rank(rank, "l4q")
    bits = _check_int(bits, "bits", 2, 8)
    if block_size is not None:
        block_size = _check_int(block_size, "block_size", 1, 2 ** 31)
    for name, v in (("asymmetric", asymmetric), ("lsq_grad_scale", lsq_grad_scale)):
        if not isinstance(v, bool):
            raise TypeError(f"l4q: {name} must be a bool, got {v!r}")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    qn, qp = _levels(bits, asymmetric)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("l4q takes no stats")
        n_in, n_out = w.shape
        bs = n_in if block_size is None else block_size
        if n_in % bs:
            raise ValueError(f"l4q: block_size={bs} does not divide in={n_in} of the "
                             f"matrix view of shape {tuple(w.shape)}")
        wb = w.astype(jnp.float32).reshape(n_in // bs, bs, n_out)
        if asymmetric:
            lo, hi = jnp.min(wb, axis=1), jnp.max(wb, axis=1)
            step = (hi - lo) / qp
            offset = lo
        else:
            step = jnp.max(jnp.abs(wb), axis=1) / qp
            offset = jnp.zeros((0, n_out))
        step = jnp.where(step > 0, step, 1.0)  # a constant block: any positive step
        a = _lora.kaiming_uniform_a(key, n_in, rank, param_dtype)
        return L4QParams(a=a, b=jnp.zeros((rank, n_out), param_dtype),
                         step=step.astype(param_dtype),
                         offset=offset.astype(param_dtype)), None

    def apply_matrix(w, t, f):
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype, t.a.dtype)
        merged = w.astype(ct) + s * (t.a.astype(ct) @ t.b.astype(ct))
        return fake_quant(merged, t.step, t.offset if asymmetric else None, bits=bits,
                          asymmetric=asymmetric, lsq_grad_scale=lsq_grad_scale)

    return _lift.lift_matrix(
        name=(f"l4q(rank={rank}, bits={bits}, block_size={block_size}, "
              f"asymmetric={asymmetric}, alpha={alpha}, scaling={scaling.value})"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("bits", bits), ("block_size", block_size),
                         ("asymmetric", asymmetric), ("alpha", alpha),
                         ("scaling", scaling), ("s", s),
                         ("lsq_grad_scale", lsq_grad_scale)),
    )


def l4q_codes(adapter: _protocol.Adapter, w: jax.Array, trainable: L4QParams
              ) -> tuple[jax.Array, jax.Array]:
    """The trained L4Q matrix as integers and step sizes (the quantised model).

    ``q = clip(round(W'/α), Q_n, Q_p)`` per block of ``block_size`` input
    rows and column, and the steps ``α``: ``q·α`` is ``adapter.apply(w, ...)``
    bit for bit. ``peftjax.quant.from_codes(q, α, quant.int4(block_size=...),
    w.dtype)`` makes them a ``QuantizedArray`` that runs through
    ``peftjax.factored`` like any ``quant.quantize_params`` tree.

    Args:
      adapter: an ``l4q(...)`` adapter, symmetric, ``bits`` 4 or 8; its
        ``block_size`` set or None (then ``in``).
      w: the frozen ``(in, out)`` kernel (2-D, Flax layout).
      trainable: its ``L4QParams``.

    Returns:
      ``(codes, steps)``: int8 ``(in/block_size, block_size, out)`` integers
      in ``[Q_n, Q_p]`` and float32 ``(in/block_size, out)`` steps.

    Raises:
      ValueError: not an L4Q adapter, asymmetric, ``bits`` not 4 or 8, or
        ``w`` not 2-D.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import quant
      >>> ad = l4q(2, bits=4, block_size=2)
      >>> w = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
      >>> t, _ = ad.init(jax.random.key(0), w)
      >>> codes, steps = l4q_codes(ad, w, t)
      >>> qa = quant.from_codes(codes, steps, quant.int4(block_size=2), w.dtype)
      >>> bool(jnp.array_equal(quant.dequantize(qa), ad.apply(w, t, None)))
      True
    """
    hp = dict(adapter.hyperparameters)
    if "lsq_grad_scale" not in hp or "bits" not in hp:
        raise ValueError(f"l4q_codes: {adapter!r} is not an l4q adapter")
    if hp["asymmetric"] or hp["bits"] not in (4, 8):
        raise ValueError(f"l4q_codes: {adapter!r} has no integer-only form "
                         "(needs symmetric bits=4 or bits=8)")
    if w.ndim != 2:
        raise ValueError(f"l4q_codes: w must be a 2-D (in, out) kernel, got shape "
                         f"{tuple(w.shape)}")
    n_in, n_out = w.shape
    bs = hp["block_size"] or n_in
    qn, qp = _levels(hp["bits"], False)
    merged = w.astype(jnp.float32) + hp["s"] * (trainable.a.astype(jnp.float32)
                                                @ trainable.b.astype(jnp.float32))
    step = trainable.step.astype(jnp.float32)
    nb = n_in // bs
    q = jnp.clip(jnp.round(merged.reshape(nb, bs, n_out) / step[:, None, :]), qn, qp)
    return q.astype(jnp.int8), step
