# SPDX-License-Identifier: Apache-2.0
"""OFT: orthogonal fine-tuning by a block-diagonal Cayley rotation of the input.

Controlling Text-to-Image Diffusion by Orthogonal Finetuning. Qiu, Liu, Feng,
Xue, Feng, Liu, Zhang, Weller & Schölkopf, NeurIPS 2023.
https://arxiv.org/abs/2306.07280

The paper multiplies the pretrained weight by an orthogonal matrix ``R``
(Eq. 2, ``W' = Rᵀ W0`` in its column convention), parametrised by the Cayley
transform of a skew-symmetric ``Q`` (Eq. 4, ``R = (I + Q)(I − Q)⁻¹``) and
made cheap by a block-diagonal ``R = diag(R_1, ..., R_n)`` (Eq. 5, with the
shared-block variant ``R_i = R_1``). Its constrained variant COFT (Eq. 3)
keeps ``‖R − I‖ <= ε``, which the implementation enforces on ``Q``.

Hugging Face PEFT's ``tuners/oft`` (followed here, also for its files) rotates
the *input*: ``y = (x · R) · W0ᵀ`` in torch's ``(out, in)`` layout, with
``n = in / b`` blocks of size ``b`` and per block the ``b(b−1)/2`` upper-
triangular entries of ``Q`` trainable (PEFT's ``oft_R.weight``, shape
``(n, b(b−1)/2)``, or ``(1, ...)`` with ``block_share``), zero at init. It
forms ``R`` either exactly, ``R = (I + Q)⁻¹(I − Q)``, or (its default) by
the truncated Neumann series of ``(I + Q)(I − Q)⁻¹``,
``I + 2Q + 2Q² + ... + 2Q^{k−2} + Q^{k−1}`` (``k`` =
``num_cayley_neumann_terms``), which is only approximately orthogonal.
With ``coft``, before each use every block's ``Q`` is projected onto the
Frobenius ball of radius ``ε/sqrt(n)``.

On a Flax kernel ``W0 (in, out)``: ``W' = diag(R_1..R_n) · W0``, i.e. block
``i`` of rows becomes ``R_i · W0[i]``, and ``x · W' = (x · R) · W0``.

Blocks that do not divide ``in``: PEFT moves ``b`` (or ``r``) to the nearest
divisor of ``in`` (the lower one on a tie) and warns; ``oft`` does the same,
so its shapes, counts and files are PEFT's.

Factored form: ``in_map`` (``FactoredTerms``) rotates the input, ``x ↦ x·R``
block by block (``in·b`` multiply-adds per row), then the model's own product
with ``W0``; ``R·W0`` is never formed. At the same trainable count
(``in(b−1)/2``) LoRA's two factors cost ``in(b−1)/2`` multiply-adds per row,
so OFT's rotation costs about twice LoRA's adapter term, plus forming the
``n`` rotations once per step (``n·b³``, independent of the tokens).

Exports: ``OFTParams``, ``oft``, ``oft_block_size``, ``oft_project``.
"""

import math
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class OFTParams(NamedTuple):
    """Trainable OFT parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      q: ``(n, b(b−1)/2)`` (``(1, ...)`` with ``block_share``): per block the
        strictly upper-triangular entries of the skew-symmetric ``Q``, row by
        row (``numpy.triu_indices(b, 1)``); PEFT's ``oft_R.weight``.
    """

    q: jax.Array


def _adjust(n_in: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the nearest divisor of ``n_in`` (lower on a tie)."""
    if value >= n_in:
        return n_in
    higher = value
    while higher <= n_in and n_in % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n_in % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def oft_block_size(n_in: int, *, block_size: int = 0, r: int = 0) -> int:
    """The block size OFT (and PEFT) uses on a matrix with ``n_in`` inputs.

    Exactly one of ``block_size`` and ``r`` (the number of blocks) is
    non-zero; one that does not divide ``n_in`` (or exceeds it) moves to the
    nearest divisor, the lower one on a tie (PEFT's ``adjust_oft_parameters``).

    Args:
      n_in: the matrix's input features.
      block_size: the requested block size ``b`` (0: use ``r``).
      r: the requested number of blocks (0: use ``block_size``).

    Returns:
      The block size ``b`` (a divisor of ``n_in``).

    Example:
      >>> oft_block_size(10, block_size=4), oft_block_size(10, r=4)
      (5, 2)
    """
    if (block_size != 0) == (r != 0):
        raise ValueError(f"oft: exactly one of block_size ({block_size}) and r ({r}) "
                         "must be non-zero")
    if block_size:
        return block_size if n_in % block_size == 0 else _adjust(n_in, block_size)
    blocks = r if n_in % r == 0 else _adjust(n_in, r)
    return n_in // blocks


def _skew(q: jax.Array, b: int) -> jax.Array:
    """``(n, b(b−1)/2)`` upper-triangular entries -> ``(n, b, b)`` skew-symmetric ``Q``."""
    rows, cols = np.triu_indices(b, 1)
    m = jnp.zeros(q.shape[:-1] + (b, b), q.dtype).at[..., rows, cols].set(q)
    return m - jnp.swapaxes(m, -1, -2)


def _block(q: jax.Array) -> int:
    """The block size ``b`` with ``b(b−1)/2 = q.shape[-1]``."""
    return (1 + math.isqrt(1 + 8 * q.shape[-1])) // 2


def oft_project(q: jax.Array, eps: float) -> jax.Array:
    """COFT's projection (Eq. 3): each block's ``Q`` onto ``‖Q‖_F <= eps/sqrt(n)``.

    PEFT's ``_project_batch``: ``n`` is the number of stored blocks
    (``q.shape[0]``) and ``‖Q‖_F`` the norm of the whole skew-symmetric block
    (``sqrt(2)·‖q_i‖``); a block inside the ball is unchanged.

    Args:
      q: ``(n, b(b−1)/2)`` upper-triangular entries (``OFTParams.q``).
      eps: COFT's ``ε``.

    Returns:
      The projected entries, ``q``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> oft_project(jnp.asarray([[3.0, 0.0, 4.0]]), 2.0 ** 0.5)
      Array([[0.6, 0. , 0.8]], dtype=float32)
    """
    radius = eps / math.sqrt(q.shape[0])
    norm = jnp.sqrt(2.0 * jnp.sum(q * q, axis=-1, keepdims=True))  # ‖Q‖_F of the skew matrix
    safe = jnp.where(norm > radius, norm, jnp.ones_like(norm))
    return jnp.where(norm > radius, q * (radius / safe), q)


def rotations(q: jax.Array, *, coft: bool = False, eps: float = 6e-5,
              neumann_terms: int | None = 5) -> jax.Array:
    """The ``(n, b, b)`` block rotations from ``q`` (float32 or wider).

    ``neumann_terms=None``: the exact Cayley ``(I + Q)⁻¹(I − Q)``; an int
    ``k``: PEFT's Neumann series ``I + 2Q + 2Q² + ... + Q^{k−1}``. With
    ``coft`` the forward uses the projected ``Q`` and the gradient passes
    through the projection unchanged (PEFT projects its parameter in place,
    without gradient).
    """
    ct = _lowrank.compute_dtype(jnp.float32, q.dtype)
    q = q.astype(ct)
    if coft:
        q = q + jax.lax.stop_gradient(oft_project(q, eps) - q)
    return cayley(_skew(q, _block(q)), neumann_terms)


def cayley(s: jax.Array, neumann_terms: int | None = None) -> jax.Array:
    """Rotations ``(..., b, b)`` from skew-symmetric ``s (..., b, b)``.

    ``neumann_terms=None``: the exact Cayley ``(I + Q)⁻¹(I − Q)`` (equal to
    ``(I − Q)(I + Q)⁻¹``: the factors commute); an int ``k``: PEFT's
    Neumann series ``I + 2Q + 2Q² + ... + Q^{k−1}``. Computed in ``s``'s
    dtype.
    """
    eye = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)
    if neumann_terms is None:
        return jnp.linalg.solve(eye + s, eye - s)
    r = eye
    if neumann_terms > 1:
        r = r + 2.0 * s
    if neumann_terms > 2:
        power = s @ s
        r = r + 2.0 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ s
            r = r + 2.0 * power
        r = r + power @ s
    return r


def oft(
    block_size: int | None = None,
    *,
    r: int | None = None,
    coft: bool = False,
    eps: float = 6e-5,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """OFT: ``W' = diag(R_1, ..., R_n) · W0`` with Cayley rotations ``R_i`` (Eqs. 2, 4, 5).

    ``R_i`` is formed from a trainable skew-symmetric ``Q_i`` (its ``b(b−1)/2``
    upper entries, zero at init: the identity). Trainable parameters:
    ``in·(b−1)/2`` per matrix (``b(b−1)/2`` with ``block_share``), PEFT's
    count. The factored path rotates the input block by block and runs the
    base product (``in_map``; ``R·W0`` is never formed); ``unapply`` solves
    with each block (exact up to rounding, also for the Neumann series).

    Args:
      block_size: PEFT's ``oft_block_size`` ``b``. Give it or ``r``, not
        both (neither: 32, PEFT's default); one that does not divide a
        matrix's ``in`` moves to the nearest divisor, with a warning (PEFT's
        rule, ``oft_block_size``).
      r: PEFT's ``r``, the number of blocks (``b = in / r``).
      coft: the constrained variant (COFT, Eq. 3): each block's ``Q`` is
        projected onto ``‖Q‖_F <= eps/sqrt(n)`` before use (straight-through
        gradient; the stored ``q`` is not rewritten, so a file written by
        ``peftjax.io`` holds the projected values).
      eps: COFT's radius (PEFT's default ``6e-5``).
      block_share: one ``Q`` shared by all blocks of a matrix.
      use_cayley_neumann: PEFT's default True: the truncated Neumann series
        (approximately orthogonal); False: the exact Cayley transform.
      num_cayley_neumann_terms: the series' terms (PEFT's default 5).
      init_weights: True (PEFT's default): ``q = 0``; False: ``q ~ N(0, 0.1²)``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``q``.

    Returns:
      An ``Adapter`` with trainable ``OFTParams(q)`` and no frozen arrays.

    Static arguments: all.

    Raises:
      ValueError: both or a negative ``block_size``/``r``; ``eps <= 0``;
        ``num_cayley_neumann_terms < 1``.
      TypeError: a non-bool flag or a non-integer size.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = oft(2, use_cayley_neumann=False)
      >>> w = jnp.arange(20.0).reshape(4, 5) / 20
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.q.shape, bool((ad.apply(w, t, f) == w).all())
      ((2, 1), True)

    References:
      Qiu et al., NeurIPS 2023, https://arxiv.org/abs/2306.07280
    """
    for flag, value in (("coft", coft), ("block_share", block_share),
                        ("use_cayley_neumann", use_cayley_neumann),
                        ("init_weights", init_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"oft: {flag} must be a bool, got {value!r}")
    for arg, value in (("block_size", block_size), ("r", r),
                       ("num_cayley_neumann_terms", num_cayley_neumann_terms)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral)):
            raise TypeError(f"oft: {arg} must be an int, got {value!r}")
    block_size = 0 if block_size is None else int(block_size)
    r = 0 if r is None else int(r)
    if block_size < 0 or r < 0 or (block_size and r):
        raise ValueError(f"oft: give block_size ({block_size}) or r ({r}), not both, "
                         "and neither negative")
    if not block_size and not r:
        block_size = 32
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"oft: eps must be a positive number, got {eps!r}")
    if num_cayley_neumann_terms < 1:
        raise ValueError("oft: num_cayley_neumann_terms must be >= 1, got "
                         f"{num_cayley_neumann_terms}")
    param_dtype = jnp.dtype(param_dtype)
    terms = num_cayley_neumann_terms if use_cayley_neumann else None

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("oft takes no stats")
        n_in = w.shape[0]
        b = oft_block_size(n_in, block_size=block_size, r=r)
        if (block_size and b != block_size) or (r and n_in // b != r):
            asked = f"block_size={block_size}" if block_size else f"r={r}"
            warnings.warn(f"oft: {asked} does not divide the matrix's in={n_in} "
                          f"(shape {tuple(w.shape)}); using block size {b} "
                          f"({n_in // b} blocks), as PEFT", UserWarning, stacklevel=2)
        shape = (1 if block_share else n_in // b, b * (b - 1) // 2)
        if init_weights:
            return OFTParams(jnp.zeros(shape, param_dtype)), None
        return OFTParams((0.1 * jax.random.normal(key, shape)).astype(param_dtype)), None

    def blocks(t, n_in):
        rot = rotations(t.q, coft=coft, eps=eps, neumann_terms=terms)
        n = n_in // rot.shape[-1]
        return jnp.broadcast_to(rot, (n,) + rot.shape[1:]) if block_share else rot

    def apply_matrix(w, t, f):
        rot = blocks(t, w.shape[0])
        n, b, _ = rot.shape
        ct = _lowrank.compute_dtype(w.dtype, rot.dtype)
        wb = w.astype(ct).reshape(n, b, w.shape[1])
        return jnp.einsum("nij,njo->nio", rot.astype(ct), wb).reshape(w.shape)

    def unapply_matrix(w, t, f, aux):
        rot = blocks(t, w.shape[0])
        n, b, _ = rot.shape
        ct = _lowrank.compute_dtype(w.dtype, rot.dtype)
        wb = w.astype(ct).reshape(n, b, w.shape[1])
        return jnp.linalg.solve(rot.astype(ct), wb).reshape(w.shape)

    def factored_matrix(w, t, f):
        rot = blocks(t, w.shape[0])
        n, b, _ = rot.shape

        def in_map(x):
            ct = _lowrank.compute_dtype(x.dtype, rot.dtype)
            xb = x.astype(ct).reshape(x.shape[:-1] + (n, b))
            return jnp.einsum("...nk,nkc->...nc", xb, rot.astype(ct)).reshape(
                x.shape).astype(x.dtype)

        return _protocol.FactoredTerms(in_map=in_map)

    size = f"block_size={block_size}" if block_size else f"r={r}"
    extras = "".join(f", {k}={v}" for k, v, default in (
        ("coft", coft, False), ("block_share", block_share, False),
        ("use_cayley_neumann", use_cayley_neumann, True)) if v != default)
    return _lift.lift_matrix(
        name=f"oft({size}{extras})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("block_size", block_size), ("r", r), ("coft", coft),
                         ("eps", float(eps)), ("block_share", block_share),
                         ("use_cayley_neumann", use_cayley_neumann),
                         ("num_cayley_neumann_terms", int(num_cayley_neumann_terms)),
                         ("init_weights", init_weights)),
    )
