# SPDX-License-Identifier: Apache-2.0
"""BOFT: orthogonal fine-tuning by a butterfly product of block rotations.

Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization. Liu,
Qiu, Feng, Xiu, Xue, Yu, Feng, Liu, Heo, Peng, Wen, Black, Weller &
Schölkopf, ICLR 2024. https://arxiv.org/abs/2311.06243

OFT (``adapters.oft``) multiplies the pretrained weight by one block-diagonal
orthogonal matrix. The paper's orthogonal butterfly ``R(m, b)`` is instead a
product of ``m`` sparse orthogonal factors, each a block-diagonal matrix of
``b x b`` orthogonal blocks conjugated by a butterfly permutation, ``P_i B_i
P_iᵀ``; factor ``i`` mixes features ``2^i`` blocks apart, so ``m = log2(d/b)
+ 1`` factors make a dense rotation from ``O(d·b·log d)`` parameters, and
``m = 1`` is OFT. Each block is the Cayley transform of a skew-symmetric
matrix. The paper also finetunes a per-output magnitude ``s`` (its weight
scaling), ``W' = (R W0) ⊙ s``.

Hugging Face PEFT's ``tuners/boft`` (followed here, also for its files)
stores, per Linear module, ``boft_R`` ``(m, n, b, b)``: per factor and block
a *full* ``b x b`` matrix ``A``, of which only the skew part ``Q = (A − Aᵀ)/2``
is used (so PEFT counts ``m·in·b`` trainable entries where the rotations
have ``m·in·(b−1)/2`` degrees of freedom), zero at init; and ``boft_s``
``(out, 1)``, one at init. Each block is the exact Cayley transform ``R =
(I − Q)(I + Q)⁻¹`` (no Neumann series, unlike PEFT's OFT). It rotates the
*input*: in torch's ``(out, in)`` layout ``y = ((x · M) · Wᵀ) ⊙ s + bias``
with ``M = M_{m−1} ⋯ M_1 M_0``, ``M_i = P_i B_i P_iᵀ`` and ``P_i`` the
permutation matrix of PEFT's ``block_butterfly_perm`` (``P[j, perm[j]] =
1``; ``P_0`` is the identity). ``n`` and ``b`` come from
``boft_block_size`` or ``boft_block_num`` (exactly one non-zero). PEFT
refuses (``ValueError``) a block size or count that does not divide ``in``,
and with ``m > 1`` an odd block size or count, an ``in`` that ``b·2^{m−1}``
does not divide, and ``m − 1 > log2(n)`` or ``n`` not a multiple of
``2^{m−1}``: ``boft`` raises the same errors, naming the matrix
(``boft_layout``). It does not adjust sizes the way PEFT's OFT does.

PEFT builds more than one factor only when its CUDA extension (a batched
block-diagonal kernel) compiles; without it (e.g. on a CPU) it silently
uses one factor, and a file with ``boft_n_butterfly_factor > 1`` then does
not load there. ``boft`` always builds ``m`` factors (the method as the
paper and PEFT with its kernel define it). PEFT's ``boft_dropout``
(replacing random blocks of a random factor by the identity while training)
is not implemented: ``boft`` has none.

On a Flax kernel ``W0 (in, out)`` (= ``Wᵀ``): ``W' = (M · W0) ⊙ s`` with
``s`` along the output axis; ``unapply`` undoes the scale and solves with
each block in the reverse order (exact up to rounding).

Factored form (``FactoredTerms``): ``in_map`` rotates the input factor by
factor, ``x ↦ x·M_{m−1} ⋯ M_0`` (per factor the ``n`` block products, ``in·b``
multiply-adds per row, between gathers of the features; consecutive gathers
are composed, ``m`` in all for ``m > 1`` and none for ``m = 1``), then the
model's own product with ``W0``, then ``out_scale = s``; ``M`` and ``M·W0``
are never formed. Per row that is ``m·in·b + out`` multiply-adds for PEFT's
``m·in·b + out`` trainable entries: LoRA at the same trainable count
(``r = (m·in·b + out)/(in + out)``) also costs ``r(in + out)``, the same.
Counting only the rotations' ``m·in·(b−1)/2`` degrees of freedom, BOFT
costs about twice LoRA's adapter term. Forming the rotations costs
``O(m·n·b³)`` per step, independent of the tokens.

Exports: ``BOFTParams``, ``boft``, ``boft_layout``, ``boft_permutations``.
"""

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _oft, _protocol


class BOFTParams(NamedTuple):
    """Trainable BOFT parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      r: ``(m, n, b, b)`` = PEFT ``boft_R``: per butterfly factor and block a
        full matrix whose skew part ``(A − Aᵀ)/2`` is Cayley-transformed.
      s: ``(out,)`` = PEFT ``boft_s`` (stored ``(out, 1)``): the output scale.
    """

    r: jax.Array
    s: jax.Array


def boft_layout(n_in: int, *, block_size: int = 0, block_num: int = 0,
                n_butterfly_factor: int = 1, where: str = "") -> tuple[int, int]:
    """The ``(block_size, block_num)`` BOFT (and PEFT) uses on ``n_in`` inputs.

    Exactly one of ``block_size`` and ``block_num`` is non-zero. PEFT's
    ``update_layer`` rules, each a ``ValueError`` (with ``where`` naming the
    matrix): the given size or count must divide ``n_in``; with ``m =
    n_butterfly_factor > 1`` the block count and size must be even,
    ``block_size · 2^{m−1}`` must divide ``n_in`` (``block_size`` given) or
    ``m − 1 <= log2(block_num)`` with ``block_num`` a multiple of
    ``2^{m−1}`` (``block_num`` given).

    Args:
      n_in: the matrix's input features.
      block_size: PEFT's ``boft_block_size`` (0: use ``block_num``).
      block_num: PEFT's ``boft_block_num`` (0: use ``block_size``).
      n_butterfly_factor: PEFT's ``boft_n_butterfly_factor`` ``m >= 1``.
      where: the matrix, for error messages.

    Returns:
      ``(block_size, block_num)`` with ``block_size · block_num = n_in``.

    Example:
      >>> boft_layout(24, block_size=6, n_butterfly_factor=2)
      (6, 4)
      >>> boft_layout(24, block_num=3)
      (8, 3)
    """
    at = f" ({where})" if where else ""
    m = n_butterfly_factor - 1
    if (block_size != 0) == (block_num != 0):
        raise ValueError(f"boft: give exactly one of block_size ({block_size}) and "
                         f"block_num ({block_num}) non-zero{at}")
    if m < 0:
        raise ValueError(f"boft: n_butterfly_factor must be a positive integer, got "
                         f"{n_butterfly_factor}{at}")
    if block_num:
        if n_in % block_num:
            raise ValueError(f"boft: in_features ({n_in}) must be divisible by "
                             f"block_num ({block_num}){at}")
        if m and (m > int(math.log2(block_num)) or block_num % 2 ** m):
            raise ValueError(f"boft: block_num ({block_num}) must be a multiple of "
                             f"2**(n_butterfly_factor - 1) = {2 ** m} "
                             f"(n_butterfly_factor={n_butterfly_factor}){at}")
        block_size = n_in // block_num
    else:
        if n_in % block_size:
            raise ValueError(f"boft: in_features ({n_in}) must be divisible by "
                             f"block_size ({block_size}){at}")
        if m and n_in % (block_size * 2 ** m):
            raise ValueError(f"boft: in_features ({n_in}) must be divisible by "
                             f"block_size * 2**(n_butterfly_factor - 1) = "
                             f"{block_size * 2 ** m} (block_size={block_size}, "
                             f"n_butterfly_factor={n_butterfly_factor}){at}")
        block_num = n_in // block_size
    if m and (block_num % 2 or block_size % 2):
        raise ValueError(f"boft: with n_butterfly_factor={n_butterfly_factor} the block "
                         f"count ({block_num}) and block size ({block_size}) must be "
                         f"even{at}")
    return block_size, block_num


def _butterfly_perm(n: int, blocks: int, half: int) -> np.ndarray:
    """PEFT's ``block_butterfly_perm(n, blocks, half)`` with a butterfly factor.

    Within each of ``blocks`` windows of ``n / blocks`` features, the chunks
    of ``half`` features are reordered: even chunks first, then odd ones.
    """
    size = n // blocks
    chunks = size // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    within = np.concatenate([np.arange(c * half, (c + 1) * half) for c in order])
    return (np.arange(0, n, size)[:, None] + within[None, :]).reshape(n)


def boft_permutations(n_in: int, block_size: int, block_num: int,
                      n_butterfly_factor: int) -> np.ndarray:
    """PEFT's butterfly permutations, one row per factor (``boft_P``'s indices).

    Row ``i`` is ``perm_i`` with ``P_i[j, perm_i[j]] = 1`` (PEFT's
    ``perm2mat``): PEFT's ``block_butterfly_perm(n_in, block_num / 2^i,
    block_size / 2, m − 1)``, the identity for ``m = 1`` and for ``i = 0``.

    Args:
      n_in: the input features.
      block_size: the block size (``boft_layout``'s).
      block_num: the number of blocks (``boft_layout``'s).
      n_butterfly_factor: the number of factors ``m``.

    Returns:
      ``(m, n_in)`` int array.

    Example:
      >>> boft_permutations(8, 2, 4, 2)[1].tolist()
      [0, 2, 1, 3, 4, 6, 5, 7]
    """
    if n_butterfly_factor == 1:
        return np.arange(n_in)[None, :]
    return np.stack([_butterfly_perm(n_in, block_num // 2 ** i, block_size // 2)
                     for i in range(n_butterfly_factor)])


def _blocks(r: jax.Array) -> jax.Array:
    """``(m, n, b, b)`` full matrices -> ``(m, n, b, b)`` Cayley rotations.

    The skew part ``(A − Aᵀ)/2`` through OFT's exact Cayley transform
    (``(I + Q)⁻¹(I − Q)``, equal to PEFT's ``(I − Q)(I + Q)⁻¹``), in float32
    or wider as PEFT's ``cayley_batch``.
    """
    r = r.astype(_lowrank.compute_dtype(jnp.float32, r.dtype))
    return _oft.cayley(0.5 * (r - jnp.swapaxes(r, -1, -2)))


def _is_identity(p: np.ndarray) -> bool:
    return bool((p == np.arange(p.size)).all())


def _butterfly(y: jax.Array, rot: jax.Array, perms: np.ndarray, order, *,
               features: bool = False, solve: bool = False) -> jax.Array:
    """The factors ``P_i op(B_i) P_iᵀ`` in ``order``, on rows or on features.

    Rows (``y (in, ...)``): ``y ↦ P_i B_i P_iᵀ y`` with ``P_iᵀ y = y[inv_i]``,
    the blocks on consecutive rows, ``P_i z = z[perm_i]``; ``solve`` uses
    ``B_i⁻¹`` instead. Features (``y (..., in)``, row vectors): ``y ↦ y P_i
    B_i P_iᵀ`` with ``y P_i = y[..., inv_i]``, ``z P_iᵀ = z[..., perm_i]``.
    Consecutive gathers are composed into one; PEFT's ``P_0`` is the
    identity, so ``m`` factors cost at most ``m`` gathers.
    """
    n, b = rot.shape[1], rot.shape[2]
    axis = y.ndim - 1 if features else 0

    def gather(v, idx):
        return v if _is_identity(idx) else jnp.take(v, idx, axis=axis)

    pending = np.arange(y.shape[axis])
    for i in order:
        y = gather(y, pending[np.argsort(perms[i])])
        if features:
            yb = y.reshape(y.shape[:-1] + (n, b))
            y = jnp.einsum("...nk,nkc->...nc", yb, rot[i]).reshape(y.shape)
        else:
            yb = y.reshape((n, b) + y.shape[1:])
            yb = (jnp.linalg.solve(rot[i], yb.reshape((n, b, -1))).reshape(yb.shape)
                  if solve else jnp.einsum("nij,nj...->ni...", rot[i], yb))
            y = yb.reshape(y.shape)
        pending = perms[i]
    return gather(y, pending)


def boft(
    block_size: int | None = None,
    *,
    block_num: int | None = None,
    n_butterfly_factor: int = 1,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """BOFT: ``W' = (M_{m−1} ⋯ M_0 · W0) ⊙ s``, ``M_i = P_i B_i P_iᵀ`` (PEFT's BOFT).

    Each ``B_i`` is block-diagonal with ``n`` Cayley rotations of size ``b``
    (from the skew parts of trainable full ``b x b`` matrices, zero at init:
    the identity), ``P_i`` PEFT's butterfly permutation
    (``boft_permutations``) and ``s`` a trainable output scale (one at init).
    Trainable parameters: ``m·in·b + out`` per matrix, PEFT's count. The
    factored path rotates the input factor by factor (``in_map``; ``M`` and
    ``M·W0`` are never formed) and scales the outputs (``out_scale``);
    ``unapply`` divides by ``s`` and solves with each block.

    Args:
      block_size: PEFT's ``boft_block_size`` ``b``. Give it or
        ``block_num``, not both (neither: 4, PEFT's default).
      block_num: PEFT's ``boft_block_num`` ``n`` (``b = in / n``).
      n_butterfly_factor: PEFT's ``boft_n_butterfly_factor`` ``m`` (1: OFT
        with PEFT's BOFT parametrisation and scale). A block size or count
        that does not fit a matrix is a ``ValueError`` at ``init`` naming
        it (PEFT's rules, ``boft_layout``).
      init_weights: True (PEFT's default): ``r = 0``, ``s = 1``; False:
        ``r ~ N(0, 0.1²)``, ``s ~ N(1, 0.1²)``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``r`` and ``s``.

    Returns:
      An ``Adapter`` with trainable ``BOFTParams(r, s)`` and no frozen arrays.

    Static arguments: all.

    Raises:
      ValueError: both or a negative ``block_size``/``block_num``;
        ``n_butterfly_factor < 1``; at ``init``, a layout PEFT refuses.
      TypeError: a non-bool ``init_weights`` or a non-integer size.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = boft(2, n_butterfly_factor=2)
      >>> w = jnp.arange(32.0).reshape(8, 4) / 32
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.r.shape, t.s.shape, bool((ad.apply(w, t, f) == w).all())
      ((2, 4, 2, 2), (4,), True)

    References:
      Liu et al., ICLR 2024, https://arxiv.org/abs/2311.06243
    """
    if not isinstance(init_weights, bool):
        raise TypeError(f"boft: init_weights must be a bool, got {init_weights!r}")
    for arg, value in (("block_size", block_size), ("block_num", block_num),
                       ("n_butterfly_factor", n_butterfly_factor)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral)):
            raise TypeError(f"boft: {arg} must be an int, got {value!r}")
    block_size = 0 if block_size is None else int(block_size)
    block_num = 0 if block_num is None else int(block_num)
    if block_size < 0 or block_num < 0 or (block_size and block_num):
        raise ValueError(f"boft: give block_size ({block_size}) or block_num "
                         f"({block_num}), not both, and neither negative")
    if not block_size and not block_num:
        block_size = 4
    n_factors = int(n_butterfly_factor)
    if n_factors < 1:
        raise ValueError(f"boft: n_butterfly_factor must be >= 1, got {n_factors}")
    param_dtype = jnp.dtype(param_dtype)

    def layout(w):
        b, n = boft_layout(w.shape[0], block_size=block_size, block_num=block_num,
                           n_butterfly_factor=n_factors,
                           where=f"matrix shape {tuple(w.shape)}")
        return b, n, boft_permutations(w.shape[0], b, n, n_factors)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("boft takes no stats")
        b, n, _ = layout(w)
        shape = (n_factors, n, b, b)
        if init_weights:
            return BOFTParams(jnp.zeros(shape, param_dtype),
                              jnp.ones((w.shape[1],), param_dtype)), None
        kr, ks = jax.random.split(key)
        return BOFTParams(
            (0.1 * jax.random.normal(kr, shape)).astype(param_dtype),
            (1.0 + 0.1 * jax.random.normal(ks, (w.shape[1],))).astype(param_dtype)), None

    def apply_matrix(w, t, f):
        _, _, perms = layout(w)
        rot = _blocks(t.r)
        ct = _lowrank.compute_dtype(w.dtype, rot.dtype, t.s.dtype)
        y = _butterfly(w.astype(ct), rot.astype(ct), perms, range(n_factors))
        return y * t.s.astype(ct)[None, :]

    def unapply_matrix(w, t, f, aux):
        _, _, perms = layout(w)
        rot = _blocks(t.r)
        ct = _lowrank.compute_dtype(w.dtype, rot.dtype, t.s.dtype)
        y = w.astype(ct) / t.s.astype(ct)[None, :]
        return _butterfly(y, rot.astype(ct), perms, range(n_factors - 1, -1, -1),
                          solve=True)

    def factored_matrix(w, t, f):
        _, _, perms = layout(w)
        rot = _blocks(t.r)

        def in_map(x):  # x·M = x·M_{m−1} ⋯ M_0: factor m−1 first
            ct = _lowrank.compute_dtype(x.dtype, rot.dtype)
            return _butterfly(x.astype(ct), rot.astype(ct), perms,
                              range(n_factors - 1, -1, -1), features=True).astype(x.dtype)

        return _protocol.FactoredTerms(out_scale=t.s, in_map=in_map)

    size = f"block_size={block_size}" if block_size else f"block_num={block_num}"
    extras = f", n_butterfly_factor={n_factors}" if n_factors != 1 else ""
    return _lift.lift_matrix(
        name=f"boft({size}{extras})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("block_size", block_size), ("block_num", block_num),
                         ("n_butterfly_factor", n_factors),
                         ("init_weights", init_weights)),
    )
