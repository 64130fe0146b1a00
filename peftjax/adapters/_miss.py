# SPDX-License-Identifier: Apache-2.0
"""MiSS: one shared trainable shard repeated over the weight, as PEFT's ``MISS``.

MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing
Structure (earlier versions: Bone, DiSHA). Kang & Yin, 2024.
https://arxiv.org/abs/2409.15371

The input dimension of the weight is cut into shards of ``r`` rows and every
shard gets the same trainable matrix ``D`` added. Hugging Face PEFT
(``tuners/miss``, followed here for its files) stores ``D`` as ``miss_block``
and selects the variant with ``init_weights``; on a Flax kernel ``(in, out)``
(PEFT's torch weight ``(out, in)`` transposed):

* ``MiSSVariant.BALANCE`` (PEFT ``init_weights=True``): ``D = miss_block (r,
  out)`` as stored; kernel row ``i`` gets ``D[i mod r]`` (when ``r`` does not
  divide ``in``, the last partial shard gets the first rows of ``D``, as
  PEFT). ``x @ ΔW = (Σ_g x_g) @ D`` with ``x`` zero-padded to a multiple of
  ``r`` and cut into shards ``x_g (r,)``.
* ``MiSSVariant.MINI`` (``init_weights="mini"``): ``miss_block (r, mini_r)``
  tiled ``out/mini_r`` times along the output axis (torch's ``repeat``), so
  ``D[:, c] = miss_block[:, c mod mini_r]``.
* ``MiSSVariant.BAT`` (``init_weights="bat"``, the DiSHA paper's Block Affine
  Transformation): ``miss_block (out/r, r, r)``; with torch's ``r × r``
  blocks ``W[a, c]`` (output block ``a``, input block ``c``) PEFT sets
  ``W'[a, c] = W[a, c] @ (I + B[a]) + B[a]``. On the Flax kernel block
  ``K[c, a] = W[a, c]ᵀ`` that is ``K'[c, a] = (I + B[a])ᵀ K[c, a] + B[a]ᵀ``.

The update starts at zero (identity at init) for every variant; PEFT's
``init_weights=False`` (the balance form with ``D`` kaiming-uniform, bound
``1/sqrt(out)``) is ``zero_init=False``. Trainable parameters per matrix:
``r·out`` (balance), ``r·mini_r`` (mini), ``out·r`` (bat).

Factored form: balance and mini take ``x -> pad -> (..., in/r, r) -> sum ->
@ D`` (mini: ``@ miss_block`` then tiled), ``in + r·out`` (``in +
r·mini_r``) multiply-adds per row. Bat has none: its update multiplies the
frozen weight's blocks, so ``x @ ΔW`` costs as much as ``x @ W`` again and its
gradient needs an activation-times-weight-block intermediate; bat exists in
weight space only (the factored path materialises it, with its warning).
``unapply`` subtracts the update for balance and mini (exact up to rounding);
bat's inverse needs ``(I + B[a])⁻¹`` (PEFT's unmerge inverts it) and is not
exact, so bat has no ``unapply``.

Exports: ``MiSSParams``, ``MiSSVariant``, ``miss``.
"""

import enum
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class MiSSVariant(enum.Enum):
    """Which MiSS structure (PEFT's ``init_weights`` values).

    Attributes:
      BALANCE: ``init_weights=True``: one ``(r, out)`` shard shared by every
        ``r``-row input shard.
      MINI: ``init_weights="mini"``: an ``(r, mini_r)`` shard tiled along the
        output axis as well.
      BAT: ``init_weights="bat"``: per output block an ``(r, r)`` matrix that
        transforms the weight's blocks (``W[a,c](I + B[a]) + B[a]``).
    """

    BALANCE = "balance"
    MINI = "mini"
    BAT = "bat"


class MiSSParams(NamedTuple):
    """Trainable MiSS shard (per matrix; stacked leaves add batch axes).

    Attributes:
      block: PEFT ``miss_block`` as stored: ``(r, out)`` (balance),
        ``(r, mini_r)`` (mini) or ``(out/r, r, r)`` (bat).
    """

    block: jax.Array


def _shard_sum(x: jax.Array, r: int) -> jax.Array:
    """``x (..., in)`` zero-padded to a multiple of ``r``, summed over shards."""
    n_in = x.shape[-1]
    pad = (-n_in) % r
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(x.shape[:-1] + ((n_in + pad) // r, r)).sum(axis=-2)


def miss(
    rank: int = 64,
    *,
    variant: MiSSVariant = MiSSVariant.BALANCE,
    mini_r: int = 1,
    zero_init: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """MiSS: ``W' = W + tile(D)`` (balance, mini) or the block-affine ``bat``.

    See the module docstring for each variant's update. Identity at init
    (``miss_block = 0``). Trainable parameters per matrix: ``r·out``
    (balance), ``r·mini_r`` (mini), ``out·r`` (bat), PEFT's counts. The
    factored path (balance, mini) sums the ``r``-wide input shards and
    multiplies by the shard (``O(in + r·out)`` per row); bat is weight-space
    only and has no ``unapply``.

    Args:
      rank: ``r`` (static; PEFT's default 64), at most ``in``; for bat it must
        divide ``in`` and ``out``.
      variant: a ``MiSSVariant`` (PEFT's ``init_weights``: True, "mini", "bat").
      mini_r: PEFT's ``mini_r`` (default 1), used by ``MINI`` only; it must
        divide ``out``.
      zero_init: True (PEFT's default): ``miss_block = 0``; False: the block
        is kaiming-uniform with bound ``1/sqrt(fan_in)`` of the torch tensor
        (PEFT's ``init_weights=False`` for balance), not the identity.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the shard.
      dropout: PEFT's ``miss_dropout`` on the adapter input (factored path
        only); bat has no input term and refuses it.

    Returns:
      An ``Adapter`` with trainable ``MiSSParams`` and frozen part None.

    Static arguments: all.

    Raises:
      TypeError: ``variant`` is not a ``MiSSVariant``.
      ValueError: ``rank <= 0``, ``mini_r <= 0``, dropout with bat; at init,
        ``rank > in``, or a shape that the variant cannot divide (naming the
        matrix view).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = miss(2)
      >>> w = jnp.zeros((5, 3))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.block.shape, f
      ((2, 3), None)
      >>> t = t._replace(block=jnp.array([[1.0, 0, 0], [0, 2, 0]]))
      >>> ad.apply(w, t, f)[:, :2]  # rows cycle through the shard; 5 % 2 = 1
      Array([[1., 0.],
             [0., 2.],
             [1., 0.],
             [0., 2.],
             [1., 0.]], dtype=float32)

    References:
      Kang & Yin, 2024, https://arxiv.org/abs/2409.15371
    """
    rank = _lora.check_rank(rank, "miss")
    if not isinstance(variant, MiSSVariant):
        raise TypeError(f"miss: variant must be a MiSSVariant member, got {variant!r}")
    if isinstance(mini_r, bool) or not isinstance(mini_r, int) or mini_r < 1:
        raise ValueError(f"miss: mini_r must be a positive int, got {mini_r!r}")
    if variant is MiSSVariant.BAT and dropout:
        raise ValueError(f"miss: dropout={dropout} needs an input term; the bat "
                         "variant has none (PEFT ignores miss_dropout there)")
    param_dtype = jnp.dtype(param_dtype)

    def shape_of(n_in, n_out, dtype):
        where = f"the matrix view (in={n_in}, out={n_out}) of a leaf with dtype {dtype}"
        if rank > n_in:
            raise ValueError(f"miss: rank={rank} exceeds in={n_in}: {where}")
        if variant is MiSSVariant.BAT:
            if n_in % rank or n_out % rank:
                raise ValueError(f"miss (bat): {where} is not divisible into "
                                 f"[rank={rank}, rank] blocks")
            return (n_out // rank, rank, rank)
        if variant is MiSSVariant.MINI:
            if n_out % mini_r:
                raise ValueError(f"miss (mini): out of {where} is not divisible "
                                 f"by mini_r={mini_r}")
            return (rank, mini_r)
        return (rank, n_out)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("miss takes no stats")
        shape = shape_of(*w.shape, w.dtype)
        if zero_init:
            return MiSSParams(jnp.zeros(shape, param_dtype)), None
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))  # torch's fan-in
        block = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        return MiSSParams(block.astype(param_dtype)), None

    def shared(t, n_out, ct):
        """``D (r, out)`` of balance and mini."""
        d = t.block.astype(ct)
        if variant is MiSSVariant.MINI:
            d = jnp.tile(d, (1, n_out // mini_r))
        return d

    def tiled(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.block.dtype)
        n_in, n_out = w.shape
        d = shared(t, n_out, ct)
        return ct, jnp.tile(d, (-(-n_in // rank), 1))[:n_in]

    def apply_matrix(w, t, f):
        if variant is MiSSVariant.BAT:
            ct = _lowrank.compute_dtype(w.dtype, t.block.dtype)
            n_in, n_out = w.shape
            r = rank
            k4 = w.astype(ct).reshape(n_in // r, r, n_out // r, r)  # (c, j, a, i)
            b = t.block.astype(ct)  # (a, j, l)
            affine = jnp.einsum("cjai,ajl->clai", k4, b)
            shift = jnp.transpose(b, (2, 0, 1))[None]  # (1, l, a, i) = B[a, i, l]
            return (k4 + affine + shift).reshape(n_in, n_out)
        ct, d = tiled(w, t)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = tiled(w, t)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        n_out = w.shape[-1]

        def run(x):
            ct = _lowrank.compute_dtype(x.dtype, t.block.dtype)
            xs = _shard_sum(x.astype(ct), rank)
            if variant is MiSSVariant.MINI:
                y = xs @ t.block.astype(ct)
                return jnp.tile(y, (1,) * (y.ndim - 1) + (n_out // mini_r,))
            return xs @ t.block.astype(ct)

        return _protocol.FactoredTerms(delta=run)

    bat = variant is MiSSVariant.BAT
    extra = f", mini_r={mini_r}" if variant is MiSSVariant.MINI else ""
    return _lift.lift_matrix(
        name=f"miss(rank={rank}, variant={variant.value}{extra})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=None if bat else unapply_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=None if bat else factored_matrix,
        hyperparameters=(("rank", rank), ("variant", variant), ("mini_r", mini_r),
                         ("dropout", float(dropout))),
    )
