# SPDX-License-Identifier: Apache-2.0
"""GLoRA: generalized LoRA, five paths on the weight and the bias.

One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning. Chavan,
Liu, Gupta, Xing & Shen, 2023. https://arxiv.org/abs/2306.07967

The paper (Eq. 10) adapts a frozen linear layer ``y = W0 x + b0`` by

    f(x) = (W0 + W0 ⊙ A + B) x + C W0 + D ⊙ b0 + E + b0,

with five support tensors, each a low-rank product, a vector, a scalar or
nothing (its "search space", §3). Hugging Face PEFT's ``tuners/glora``
(followed here, also for its files) fixes one choice per tensor family in
its config (no per-layer search: the paper's evolutionary search of §3.2 is
not part of PEFT) and writes, in torch layout ``W0 (out, in)``:

    W' = W0 + W0 ⊙ A + B,    b' = b0 + b0 ⊙ D + E + W0 · C,

with ``config_A_B`` (A and B alike) ``lora`` (``Xd (out, r) · Xu (r, in)``),
``vector`` (``(out, 1)``, broadcast over the inputs), ``constant`` (one
scalar) or ``none``; ``config_C`` ``lora`` (``Xd (in, r) · Xu (r, 1)``),
``vector`` (``(in, 1)``) or ``none``; ``config_D_E`` ``vector`` (``(out,)``),
``constant`` or ``none``. Where the paper's Eq. 10 writes ``C W0`` (a term
shaped like the weight), PEFT adds ``W0 · C`` to the bias; PEFT is followed.
On a layer without a bias PEFT leaves ``C``, ``D`` and ``E`` empty (no
parameters); here such a layer takes ``config_C="none"`` and
``config_D_E="none"`` (any other choice requires the bias leaf).

On a Flax kernel ``w (in, out)`` (= ``W0ᵀ``): ``w' = w + w ⊙ Aᵀ + Bᵀ`` with
``Aᵀ = a_in · a_out`` (lora; ``a_in = Xuᵀ (in, r)``, ``a_out = Xdᵀ (r,
out)``) or ``a`` broadcast along the output axis (vector ``(out,)``,
constant ``(1,)``); the bias is reparametrised by a ``BiasHook`` that reads
the base kernel: ``b' = b + b ⊙ d + e + c · w`` (``c = c_in · c_out``, ``(in,)``).
``unapply`` divides by ``1 + A`` (PEFT's ``unmerge``): exact where
``1 + A ≠ 0``.

PEFT's init (``init_weights=True``, the identity): ``Xu`` kaiming-uniform
(``U(±1/sqrt(in))``), ``Xd`` and every vector and scalar zero (C's lora
path: ``Xu (r, 1)`` ``U(±1)``, ``Xd`` zero). ``init_weights=False``:
``Xd`` ``U(±1/sqrt(r))``, column vectors ``U(±1)``, bias vectors
``U(±1/sqrt(out))``, scalars ``N(0, 0.02²)``.

Factored form (``y = x w' + b'``, the bias by the hook): ``A`` none:
``delta(x) = x Bᵀ``; ``A`` vector/constant: ``out_scale = 1 + a``,
``delta(x) = x Bᵀ / (1 + a)`` (requires ``1 + a ≠ 0``, as ``unapply``);
``A`` lora: ``delta(x) = x (w ⊙ Aᵀ) + x Bᵀ`` forms the one ``(in, out)``
Hadamard product (a rank-``r`` mask of ``w`` has no cheaper product with
``x``) and costs a second base product. Per row: ``x Bᵀ`` is ``2r(in+out)``
FLOPs (lora) or ``in + out`` (vector, constant: ``sum(x) · b``); lora ``A``
adds ``2·in·out``.

Exports: ``GLoRAParams``, ``glora``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol

_A_B = ("lora", "vector", "constant", "none")
_C = ("lora", "vector", "none")
_D_E = ("vector", "constant", "none")


class GLoRAParams(NamedTuple):
    """Trainable GLoRA parameters (per matrix); the paths not configured are None.

    Attributes:
      a: ``A`` vector ``(out,)`` or constant ``(1,)`` (PEFT ``glora_A.X``).
      a_in: ``A`` lora ``(in, r)`` = PEFT ``glora_A.Xu`` transposed.
      a_out: ``A`` lora ``(r, out)`` = PEFT ``glora_A.Xd`` transposed.
      b: ``B`` vector ``(out,)`` or constant ``(1,)``.
      b_in: ``B`` lora ``(in, r)`` (``glora_B.Xu`` transposed).
      b_out: ``B`` lora ``(r, out)`` (``glora_B.Xd`` transposed).
      c: ``C`` vector ``(in,)`` (``glora_C.X`` without its unit axis).
      c_in: ``C`` lora ``(in, r)`` = ``glora_C.Xd``.
      c_out: ``C`` lora ``(r,)`` = ``glora_C.Xu`` without its unit axis.
      d: ``D`` vector ``(out,)`` or constant ``(1,)`` (``glora_D.X``).
      e: ``E`` vector ``(out,)`` or constant ``(1,)`` (``glora_E.X``).
    """

    a: jax.Array | None = None
    a_in: jax.Array | None = None
    a_out: jax.Array | None = None
    b: jax.Array | None = None
    b_in: jax.Array | None = None
    b_out: jax.Array | None = None
    c: jax.Array | None = None
    c_in: jax.Array | None = None
    c_out: jax.Array | None = None
    d: jax.Array | None = None
    e: jax.Array | None = None


def _dense(t: GLoRAParams, name: str, ct: Any) -> jax.Array | None:
    """``Aᵀ``/``Bᵀ`` as an array broadcastable to ``(in, out)``, or None (path ``none``)."""
    whole = getattr(t, name)
    if whole is not None:
        return whole.astype(ct)[None, :]
    lo, hi = getattr(t, name + "_in"), getattr(t, name + "_out")
    if lo is None:
        return None
    return lo.astype(ct) @ hi.astype(ct)


def _c_vector(t: GLoRAParams, ct: Any) -> jax.Array | None:
    """``C`` as ``(in,)``, or None."""
    if t.c is not None:
        return t.c.astype(ct)
    if t.c_in is None:
        return None
    return t.c_in.astype(ct) @ t.c_out.astype(ct)


def _rows(v: jax.Array, ndim: int, ct: Any) -> jax.Array:
    """A vector ``(out,)`` or ``(1,)`` shaped to broadcast against ``(..., out)``."""
    return v.astype(ct).reshape((1,) * (ndim - 1) + v.shape)


def _dtype(*arrays: Any) -> Any:
    return _lowrank.compute_dtype(jnp.float32, *(x.dtype for x in arrays if x is not None))


def glora(
    rank: int = 8,
    *,
    config_A_B: str = "lora",  # noqa: N803
    config_C: str = "lora",  # noqa: N803
    config_D_E: str = "constant",  # noqa: N803
    init_weights: bool = True,
    bias_name: str = "bias",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """GLoRA: ``W' = W0 + W0 ⊙ A + B``, ``b' = b0 + b0 ⊙ D + E + W0·C`` (Eq. 10, PEFT's form).

    Trainable per matrix (PEFT's count): ``A`` and ``B`` each ``r(in+out)``
    (lora), ``out`` (vector) or 1 (constant); ``C`` ``r(in+1)`` (lora) or
    ``in`` (vector); ``D`` and ``E`` each ``out`` (vector) or 1 (constant).
    Nothing is frozen. The identity at init (``init_weights=True``). ``C``,
    ``D`` and ``E`` act on the kernel's sibling bias leaf (a ``BiasHook``
    that reads the base kernel), which must then exist: on a layer without a
    bias pass ``config_C="none", config_D_E="none"`` (PEFT leaves those
    paths empty there). Factored form: see the module docstring (lora ``A``
    forms one ``(in, out)`` product).

    Args:
      rank: ``r`` of the lora paths (PEFT's default 8; unused otherwise).
      config_A_B: ``"lora"``, ``"vector"``, ``"constant"`` or ``"none"``
        for ``A`` and ``B``.
      config_C: ``"lora"``, ``"vector"`` or ``"none"`` for ``C``.
      config_D_E: ``"vector"``, ``"constant"`` or ``"none"`` for ``D``
        and ``E``.
      init_weights: True (PEFT's default): zero paths, the identity; False:
        PEFT's random init (module docstring).
      bias_name: the sibling leaf ``C``/``D``/``E`` reparametrise.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the parameters.

    Returns:
      An ``Adapter`` with trainable ``GLoRAParams`` (unused paths None) and
      no frozen part.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; a config value outside its choices; at
        ``adapters.init``, a bias path configured on a kernel without a
        sibling bias leaf.
      TypeError: ``init_weights`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = glora(2, config_C="none", config_D_E="none")
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a_in.shape, t.a_out.shape, t.c, f
      ((6, 2), (2, 5), None, None)
      >>> bool((ad.apply(w, t, f) == w).all())
      True
      >>> t = t._replace(a=None, a_in=None, a_out=None, b=None, b_in=None, b_out=None)
      >>> bool((ad.apply(w, t, f) == w).all())  # every path off: W' = W0
      True

    References:
      Chavan et al., 2023, https://arxiv.org/abs/2306.07967
    """
    rank = _lora.check_rank(rank, "glora")
    for arg, value, choices in (("config_A_B", config_A_B, _A_B),
                                ("config_C", config_C, _C),
                                ("config_D_E", config_D_E, _D_E)):
        if value not in choices:
            raise ValueError(f"glora: {arg} must be one of {', '.join(choices)}; "
                             f"got {value!r}")
    if not isinstance(init_weights, bool):
        raise TypeError(f"glora: init_weights must be a bool, got {init_weights!r}")
    param_dtype = jnp.dtype(param_dtype)

    def uniform(key, shape, bound):
        return jax.random.uniform(key, shape, param_dtype, -bound, bound)

    def zeros_or(key, shape, bound):
        if init_weights:
            return jnp.zeros(shape, param_dtype)
        return uniform(key, shape, bound)

    def scalar(key):
        if init_weights:
            return jnp.zeros((1,), param_dtype)
        return 0.02 * jax.random.normal(key, (1,), param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("glora takes no stats")
        n_in, n_out = w.shape
        ks = iter(jax.random.split(key, 10))
        p: dict[str, jax.Array] = {}
        for name in ("a", "b"):
            k1, k2 = next(ks), next(ks)
            if config_A_B == "lora":
                p[name + "_in"] = uniform(k1, (n_in, rank), 1.0 / math.sqrt(n_in))
                p[name + "_out"] = zeros_or(k2, (rank, n_out), 1.0 / math.sqrt(rank))
            elif config_A_B == "vector":
                p[name] = zeros_or(k1, (n_out,), 1.0)  # PEFT's (out, 1): fan-in 1
            elif config_A_B == "constant":
                p[name] = scalar(k1)
        k1, k2 = next(ks), next(ks)
        if config_C == "lora":
            p["c_in"] = zeros_or(k1, (n_in, rank), 1.0 / math.sqrt(rank))
            p["c_out"] = uniform(k2, (rank,), 1.0)  # PEFT's Xu (r, 1): fan-in 1
        elif config_C == "vector":
            p["c"] = zeros_or(k1, (n_in,), 1.0)
        for name in ("d", "e"):
            k1 = next(ks)
            if config_D_E == "vector":
                p[name] = zeros_or(k1, (n_out,), 1.0 / math.sqrt(n_out))
            elif config_D_E == "constant":
                p[name] = scalar(k1)
        return GLoRAParams(**p), None

    def apply_matrix(w, t, f):
        ct = _dtype(w, *t)
        wc = w.astype(ct)
        a, b = _dense(t, "a", ct), _dense(t, "b", ct)
        out = wc if a is None else wc + wc * a
        return out if b is None else out + b

    def unapply_matrix(w, t, f, aux):
        ct = _dtype(w, *t)
        wc = w.astype(ct)
        a, b = _dense(t, "a", ct), _dense(t, "b", ct)
        wc = wc if b is None else wc - b
        return wc if a is None else wc / (1.0 + a)

    def bias_apply(bias, t, f, w):
        ct = _dtype(bias, w, *t)
        b0 = bias.astype(ct)
        out = b0
        if t.d is not None:
            out = out + b0 * t.d.astype(ct) + t.e.astype(ct)
        c = _c_vector(t, ct)
        return out if c is None else out + c @ w.astype(ct)

    def bias_unapply(bias, t, f, w):
        ct = _dtype(bias, w, *t)
        out = bias.astype(ct)
        c = _c_vector(t, ct)
        if c is not None:
            out = out - c @ w.astype(ct)
        if t.d is not None:
            out = (out - t.e.astype(ct)) / (1.0 + t.d.astype(ct))
        return out

    def factored_matrix(w, t, f):
        n_out = w.shape[1]

        def b_term(x, ct):
            xc = x.astype(ct)
            if t.b_in is not None:
                return (xc @ t.b_in.astype(ct)) @ t.b_out.astype(ct)
            if t.b is not None:  # x Bᵀ with Bᵀ = 1 ⊗ b: sum(x) · b
                return jnp.sum(xc, axis=-1, keepdims=True) * _rows(t.b, xc.ndim, ct)
            return None

        if t.a_in is not None:  # lora A: w ⊙ Aᵀ has no cheaper product with x
            def delta(x):
                ct = _dtype(x, w, *t)
                y = x.astype(ct) @ (w.astype(ct) * _dense(t, "a", ct))
                bt = b_term(x, ct)
                return y if bt is None else y + bt

            return _protocol.FactoredTerms(delta=delta)

        out_scale = None
        if t.a is not None:
            out_scale = jnp.broadcast_to(1.0 + t.a.astype(_dtype(w, *t)), (n_out,))
        if t.b is None and t.b_in is None:
            return _protocol.FactoredTerms(out_scale=out_scale)

        def delta_b(x):
            ct = _dtype(x, w, *t)
            bt = b_term(x, ct)
            return bt if t.a is None else bt / (1.0 + _rows(t.a, bt.ndim, ct))

        return _protocol.FactoredTerms(out_scale=out_scale, delta=delta_b)

    bias = None
    if config_C != "none" or config_D_E != "none":
        bias = _protocol.BiasHook(name=bias_name, apply=bias_apply,
                                  unapply=bias_unapply, required=True, kernel=True)
    return _lift.lift_matrix(
        name=(f"glora(rank={rank}, config_A_B={config_A_B!r}, config_C={config_C!r}, "
              f"config_D_E={config_D_E!r})"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        bias=bias,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("config_A_B", config_A_B),
                         ("config_C", config_C), ("config_D_E", config_D_E),
                         ("init_weights", init_weights), ("bias_name", bias_name)),
    )
