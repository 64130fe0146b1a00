# SPDX-License-Identifier: Apache-2.0
"""DeFT: remove a learned rank-``r`` subspace of the weight's outputs and inject a new one.

DEFT: Decompositional Efficient Fine-Tuning for Text-to-Image Models.
NeurIPS 2025,
https://proceedings.neurips.cc/paper_files/paper/2025/hash/93a34a7138bdad95e874018d5f491cc6-Abstract-Conference.html
Its removal-only special case is PaRa (Personalizing Text-to-Image Diffusion
via Parameter Rank Reduction, Chen, Pan, Cai & Phung, ICLR 2025,
https://arxiv.org/abs/2406.05641). Equations are cited by their form below,
as PEFT states them.

For a frozen ``W (out, in)`` (torch layout), a trainable direction ``P (out,
r)`` and injection ``R (r, in)``: ``W' = (I − P_proj) W + s·Q_P R``, with the
projector ``P_proj = Q_P rightᵀ`` from ``P``:

* ``"relu"`` (PEFT's default): ``Q_P = P``, ``right = relu(P)``
  (non-orthogonal);
* ``"qr"``: ``Q_P`` the reduced QR factor of ``P``, ``right = Q_P`` (an
  orthogonal projector; LAPACK's Householder signs, as torch's).

``s = alpha / r`` (1 without ``alpha``). PaRa (``para=True``) keeps only the
removal, ``W' = (I − P_proj) W``, and trains ``P`` alone (not the identity at
init). Hugging Face PEFT's ``tuners/deft`` (followed here, also for its
files) caps ``r`` at ``out``, draws ``P ~ N(0, 0.02²)`` and, with
``init_weights`` (its default), sets ``R = rightᵀ W / s`` so that ``W' = W``
at init; ``init_weights=False`` draws ``R ~ N(0, (0.02·init_scale)²)``.

On a Flax kernel ``W0 (in, out)`` (= ``Wᵀ``): ``W' = W0 + (s·Rᵀ − W0 right)
Q_Pᵀ``; the trainable arrays are stored ``p = P (out, r)`` and ``inject = Rᵀ
(in, r)``. ``(I − P_proj)`` is singular for ``"qr"``, so ``unfold`` needs the
aux ``fold`` keeps (``W0 right``, PEFT's cached merge factor).

Factored form: ``delta(x) = (x (s·Rᵀ − M)) Q_Pᵀ`` with ``M = W0 right (in,
r)`` formed once per step (``2·in·out·r`` FLOPs, independent of the tokens),
then ``2r(in + out)`` FLOPs per row: a rank-``r`` LoRA's cost at LoRA's
trainable count ``r(in + out)``. No ``(in, out)`` temporary.

Exports: ``DeFTParams``, ``deft``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol

_METHODS = ("relu", "qr")


class DeFTParams(NamedTuple):
    """Trainable DeFT parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      p: ``(out, r)`` = PEFT ``deft_P``, the projection direction.
      inject: ``(in, r)`` = PEFT ``deft_R`` transposed, the injection; None
        for PaRa.
    """

    p: jax.Array
    inject: jax.Array | None = None


def _project(p: jax.Array, method: str) -> tuple[jax.Array, jax.Array]:
    """``(Q_P, right)`` in float32 or wider (PEFT's ``_project``)."""
    p = p.astype(_lowrank.compute_dtype(jnp.float32, p.dtype))
    if method == "relu":
        return p, jax.nn.relu(p)
    q, _ = jnp.linalg.qr(p, mode="reduced")
    return q, q


def deft(
    rank: int = 8,
    *,
    decomposition: str = "relu",
    alpha: float | None = None,
    para: bool = False,
    init_weights: bool = True,
    init_scale: float = 1.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """DeFT: ``W' = W0 + (s·Rᵀ − W0 right) Q_Pᵀ`` (Flax layout of ``(I − P_proj) W + s·Q_P R``).

    Trainable: ``p (out, r)`` and ``inject (in, r)`` (PaRa: ``p`` only), PEFT's
    ``r(out + in)`` (``r·out``); ``r`` is capped at ``out`` as PEFT does. The
    identity at init with ``init_weights`` (not for PaRa). The factored path
    adds the rank-``r`` term ``(x (s·Rᵀ − W0 right)) Q_Pᵀ``; ``unfold`` needs
    the aux of ``fold``.

    Args:
      rank: ``r`` (PEFT's default 8).
      decomposition: ``"relu"`` (PEFT's default, ``P relu(P)ᵀ``) or ``"qr"``
        (the orthogonal projector of ``P``'s QR factor).
      alpha: the injection's scale ``s = alpha / r``; None: ``s = 1``.
      para: PaRa, the removal alone (no injection).
      init_weights: True (PEFT's default): ``R = rightᵀ W / s`` (the
        identity); False: ``R ~ N(0, (0.02·init_scale)²)``.
      init_scale: see ``init_weights``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the trainable arrays.

    Returns:
      An ``Adapter`` with trainable ``DeFTParams(p, inject)`` and no frozen part.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; an unknown ``decomposition``; ``alpha <= 0``.
      TypeError: ``para`` or ``init_weights`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = deft(2, decomposition="qr")
      >>> w = jnp.arange(20.0).reshape(5, 4) / 20
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.p.shape, t.inject.shape
      ((4, 2), (5, 2))
      >>> bool(jnp.allclose(ad.apply(w, t, f), w, atol=1e-6))
      True

    References:
      DEFT, NeurIPS 2025; PaRa, ICLR 2025, https://arxiv.org/abs/2406.05641
    """
    rank = _lora.check_rank(rank, "deft")
    for flag, value in (("para", para), ("init_weights", init_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"deft: {flag} must be a bool, got {value!r}")
    if decomposition not in _METHODS:
        raise ValueError(f"deft: decomposition must be one of {_METHODS}, got "
                         f"{decomposition!r}")
    if alpha is not None and not (isinstance(alpha, numbers.Real)
                                  and not isinstance(alpha, bool) and alpha > 0):
        raise ValueError(f"deft: alpha must be a positive number or None, got {alpha!r}")
    param_dtype = jnp.dtype(param_dtype)
    init_scale = float(init_scale)

    def scale(n_out):
        return 1.0 if alpha is None else float(alpha) / min(rank, n_out)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("deft takes no stats")
        n_in, n_out = w.shape
        r = min(rank, n_out)
        kp, kr = jax.random.split(key)
        p = 0.02 * jax.random.normal(kp, (n_out, r), jnp.float32)
        if para:
            return DeFTParams(p.astype(param_dtype)), None
        if init_weights:
            _, right = _project(p.astype(param_dtype), decomposition)
            ct = _lowrank.compute_dtype(w.dtype, right.dtype)
            inject = (w.astype(ct) @ right.astype(ct)) / scale(n_out)
        else:
            inject = 0.02 * init_scale * jax.random.normal(kr, (n_in, r), jnp.float32)
        return DeFTParams(p.astype(param_dtype), inject.astype(param_dtype)), None

    def factor(w, t):
        """``(Q_P, W0 right)`` in the compute dtype."""
        q, right = _project(t.p, decomposition)
        ct = _lowrank.compute_dtype(w.dtype, q.dtype)
        return q.astype(ct), w.astype(ct) @ right.astype(ct)

    def update(q, m, t, n_out):
        if para:
            return -m @ q.T
        return (scale(n_out) * t.inject.astype(q.dtype) - m) @ q.T

    def apply_matrix(w, t, f):
        q, m = factor(w, t)
        return w.astype(q.dtype) + update(q, m, t, w.shape[1])

    def aux_matrix(w, t, f):
        return factor(w, t)[1]

    def unapply_matrix(w, t, f, aux):
        if aux is None:
            raise TypeError("deft: (I - P_proj) is not invertible; unfold needs the aux "
                            "(W0 @ right) that fold(..., return_aux=True) returned")
        q, _ = _project(t.p, decomposition)
        ct = _lowrank.compute_dtype(w.dtype, q.dtype, aux.dtype)
        return w.astype(ct) - update(q.astype(ct), aux.astype(ct), t, w.shape[1])

    def factored_matrix(w, t, f):
        q, m = factor(w, t)
        core = -m if para else scale(w.shape[1]) * t.inject.astype(q.dtype) - m  # (in, r)

        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, q.dtype)
            return (x.astype(ct) @ core.astype(ct)) @ q.T.astype(ct)

        return _protocol.FactoredTerms(delta=delta)

    extras = "".join(f", {k}={v!r}" for k, v, default in (
        ("decomposition", decomposition, "relu"), ("alpha", alpha, None),
        ("para", para, False), ("init_weights", init_weights, True),
        ("init_scale", init_scale, 1.0)) if v != default)
    return _lift.lift_matrix(
        name=f"deft(rank={rank}{extras})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        aux_matrix=aux_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("decomposition", decomposition),
                         ("alpha", alpha), ("para", para), ("init_weights", init_weights),
                         ("init_scale", init_scale)),
    )
