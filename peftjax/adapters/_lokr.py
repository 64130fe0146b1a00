# SPDX-License-Identifier: Apache-2.0
"""LoKr: a Kronecker-product delta ``W' = W + s·(W1 ⊗ W2)``.

LyCORIS (LoKr). Yeh et al., "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", 2023. https://arxiv.org/abs/2309.14859
The paper's LoKr update (§3, "LoKr") is ``ΔW = C ⊗ (B A)``: a small full
factor ``C`` Kronecker-multiplied by a low-rank factor. This module follows
Hugging Face PEFT's ``tuners/lokr`` (the PEFT-format path), which also lets
``C`` be low rank (``decompose_both``) and lets ``B A`` be full when the
rank is large.

Shapes (PEFT). A torch weight ``(out, in)`` with ``out = out_l·out_k`` and
``in = in_m·in_n`` (``lokr_factorization`` of each side, ``decompose_factor``)
gets ``ΔW_torch = s·kron(w1_t (out_l, in_m), w2_t (out_k, in_n))``, with
``w1_t = lokr_w1`` or ``lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_m)`` and
``w2_t = lokr_w2`` or ``lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n)``;
``s = alpha / r``. ``w1`` is full unless ``decompose_both`` and
``r < max(out_l, in_m)/2``; ``w2`` is full unless ``r < max(out_k, in_n)/2``.

Flax layout. The kernel is ``(in, out) = ΔW_torchᵀ`` and
``kron(A, B)ᵀ = kron(Aᵀ, Bᵀ)``, so ``ΔW = s·kron(W1 (in_m, out_l), W2 (in_n,
out_k))`` with every PEFT tensor transposed under its own name:
``w1 = lokr_w1ᵀ``, ``w1_a = lokr_w1_aᵀ (r, out_l)``, ``w1_b = lokr_w1_bᵀ
(in_m, r)`` and ``W1 = w1_b @ w1_a`` (likewise ``w2``, ``w2_a (r, out_k)``,
``w2_b (in_n, r)``, ``W2 = w2_b @ w2_a``). Kernel row ``i·in_n + j`` and
column ``p·out_k + q`` hold ``s·W1[i, p]·W2[j, q]``.

Factored form (the Kronecker trick): ``x @ kron(W1, W2)`` is
``einsum("...ij,ip,jq->...pq")`` of ``x`` reshaped to ``(..., in_m, in_n)``,
contracted with ``W2`` (through its low-rank factors when it has them) and
then with ``W1``; ``ΔW`` is never formed.

Exports: ``LoKrInit``, ``LoKrParams``, ``lokr``, ``lokr_factorization``.
"""

import enum
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class LoKrInit(enum.Enum):
    """Initialisation of the LoKr factors (both keep the model unchanged at init).

    Attributes:
      PEFT: PEFT's default (``init_weights=True``): ``W1`` is zero (``w1`` or
        ``w1_a``), every other factor kaiming-uniform ``U(±1/sqrt(fan_in))``
        with torch's fan-in (the last axis of the torch tensor).
      LYCORIS: PEFT's ``init_weights="lycoris"``: ``W2`` is zero (``w2`` or
        ``w2_b``), every other factor kaiming-uniform.
    """

    PEFT = "peft"
    LYCORIS = "lycoris"


class LoKrParams(NamedTuple):
    """Trainable LoKr factors (per matrix); the unused ones are None.

    Attributes:
      w1: ``(in_m, out_l)`` full first factor, or None.
      w1_a: ``(r, out_l)``, or None (``W1 = w1_b @ w1_a``).
      w1_b: ``(in_m, r)``, or None.
      w2: ``(in_n, out_k)`` full second factor, or None.
      w2_a: ``(r, out_k)``, or None (``W2 = w2_b @ w2_a``).
      w2_b: ``(in_n, r)``, or None.
    """

    w1: jax.Array | None = None
    w1_a: jax.Array | None = None
    w1_b: jax.Array | None = None
    w2: jax.Array | None = None
    w2_a: jax.Array | None = None
    w2_b: jax.Array | None = None


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` into ``(m, n)`` with ``m·n = dimension``, as PEFT's LoKr.

    With ``factor > 0`` dividing ``dimension`` the answer is ``(factor,
    dimension // factor)`` as given (not sorted). Otherwise divisors ``m`` are
    tried in increasing order, none above ``factor`` (``-1``: no bound), until
    ``m >= dimension // m``; the last accepted pair is returned sorted.

    Args:
      dimension: a positive integer (a matrix side).
      factor: PEFT's ``decompose_factor``; ``-1`` splits near the square root.

    Returns:
      ``(m, n)`` with ``m * n == dimension``.

    Example:
      >>> lokr_factorization(128), lokr_factorization(127), lokr_factorization(128, 4)
      ((8, 16), (1, 127), (4, 32))
    """
    for name, v in (("dimension", dimension), ("factor", factor)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"lokr_factorization: {name} must be an int, got {v!r}")
    if dimension <= 0:
        raise ValueError(f"lokr_factorization: dimension must be > 0, got {dimension}")
    if factor > 0 and dimension % factor == 0:
        return int(factor), int(dimension // factor)
    bound = dimension if factor == -1 else factor
    m, n = 1, int(dimension)
    d = 1
    while m < n:
        d += 1
        while dimension % d:
            d += 1
        if d > bound:
            break
        m, n = d, dimension // d
    return (m, n) if m <= n else (n, m)


def _uniform(key, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _factor(full, a, b):
    """``(full, left, right)``: the factor itself or its low-rank pair ``left @ right``."""
    return (full, None, None) if full is not None else (None, b, a)


def lokr(
    rank: int = 8,
    *,
    alpha: float = 8.0,
    decompose_both: bool = False,
    decompose_factor: int = -1,
    init: LoKrInit = LoKrInit.PEFT,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """LoKr: ``W' = W + (alpha/r)·kron(W1, W2)`` (PEFT's ``LoKrConfig``).

    The model is unchanged at init (one Kronecker factor starts at zero, see
    ``LoKrInit``). Trainable parameters per matrix, with ``in = in_m·in_n``,
    ``out = out_l·out_k``: ``in_m·out_l`` (or ``r·(in_m + out_l)`` when
    ``W1`` is decomposed) plus ``in_n·out_k`` (or ``r·(in_n + out_k)``),
    exactly PEFT's count.

    Args:
      rank: ``r`` (PEFT's default 8).
      alpha: PEFT's ``alpha`` (default 8); the scaling is ``alpha / r``.
      decompose_both: also write ``W1`` as ``w1_b @ w1_a`` when
        ``r < max(in_m, out_l)/2``.
      decompose_factor: PEFT's ``decompose_factor`` for ``lokr_factorization``
        of both sides (``-1``: near the square root).
      init: a ``LoKrInit`` member.
      rank_dropout: must be 0: rank dropout (PEFT's training-only row
        dropout of ``ΔW``) is not supported.
      module_dropout: must be 0: module dropout is not supported.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the factors.

    Returns:
      An ``Adapter`` whose trainable part is ``LoKrParams`` and whose frozen
      part is None; its factored form uses the Kronecker trick (module doc).

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``, non-zero ``rank_dropout`` or
        ``module_dropout``, or ``decompose_factor`` neither ``-1`` nor positive.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lokr(rank=1, alpha=2.0)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 8)))
      >>> t.w1.shape, t.w2_b.shape, t.w2_a.shape
      ((2, 2), (3, 1), (1, 4))

    References:
      Yeh et al., 2023, https://arxiv.org/abs/2309.14859
    """
    rank = _lora.check_rank(rank, "lokr")
    s = _lora.check_alpha(alpha, "lokr") / rank
    if not isinstance(init, LoKrInit):
        raise TypeError(f"lokr: init must be a LoKrInit member, got {init!r}")
    for name, v in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
        if float(v) != 0.0:
            raise ValueError(
                f"lokr: {name}={v} is not supported (only 0.0): peftjax's LoKr has no "
                f"{name.replace('_', ' ')}; train without it or use another method")
    if isinstance(decompose_factor, bool) or not isinstance(decompose_factor, numbers.Integral) \
            or not (decompose_factor == -1 or decompose_factor > 0):
        raise ValueError(
            f"lokr: decompose_factor must be -1 or a positive int, got {decompose_factor!r}")
    param_dtype = jnp.dtype(param_dtype)
    name = (f"lokr(rank={rank}, alpha={alpha}, decompose_both={decompose_both}, "
            f"decompose_factor={decompose_factor})")

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("lokr takes no stats")
        n_in, n_out = w.shape
        in_m, in_n = lokr_factorization(n_in, decompose_factor)
        out_l, out_k = lokr_factorization(n_out, decompose_factor)
        use_w1 = not (decompose_both and rank < max(out_l, in_m) / 2)
        use_w2 = not rank < max(out_k, in_n) / 2
        k = iter(jax.random.split(key, 4))
        zero1 = init is LoKrInit.PEFT
        p = {}
        # Kaiming bounds use torch's fan-in: the last axis of the torch tensor,
        # i.e. the first axis of its transpose here.
        if use_w1:
            p["w1"] = (jnp.zeros((in_m, out_l), param_dtype) if zero1
                       else _uniform(next(k), (in_m, out_l), in_m, param_dtype))
        else:
            p["w1_a"] = (jnp.zeros((rank, out_l), param_dtype) if zero1
                         else _uniform(next(k), (rank, out_l), rank, param_dtype))
            p["w1_b"] = _uniform(next(k), (in_m, rank), in_m, param_dtype)
        if use_w2:
            p["w2"] = (_uniform(next(k), (in_n, out_k), in_n, param_dtype) if zero1
                       else jnp.zeros((in_n, out_k), param_dtype))
        else:
            p["w2_a"] = _uniform(next(k), (rank, out_k), rank, param_dtype)
            p["w2_b"] = (_uniform(next(k), (in_n, rank), in_n, param_dtype) if zero1
                         else jnp.zeros((in_n, rank), param_dtype))
        return LoKrParams(**p), None

    def factors(t, ct):
        def dense(full, a, b):
            return full.astype(ct) if full is not None else b.astype(ct) @ a.astype(ct)
        return dense(t.w1, t.w1_a, t.w1_b), dense(t.w2, t.w2_a, t.w2_b)

    def delta(w, t):
        ct = _lowrank.compute_dtype(w.dtype, *(x.dtype for x in jax.tree.leaves(t)))
        w1, w2 = factors(t, ct)
        return ct, jnp.kron(w1, w2) * jnp.asarray(s, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        def kron_delta(x):
            ct = _lowrank.compute_dtype(x.dtype, *(v.dtype for v in jax.tree.leaves(t)))
            full1, l1, r1 = _factor(t.w1, t.w1_a, t.w1_b)
            full2, l2, r2 = _factor(t.w2, t.w2_a, t.w2_b)
            in_m = (full1 if full1 is not None else l1).shape[0]
            in_n = (full2 if full2 is not None else l2).shape[0]
            h = x.astype(ct).reshape(x.shape[:-1] + (in_m, in_n))
            # Contract in_n with W2, then in_m with W1: (..., out_l, out_k).
            if full2 is not None:
                h = h @ full2.astype(ct)
            else:
                h = (h @ l2.astype(ct)) @ r2.astype(ct)
            h = jnp.swapaxes(h, -1, -2)  # (..., out_k, in_m)
            if full1 is not None:
                h = h @ full1.astype(ct)
            else:
                h = (h @ l1.astype(ct)) @ r1.astype(ct)
            h = jnp.swapaxes(h, -1, -2)  # (..., out_l, out_k)
            return h.reshape(x.shape[:-1] + (-1,)) * jnp.asarray(s, ct)

        return _protocol.FactoredTerms(delta=kron_delta)

    return _lift.lift_matrix(
        name=name,
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("alpha", float(alpha)),
                         ("decompose_both", bool(decompose_both)),
                         ("decompose_factor", int(decompose_factor))),
    )
