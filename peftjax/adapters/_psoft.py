# SPDX-License-Identifier: Apache-2.0
"""PSOFT: an orthogonal rotation inside each weight's principal subspace.

Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation (PSOFT).
ICLR 2026 submission, https://openreview.net/forum?id=FSHrinMArK

The paper splits a frozen ``W (out, in)`` (torch layout) by its truncated SVD
``W = U_r S_r V_rᵀ + W_res`` and rotates only the principal part: ``W' =
W_res + B R A`` with ``A = V_rᵀ (r, in)`` (orthonormal rows) and ``B = U_r S_r
(out, r)`` frozen and a small ``r × r`` rotation ``R`` trainable, so ``ΔW = B
(R − I) A`` and the columns of the principal part keep their pairwise angles
while ``R`` stays orthogonal. ``R`` is the Cayley transform ``R = (I + Q)(I −
Q)⁻¹`` of a skew-symmetric ``Q`` (its ``r(r−1)/2`` upper entries trained,
zero at init: ``ΔW = 0``), optionally approximated by the truncated Neumann
series ``I + 2Q + 2Q² + ... + 2Q^{k−2} + Q^{k−1}`` (PEFT's loop: ``k = 3``
gives ``k = 4``'s series), and optionally relaxed by
two trainable scaling vectors, ``R ← diag(b) R diag(a)``.

Hugging Face PEFT's ``tuners/psoft`` (followed here, also for its files):
``scaling = psoft_alpha / r``; ``B = U_r diag(S_r / scaling)`` so that
``scaling · B (R − I) A`` is the paper's update whatever ``alpha``; the
``pissa_init`` variant splits ``S_r / scaling`` symmetrically,
``A = diag(√s) V_rᵀ``, ``B = U_r diag(√s)``; ``psoft_orth=False`` trains a
free ``R`` (identity at init); ``cayley_neumann_eps`` rescales ``Q`` onto
``‖Q‖_F <= eps`` before the series. ``init_weights=False`` draws ``Q ~
N(0, 0.1²)`` (free ``R``: ``I + N(0, 0.1²)``).

PEFT saves only ``R``'s parameters (``psoft_R.weight``, ``vector_b``,
``vector_a``); ``A`` and ``B`` are recomputed from the base weight by a float32
SVD whenever the adapter is built, and so are they here (``psoft_basis``, the
frozen part). Singular vectors are defined up to sign, and ``B (R − I) A``
depends on the signs (a flipped pair conjugates ``R`` by ``diag(±1)``): the
outputs of a saved ``R`` equal PEFT's only where both sides' SVDs pick the same
signs. PEFT itself takes whatever its LAPACK returns (MKL on CPU, cuSOLVER on
GPU); peftjax takes LAPACK's ``gesdd`` through ``jnp.linalg.svd`` of the
``(out, in)`` matrix (``peftjax.io`` runs it on the CPU), which agrees with
torch's CPU SVD on many but not all shapes.

On a Flax kernel ``W0 (in, out)`` (= ``Wᵀ``) the frozen part is ``a = Aᵀ (in,
r)``, ``b = Bᵀ (r, out)`` and ``W' = W0 + scaling · a (Rᵀ − I) b``.

Factored form: ``delta(x) = scaling · ((x a) Rᵀ − x a) b``, a rank-``r`` term
(``2r(in + out) + 2r²`` FLOPs per row, never an ``(in, out)`` temporary),
plus forming ``R`` once per step (``O(r³)``, independent of the tokens). At
the same trainable count (``r(r−1)/2`` for strict PSOFT) LoRA's rank would be
about ``r²/(2(in + out))``, far below 1 for any useful ``r``: PSOFT's term
costs like a rank-``r`` LoRA's with ``2(in + out)/r`` times fewer trainable
parameters (e.g. ``in = out = 4096``, ``r = 128``: 8,128 trainable, LoRA's
count at rank 1, at about 128 times rank-1 LoRA's FLOPs).

Exports: ``PSOFTParams``, ``PSOFTBasis``, ``psoft``, ``psoft_basis``,
``psoft_rotation``.
"""

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _oft, _protocol

_INITS = ("psoft_init", "pissa_init")


class PSOFTParams(NamedTuple):
    """Trainable PSOFT parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      weight: strict (``orth=True``): ``(r(r−1)/2,)``, the upper-triangular
        entries of the skew-symmetric ``Q`` row by row
        (``numpy.triu_indices(r, 1)``); free (``orth=False``): the ``(r, r)``
        matrix ``R`` itself. PEFT's ``psoft_R.weight``.
      vector_b: ``(r,)`` output-side scale of ``R`` (``mag_b``), or None.
      vector_a: ``(r,)`` input-side scale of ``R`` (``mag_a``), or None.
    """

    weight: jax.Array
    vector_b: jax.Array | None = None
    vector_a: jax.Array | None = None


class PSOFTBasis(NamedTuple):
    """Frozen principal-subspace factors of one matrix (from its SVD).

    Attributes:
      a: ``(in, r)`` = PEFT ``A.T`` (right singular vectors, scaled by
        ``sqrt(S/scaling)`` for ``pissa_init``), float32.
      b: ``(r, out)`` = PEFT ``B.T``, float32.
    """

    a: jax.Array
    b: jax.Array


def psoft_basis(w: jax.Array, rank: int, *, alpha: float = 32.0,
                init: str = "psoft_init") -> PSOFTBasis:
    """The frozen ``(a, b)`` of one ``(in, out)`` matrix, PEFT's ``psoft_init``/``pissa_init``.

    A float32 SVD of the torch-layout ``wᵀ (out, in)``, truncated to ``rank``
    (``jnp.linalg.svd``'s signs; see the module docstring).

    Args:
      w: ``(in, out)`` base matrix.
      rank: ``r``.
      alpha: ``psoft_alpha`` (``scaling = alpha / r``).
      init: ``"psoft_init"`` (``a = V_r``, ``b = diag(S_r/scaling) U_rᵀ``) or
        ``"pissa_init"`` (``√(S_r/scaling)`` on both sides).

    Returns:
      ``PSOFTBasis(a (in, r), b (r, out))`` in float32.

    Example:
      >>> import jax.numpy as jnp
      >>> f = psoft_basis(jnp.diag(jnp.array([3.0, 1.0])), 1, alpha=1.0)
      >>> float(abs(f.a[0, 0])), float(abs(f.b[0, 0]))
      (1.0, 3.0)
    """
    if init not in _INITS:
        raise ValueError(f"psoft: init must be one of {_INITS}, got {init!r}")
    scaling = alpha / rank
    m = jnp.asarray(w).astype(jnp.float32).T  # torch's (out, in)
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank] / scaling, vh[:rank]
    if init == "psoft_init":
        return PSOFTBasis(vh.T, s[:, None] * u.T)
    root = jnp.sqrt(s)
    return PSOFTBasis((root[:, None] * vh).T, root[:, None] * u.T)


def _skew(q: jax.Array, r: int) -> jax.Array:
    rows, cols = np.triu_indices(r, 1)
    m = jnp.zeros((r, r), q.dtype).at[rows, cols].set(q)
    return m - m.T


def psoft_rotation(t: PSOFTParams, *, orth: bool = True, use_cayley_neumann: bool = False,
                   num_cayley_neumann_terms: int = 5,
                   cayley_neumann_eps: float | None = None) -> jax.Array:
    """PEFT's ``(r, r)`` matrix ``R`` (``OrthLayer.get_matrix``), scales included.

    Strict: ``R = (I + Q)(I − Q)⁻¹`` or the Neumann series of it; free: ``R =
    weight``; then ``diag(vector_b) R diag(vector_a)``. Unbatched parameters.

    Args:
      t: one matrix's ``PSOFTParams``.
      orth: ``t.weight`` holds ``Q``'s upper entries (else ``R`` itself).
      use_cayley_neumann: the truncated series instead of the exact solve.
      num_cayley_neumann_terms: the series' terms ``k``.
      cayley_neumann_eps: rescale ``Q`` onto ``‖Q‖_F <= eps`` first, or None.

    Returns:
      ``(r, r)`` in float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> rot = psoft_rotation(PSOFTParams(jnp.array([0.3, -0.2, 0.5])))
      >>> bool(jnp.allclose(rot.T @ rot, jnp.eye(3), atol=1e-6))
      True
    """
    ct = _lowrank.compute_dtype(jnp.float32, t.weight.dtype)
    wt = t.weight.astype(ct)
    if not orth:
        rot = wt
    else:
        r = (1 + math.isqrt(1 + 8 * wt.shape[-1])) // 2
        q = _skew(wt, r)
        if use_cayley_neumann:
            if cayley_neumann_eps is not None:
                norm = jnp.linalg.norm(q)
                big = jnp.isfinite(norm) & (norm > cayley_neumann_eps)
                q = jnp.where(big, q * (cayley_neumann_eps / (norm + 1e-12)), q)
            rot = _oft.cayley(q, int(num_cayley_neumann_terms))  # OFT's series
        else:
            # X (I − Q) = I + Q  <=>  (I − Q)ᵀ Xᵀ = (I + Q)ᵀ, i.e. (I + Q) Xᵀ = I − Q
            rot = _oft.cayley(q).T
    if t.vector_b is not None:
        rot = t.vector_b.astype(ct)[:, None] * rot
    if t.vector_a is not None:
        rot = rot * t.vector_a.astype(ct)[None, :]
    return rot


def psoft(
    rank: int = 32,
    *,
    alpha: float = 32.0,
    init: str = "psoft_init",
    orth: bool = True,
    mag_b: bool = True,
    mag_a: bool = True,
    use_cayley_neumann: bool = False,
    num_cayley_neumann_terms: int = 5,
    cayley_neumann_eps: float | None = None,
    init_weights: bool = True,
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """PSOFT: ``W' = W0 + scaling · a (Rᵀ − I) b``, ``R`` orthogonal ``r × r`` (Cayley).

    ``a (in, r)`` and ``b (r, out)`` are frozen, from the base's truncated SVD
    at init (``psoft_basis``); trainable: ``R``'s generator ``r(r−1)/2`` (free
    ``R``: ``r²``) plus ``r`` per scaling vector, PEFT's count. Identity at
    init (``init_weights``). The factored path adds the rank-``r`` term
    ``scaling · ((x a) Rᵀ − x a) b``; ``unapply`` subtracts the same update.

    Args:
      rank: ``r`` (PEFT's default 32); at most ``min(in, out)``.
      alpha: ``psoft_alpha`` (``scaling = alpha / r``; it cancels in the
        update, PEFT's ``B`` is divided by it).
      init: ``"psoft_init"`` (PEFT's default: ``A`` the orthonormal singular
        vectors, strict orthogonality of the principal part) or
        ``"pissa_init"`` (``√S`` on both factors).
      orth: PEFT's ``psoft_orth``: Cayley-parametrised orthogonal ``R``
        (True) or a free ``r × r`` matrix.
      mag_b: PEFT's ``psoft_mag_b``: a trainable output-side scale of ``R``.
      mag_a: PEFT's ``psoft_mag_a``: a trainable input-side scale of ``R``.
      use_cayley_neumann: the truncated Neumann series of the Cayley
        transform (approximately orthogonal) instead of the exact solve.
      num_cayley_neumann_terms: the series' terms (PEFT's default 5).
      cayley_neumann_eps: with the series, rescale ``Q`` onto ``‖Q‖_F <=
        eps`` (``0 < eps < 1``), or None.
      init_weights: True (PEFT's default): ``R = I``; False: ``Q ~ N(0,
        0.1²)`` (free ``R``: ``I + N(0, 0.1²)``).
      dropout: dropout on the adapter's input (factored path only), PEFT's
        ``psoft_dropout``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the trainable parameters (the frozen
        factors are float32).

    Returns:
      An ``Adapter`` with trainable ``PSOFTParams`` and frozen ``PSOFTBasis``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; ``rank > min(in, out)`` at init; an unknown
        ``init``; ``num_cayley_neumann_terms < 1``; ``cayley_neumann_eps``
        outside ``(0, 1)``; ``alpha <= 0``; ``dropout`` outside ``[0, 1)``.
      TypeError: a flag is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = psoft(2)
      >>> w = jnp.arange(20.0).reshape(5, 4) / 20
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.weight.shape, t.vector_a.shape, f.a.shape, f.b.shape
      ((1,), (2,), (5, 2), (2, 4))
      >>> bool(jnp.allclose(ad.apply(w, t, f), w, atol=1e-6))
      True

    References:
      PSOFT, https://openreview.net/forum?id=FSHrinMArK
    """
    rank = _lora.check_rank(rank, "psoft")
    for flag, value in (("orth", orth), ("mag_b", mag_b), ("mag_a", mag_a),
                        ("use_cayley_neumann", use_cayley_neumann),
                        ("init_weights", init_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"psoft: {flag} must be a bool, got {value!r}")
    if init not in _INITS:
        raise ValueError(f"psoft: init must be one of {_INITS}, got {init!r}")
    if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and alpha > 0):
        raise ValueError(f"psoft: alpha must be a positive number, got {alpha!r}")
    if isinstance(num_cayley_neumann_terms, bool) or not isinstance(
            num_cayley_neumann_terms, numbers.Integral) or num_cayley_neumann_terms < 1:
        raise ValueError("psoft: num_cayley_neumann_terms must be an int >= 1, got "
                         f"{num_cayley_neumann_terms!r}")
    if cayley_neumann_eps is not None and not (0.0 < float(cayley_neumann_eps) < 1.0):
        raise ValueError(f"psoft: cayley_neumann_eps must be in (0, 1) or None, got "
                         f"{cayley_neumann_eps!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"psoft: dropout must be in [0, 1), got {dropout!r}")
    param_dtype = jnp.dtype(param_dtype)
    alpha = float(alpha)
    scaling = alpha / rank
    eps = None if cayley_neumann_eps is None else float(cayley_neumann_eps)
    terms = int(num_cayley_neumann_terms)

    def rotation(t):
        return psoft_rotation(t, orth=orth, use_cayley_neumann=use_cayley_neumann,
                              num_cayley_neumann_terms=terms, cayley_neumann_eps=eps)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("psoft takes no stats")
        _lora.check_rank_fits(rank, w, "psoft")
        shape = (rank * (rank - 1) // 2,) if orth else (rank, rank)
        if init_weights:
            weight = jnp.zeros(shape, param_dtype) if orth else jnp.eye(rank, dtype=param_dtype)
        else:
            noise = 0.1 * jax.random.normal(key, shape, jnp.float32)
            weight = (noise if orth else jnp.eye(rank) + noise).astype(param_dtype)
        ones = jnp.ones((rank,), param_dtype)
        t = PSOFTParams(weight, ones if mag_b else None, ones if mag_a else None)
        return t, psoft_basis(w, rank, alpha=alpha, init=init)

    def update(w, t, f):
        rot = rotation(t)
        ct = _lowrank.compute_dtype(w.dtype, rot.dtype)
        moved = rot.T.astype(ct) - jnp.eye(rank, dtype=ct)
        return scaling * (f.a.astype(ct) @ moved) @ f.b.astype(ct)

    def apply_matrix(w, t, f):
        d = update(w, t, f)
        return w.astype(d.dtype) + d

    def unapply_matrix(w, t, f, aux):
        d = update(w, t, f)
        return w.astype(d.dtype) - d

    def factored_matrix(w, t, f):
        rot = rotation(t)

        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, rot.dtype)
            xa = x.astype(ct) @ f.a.astype(ct)
            return scaling * ((xa @ rot.T.astype(ct) - xa) @ f.b.astype(ct))

        return _protocol.FactoredTerms(delta=delta)

    extras = "".join(f", {k}={v!r}" for k, v, default in (
        ("alpha", alpha, 32.0), ("init", init, "psoft_init"), ("orth", orth, True),
        ("mag_b", mag_b, True), ("mag_a", mag_a, True),
        ("use_cayley_neumann", use_cayley_neumann, False),
        ("num_cayley_neumann_terms", terms, 5), ("cayley_neumann_eps", eps, None),
        ("init_weights", init_weights, True), ("dropout", float(dropout), 0.0))
        if v != default)
    return _lift.lift_matrix(
        name=f"psoft(rank={rank}{extras})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        dropout=float(dropout),
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("alpha", alpha), ("init", init),
                         ("orth", orth), ("mag_b", mag_b), ("mag_a", mag_a),
                         ("use_cayley_neumann", use_cayley_neumann),
                         ("num_cayley_neumann_terms", terms),
                         ("cayley_neumann_eps", eps), ("init_weights", init_weights),
                         ("dropout", float(dropout))),
    )
