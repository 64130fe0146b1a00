# SPDX-License-Identifier: Apache-2.0
"""BD-LoRA: LoRA with one block-diagonal factor, for tensor-parallel serving.

Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor Parallel
LoRA Serving. Wang, Kübler, Budhathoki, Wang & Kleindessner, 2025.
https://arxiv.org/abs/2510.23346

Hugging Face PEFT's ``LoraConfig(use_bdlora=BdLoraConfig(...))``
(``tuners/lora/variants.py``: ``BdLoraLinearVariant``, ``BlockDiagonalLinear``;
followed here, also for its files). In a tensor-parallel layer sharded over
``nblocks`` devices, a plain LoRA's rank-``r`` intermediate needs an extra
all-reduce (row-sharded kernels: ``x`` is split over ``in``) or all-gather
(column-sharded kernels: the output is split). Making the factor on the
sharded side block-diagonal keeps every block on its own shard: a
row-sharded module (``o_proj``, ``down_proj``) gets a block-diagonal ``A``
(input block ``i`` maps to rank block ``i``), a column-sharded one (``q``,
``k``, ``v``, ``up``, ``gate``) a block-diagonal ``B`` (rank block ``i`` to
output block ``i``). PEFT picks the side per module by substring patterns
(``target_modules_bd_a`` / ``target_modules_bd_b``).

Flax layout, ``m = in/nb``, ``n = r/nb``, ``o = out/nb``:

* ``block_diagonal="a"``: ``a (nb, m, n)`` (block ``i`` = PEFT's
  ``lora_A (r, m)`` rows ``i·n:(i+1)·n``, transposed), ``b (r, out)`` dense;
  ``ΔW = s·blockdiag(a) @ b``. Trainable ``r·in/nb + r·out``.
* ``block_diagonal="b"``: ``a (in, r)`` dense, ``b (nb, n, o)`` (block ``i``
  = PEFT's ``lora_B (out, n)`` rows ``i·o:(i+1)·o``, transposed);
  ``ΔW = s·a @ blockdiag(b)``. Trainable ``r·in + r·out/nb``.

PEFT's init: a block-diagonal ``A`` is torch's ``kaiming_uniform_`` with its
defaults (``a=0``: ``U(±sqrt(6/m))``, fan-in ``m``), not LoRA's ``a=sqrt(5)``;
a block-diagonal ``B`` is zero and ``A`` is LoRA's ``U(±1/sqrt(in))``. Both
are the identity at init.

Sharding (``peftjax.shard.adapter_shardings``, derived from the base leaf):
the block factor's leading ``nb`` axis matches none of the base's
``in``/``out`` sizes, so the base's tensor-parallel mesh axis moves to it
(the first axis it divides): with ``nb`` a multiple of the tensor-parallel
degree, block ``i`` lives on the shard holding input (``"a"``) or output
(``"b"``) block ``i`` of the base. The dense factor follows the generic rule
(split on its ``in`` or ``out`` axis), not along its rank axis, which is
where BD-LoRA's communication saving needs it (``"a"``: ``b (r, out)`` split
over ``r``; ``"b"``: ``a (in, r)`` split over ``r``); place it so explicitly
(e.g. ``PartitionSpec(None, "tensor")`` for a ``"b"`` module's ``a``). XLA's
partitioner inserts whatever collectives a placement needs either way.

Factored form (``FactoredTerms.delta``): ``"a"``: ``x`` split into ``nb``
blocks, a batched ``(m, n)`` product, then ``@ b``: ``2·r·in/nb + 2·r·out``
FLOPs per row; ``"b"``: ``x @ a`` then ``nb`` ``(n, o)`` products:
``2·r·in + 2·r·out/nb``. LoRA at the same rank: ``2·r·(in + out)``. No
``(in, out)`` or block-diagonal ``(in, r)`` temporary.

Exports: ``BdLoRAParams``, ``bdlora``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class BdLoRAParams(NamedTuple):
    """Trainable BD-LoRA factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(nb, in/nb, r/nb)`` blocks (``block_diagonal="a"``) or ``(in, r)``.
      b: ``(r, out)``, or ``(nb, r/nb, out/nb)`` blocks (``block_diagonal="b"``).
    """

    a: jax.Array
    b: jax.Array


def _block_diag(blocks: jax.Array) -> jax.Array:
    """``(nb, p, q)`` blocks as the ``(nb·p, nb·q)`` block-diagonal matrix."""
    nb, p, q = blocks.shape
    eye = jnp.eye(nb, dtype=blocks.dtype)
    return jnp.einsum("ij,ipq->ipjq", eye, blocks).reshape(nb * p, nb * q)


def bdlora(
    rank: int,
    *,
    nblocks: int,
    block_diagonal: str,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """BD-LoRA: ``W' = W0 + s·A@B`` with ``A`` or ``B`` block-diagonal (``nblocks``).

    Args:
      rank: ``r`` (static); ``nblocks`` must divide it.
      nblocks: ``nb`` = PEFT's ``BdLoraConfig.nblocks`` (the serving
        tensor-parallel degree); must divide ``in`` (side ``"a"``) or
        ``out`` (side ``"b"``).
      block_diagonal: ``"a"`` (row-sharded modules: ``o_proj``,
        ``down_proj``) or ``"b"`` (column-sharded: ``q/k/v``, ``up``,
        ``gate``).
      alpha: ``lora_alpha``.
      scaling: as for ``lora`` (``ALPHA_OVER_SQRT_RANK``: PEFT's
        ``use_rslora``).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the factors.
      dropout: dropout rate on the adapter input (factored path only).

    Returns:
      An ``Adapter`` with trainable ``BdLoRAParams(a, b)`` and no frozen part;
      ``r·in/nb + r·out`` (``"a"``) or ``r·in + r·out/nb`` (``"b"``)
      trainable values per matrix, PEFT's count.

    Static arguments: all.

    Raises:
      ValueError: ``rank``/``nblocks`` not positive, ``nblocks`` not dividing
        ``rank``, a bad ``block_diagonal``; at init, ``nblocks`` not dividing
        the blocked dimension.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = bdlora(4, nblocks=2, block_diagonal="a")
      >>> w = jnp.ones((6, 5))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape
      ((2, 3, 2), (4, 5))
      >>> bool(jnp.array_equal(ad.apply(w, t, f), w))
      True

    References:
      Wang et al., 2025, https://arxiv.org/abs/2510.23346
    """
    rank = _lora.check_rank(rank, "bdlora")
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks <= 0:
        raise ValueError(f"bdlora: nblocks must be a positive int, got {nblocks!r}")
    if rank % nblocks:
        raise ValueError(f"bdlora: nblocks={nblocks} does not divide rank={rank}")
    if block_diagonal not in ("a", "b"):
        raise ValueError(f"bdlora: block_diagonal must be 'a' or 'b', got "
                         f"{block_diagonal!r}")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    nb, side = nblocks, block_diagonal

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("bdlora takes no stats")
        n_in, n_out = w.shape
        blocked = n_in if side == "a" else n_out
        if blocked % nb:
            raise ValueError(f"bdlora: nblocks={nb} does not divide "
                             f"{'in' if side == 'a' else 'out'}={blocked} of the "
                             f"matrix view of shape {tuple(w.shape)}")
        if side == "a":  # torch kaiming_uniform_(a=0) on (r, in/nb)
            bound = math.sqrt(6.0 / (n_in // nb))
            a = jax.random.uniform(key, (nb, n_in // nb, rank // nb), param_dtype,
                                   -bound, bound)
            return BdLoRAParams(a, jnp.zeros((rank, n_out), param_dtype)), None
        a = _lora.kaiming_uniform_a(key, n_in, rank, param_dtype)
        return BdLoRAParams(a, jnp.zeros((nb, rank // nb, n_out // nb), param_dtype)), None

    def factors(t, f):
        if side == "a":
            return _lowrank.LowRank(_block_diag(t.a), t.b, s)
        return _lowrank.LowRank(t.a, _block_diag(t.b), s)

    forms = _lowrank.low_rank_forms(factors)

    def factored_matrix(w, t, f):
        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, t.a.dtype)
            lead = x.shape[:-1]
            xc = x.astype(ct)
            if side == "a":
                h = jnp.einsum("...im,imn->...in", xc.reshape(lead + (nb, -1)),
                               t.a.astype(ct)).reshape(lead + (rank,))
                return (h * jnp.asarray(s, ct)) @ t.b.astype(ct)
            h = (xc @ t.a.astype(ct)) * jnp.asarray(s, ct)
            return jnp.einsum("...ik,iko->...io", h.reshape(lead + (nb, -1)),
                              t.b.astype(ct)).reshape(lead + (-1,))

        return _protocol.FactoredTerms(delta=delta)

    return _lift.lift_matrix(
        name=(f"bdlora(rank={rank}, nblocks={nb}, block_diagonal={side!r}, "
              f"alpha={alpha}, scaling={scaling.value})"),
        init_matrix=init_matrix,
        apply_matrix=forms["apply_matrix"],
        unapply_matrix=forms["unapply_matrix"],
        factored_matrix=factored_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("nblocks", nb), ("block_diagonal", side),
                         ("alpha", alpha), ("scaling", scaling), ("s", s)),
    )
