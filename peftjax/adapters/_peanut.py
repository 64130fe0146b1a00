# SPDX-License-Identifier: Apache-2.0
"""PEANUT: a weight-aware nonlinear update computed from the frozen weight itself.

PEANuT, https://arxiv.org/abs/2410.01870 (the paper PEFT cites), as
Hugging Face PEFT 0.21.2 ``tuners/peanut`` implements it.

The update is a small residual network applied to the rows of the frozen
weight. In torch layout ``W0 (out, in)``, PEFT computes, for the transposed
weight ``W0ᵀ (in, out)`` and with ``σ`` the configured activation:

* ``H_0 = σ(W0ᵀ Aᵀ)`` with ``A (r, out)`` (``peanut_A``);
* encoders, ``i = 1..depth``: keep ``R_i = H_{i-1}``, then ``H_i = σ(H_{i-1}
  E_iᵀ)`` with ``E_i (r, r)`` (``peanut_encoders.<i-1>``);
* decoders, ``i = 1..depth``: ``H ← σ(H D_iᵀ) + R_{depth+1-i}`` with ``D_i
  (r, r)`` (``peanut_decoders.<i-1>``), the residuals taken in reverse;
* ``ΔWᵀ = s · H Bᵀ`` with ``B (out, r)`` (``peanut_B``) and ``s`` PEFT's
  ``scaling``.

On a Flax kernel ``W0 (in, out)`` (which is PEFT's ``W0ᵀ``) with ``a = Aᵀ
(out, r)``, ``e_i = E_iᵀ``, ``d_i = D_iᵀ`` and ``b = Bᵀ (r, out)`` this reads
``H_0 = σ(W0 @ a)``, ``ΔW = s · H @ b`` (``(in, out)``, no transpose).

Trainable parameters: ``2·r·out + 2·depth·r²`` per matrix (PEFT's count).
Identity at init (``b = 0``, PEFT's ``init_weights=True``).

Factored form (the default): ``x @ ΔW = s · (x @ H) @ b``. ``H (in, r)`` costs
one ``(in, out, r)`` product with the frozen base per call (what a LoRA
materialisation ``a@b`` costs) plus ``depth`` ``(in, r, r)`` products,
independent of the batch; nothing of size ``(in, out)`` is formed besides the
base.

The update depends on ``W0``, so ``fold(..., return_aux=True)`` returns the
base as ``aux`` and ``unfold`` restores it (PEFT's unmerge restores its saved
copy of the base likewise).

Exports: ``PEANUTParams``, ``peanut``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


class PEANUTParams(NamedTuple):
    """Trainable PEANUT arrays (per matrix; stacked leaves add batch axes in front).

    Attributes:
      a: ``(out, r)`` = PEFT ``peanut_A.weight.T``.
      encoders: ``(depth, r, r)``; ``encoders[i]`` = PEFT
        ``peanut_encoders.<i>.weight.T``.
      decoders: ``(depth, r, r)``; ``decoders[i]`` = PEFT
        ``peanut_decoders.<i>.weight.T``.
      b: ``(r, out)`` = PEFT ``peanut_B.weight.T``, 0 at init.
    """

    a: jax.Array
    encoders: jax.Array
    decoders: jax.Array
    b: jax.Array


def _hidden(w: jax.Array, t: PEANUTParams, act: Callable[[jax.Array], jax.Array]
                  ) -> jax.Array:
    """The ``(in, r)`` hidden ``H`` of PEANUT's network on the kernel ``w (in, out)``."""
    h = act(w @ t.a)
    residuals = []
    for i in range(t.encoders.shape[0]):
        residuals.append(h)
        h = act(h @ t.encoders[i])
    for i in range(t.decoders.shape[0]):
        h = act(h @ t.decoders[i]) + residuals[-1 - i]
    return h


def peanut(
    rank: int,
    *,
    depth: int = 0,
    act_fn: str = "relu",
    scaling: float = 1.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """PEANUT: ``W' = W0 + s · H(W0) @ b`` with a residual network ``H`` on ``W0``'s rows.

    ``H(W0)`` is ``σ(W0 @ a)`` passed through ``depth`` encoder layers and
    ``depth`` decoder layers with reversed residual connections (module
    docstring). Trainable: ``2·r·out + 2·depth·r²`` per matrix.

    Args:
      rank: ``r`` (static; PEFT's default 32).
      depth: encoder/decoder pairs (PEFT's ``depth``, default 0: ``H =
        σ(W0 @ a)``).
      act_fn: ``σ``, a transformers ``ACT2FN`` name among ``relu``,
        ``gelu``, ``gelu_new``, ``gelu_pytorch_tanh``, ``silu``, ``swish``,
        ``tanh``, ``sigmoid``, ``linear`` (PEFT's ``act_fn``, default
        ``"relu"``).
      scaling: ``s`` (PEFT's ``scaling``, default 1.0).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the trainable arrays.

    Returns:
      An ``Adapter`` with trainable ``PEANUTParams`` and frozen part None,
      with the factored form ``x @ W0 + s · (x @ H) @ b``. Init as PEFT's
      ``init_weights=True``: ``a``, encoders and decoders kaiming-uniform
      (``U(±1/sqrt(fan_in))``, ``fan_in`` = ``out`` for ``a`` and ``r``
      otherwise), ``b = 0``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``depth < 0`` or an unknown ``act_fn``.
      TypeError: ``depth`` not an int or ``scaling`` not a number.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = peanut(2, depth=1)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.encoders.shape, t.b.shape
      ((5, 2), (1, 2, 2), (2, 5))
      >>> bool((ad.apply(w, t, f) == w).all())
      True
    """
    rank = _lora.check_rank(rank, "peanut")
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"peanut: depth must be an int, got {depth!r}")
    if depth < 0:
        raise ValueError(f"peanut: depth must be >= 0, got {depth}")
    if act_fn not in _ACTIVATIONS:
        raise ValueError(f"peanut: act_fn={act_fn!r} is not one of "
                         f"{sorted(_ACTIVATIONS)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"peanut: scaling must be a number, got {scaling!r}")
    scaling = float(scaling)
    act = _ACTIVATIONS[act_fn]
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("peanut takes no stats")
        n_out = w.shape[1]
        ka, ke, kd = jax.random.split(key, 3)
        bound = 1.0 / rank ** 0.5
        return PEANUTParams(
            a=_lora.kaiming_uniform_a(ka, n_out, rank, param_dtype),
            encoders=jax.random.uniform(ke, (depth, rank, rank), param_dtype, -bound, bound),
            decoders=jax.random.uniform(kd, (depth, rank, rank), param_dtype, -bound, bound),
            b=jnp.zeros((rank, n_out), param_dtype)), None

    def _cast(t, ct):
        return PEANUTParams(*(x.astype(ct) for x in t))

    def apply_matrix(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        wc, tc = w.astype(ct), _cast(t, ct)
        return wc + scaling * (_hidden(wc, tc, act) @ tc.b)

    def aux_matrix(w, t, f):
        return w

    def unapply_matrix(w, t, f, aux):
        if aux is None:
            raise TypeError("peanut: unfold needs the aux (the base matrix) that "
                            "fold(..., return_aux=True) returned")
        return aux

    def factored_matrix(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        tc = _cast(t, ct)
        h = _hidden(w.astype(ct), tc, act)

        def delta(x):
            ctx = _lowrank.compute_dtype(x.dtype, ct)
            return scaling * ((x.astype(ctx) @ h.astype(ctx)) @ tc.b.astype(ctx))

        return _protocol.FactoredTerms(delta=delta)

    return _lift.lift_matrix(
        name=f"peanut(rank={rank}, depth={depth}, act_fn={act_fn}, scaling={scaling:g})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        aux_matrix=aux_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("depth", depth), ("act_fn", act_fn),
                         ("scaling", scaling)),
    )
