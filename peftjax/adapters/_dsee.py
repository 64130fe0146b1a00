# SPDX-License-Identifier: Apache-2.0
"""DSEE: a low-rank update plus a sparse residual whose support comes from ``W``.

DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
Models. Chen, Chen, Chen, Awadallah, Wang & Cheng, ACL 2023.
https://arxiv.org/abs/2111.00160 (authors' code: github.com/VITA-Group/DSEE)

The paper's sparsity-aware update (§3, "Sparsity-embedded low-rank
updates") is ``ΔW = UV + S2``: a LoRA product plus a sparse matrix ``S2``
with ``N`` trainable entries on a support ``Ω`` fixed before training. ``Ω``
is read off the pretrained weight: decompose ``W ≈ U'V' + S'`` (low rank plus
sparse, the paper uses GreBsmo) and take the positions of the ``N`` largest
``|S'|``, i.e. where ``W`` is worst explained by its low-rank part. The
authors' ``run_glue.py`` runs GreBsmo's bilateral QR iterations from a random
start, growing the rank from 1 by 5 per round for 100 rounds and
hard-thresholding ``|S'| < 0.01``. Here the decomposition is deterministic:
the truncated SVD of rank ``support_rank`` (default: ``r``) alternated with
hard thresholding (``support_iters`` rounds of ``L = SVD(W - S)``, ``S =
top_N(W - L)``; one round is the plain residual of the truncated SVD); the
optimal rank-``k`` approximation stands in for the randomised one, so the
chosen positions can differ from a GreBsmo run. ``support="magnitude"``
takes the ``N`` largest ``|W|`` and ``support="random"`` a uniform subset.

Following the authors' BERT code (``modeling_bert.py``): the update is
``W' = W0 + (alpha/r)·(BA + S2)`` (the sparse values are scaled too), ``A ~
N(0, 0.02²)``, ``B = 0`` and ``S2 = 0`` (so ``W' = W0`` at init), and their
defaults are ``lora_alpha = 32``, ``num_sparse = 128`` (``lora_r = 4``).

The second sparsity (§3, "Sparse final weights") prunes the fine-tuned
weight: ``dsee_prune`` keeps the largest magnitudes of a merged kernel
(unstructured, or ``N:M`` in groups of ``M`` consecutive inputs) and returns
the mask; the paper then fine-tunes again with the mask fixed (apply it to
the base, e.g. ``adapters.fold`` then ``dsee_prune``, and train a new
adapter). Its structured variant (attention heads by an ℓ1-regularised head
mask) needs the model's head layout and is not provided.

Layout and forms as ``sltrain`` (the leaf's ``(in, out)`` matrix view, flat
row-major support, frozen ``SparseSupport``): ``W' = W0 + s·(a@b ⊕_Ω
values)``, exact ``unapply``, factored ``delta`` of ``2·r·(in + out) + 3·N``
FLOPs per row.

Exports: ``DSEEParams``, ``dsee``, ``dsee_support``, ``dsee_prune``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lora, _lowrank, _protocol, _sltrain, _sparse

_SUPPORTS = ("residual", "magnitude", "random")


class DSEEParams(NamedTuple):
    """Trainable DSEE parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` LoRA ``A`` transposed (the authors' ``lora_a.weight``ᵀ).
      b: ``(r, out)`` LoRA ``B`` transposed (``lora_b.weight``ᵀ).
      values: ``(N,)`` the sparse ``S2`` at the frozen support (``lora_s``'s
        unmasked entries; scaled by ``alpha/r`` like the product).
    """

    a: jax.Array
    b: jax.Array
    values: jax.Array


def _positive(value: Any, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"dsee: {arg} must be a positive int, got {arg}={value!r}")
    return int(value)


def dsee_support(w: jax.Array, num: int, *, rank: int, support: str = "residual",
                 support_iters: int = 1, key: jax.Array | None = None) -> jax.Array:
    """The ``num`` flat positions of ``w (in, out)`` DSEE trains sparsely, sorted int32.

    Args:
      w: the pretrained matrix ``(in, out)`` (one slice; no batch axes).
      num: ``N``, the support size (static).
      rank: the rank of the low-rank part of the decomposition.
      support: ``"residual"`` (the paper: largest ``|S'|`` of ``W ≈ L + S'``),
        ``"magnitude"`` (largest ``|W|``) or ``"random"``.
      support_iters: rounds of ``L = SVD_rank(W - S)``, ``S = top_N(W - L)``
        (``"residual"`` only).
      key: PRNG key, needed for ``"random"``.

    Returns:
      ``(num,)`` int32 flat row-major positions, sorted, unique.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.zeros((3, 3)).at[1, 2].set(5.0)
      >>> dsee_support(w, 1, rank=1, support="magnitude").tolist()
      [5]
    """
    if support not in _SUPPORTS:
        raise ValueError(f"dsee: support must be one of {_SUPPORTS}, got {support!r}")
    size = w.shape[0] * w.shape[1]
    if support == "random":
        if key is None:
            raise ValueError("dsee_support: support='random' needs a key")
        idx = jax.random.permutation(key, size)[:num]
        return jnp.sort(idx).astype(jnp.int32)
    ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
    m = w.astype(ct)
    if support == "magnitude":
        score = jnp.abs(m)
    else:
        s = jnp.zeros_like(m)
        score = jnp.abs(m)
        for _ in range(support_iters):
            u, sv, vt = jnp.linalg.svd(m - s, full_matrices=False)
            low = (u[:, :rank] * sv[None, :rank]) @ vt[:rank]
            resid = m - low
            score = jnp.abs(resid)
            _, top = jax.lax.top_k(score.reshape(-1), num)
            s = jnp.zeros(size, ct).at[top].set(resid.reshape(-1)[top]).reshape(m.shape)
    _, idx = jax.lax.top_k(score.reshape(-1), num)
    return jnp.sort(idx).astype(jnp.int32)


def dsee(
    rank: int,
    *,
    alpha: float = 32.0,
    num_sparse: int = 128,
    support: str = "residual",
    support_rank: int | None = None,
    support_iters: int = 1,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """DSEE: ``W' = W0 + (alpha/r)·(A@B + S2)`` with ``S2`` on a support chosen from ``W0``.

    Trainable per matrix: ``r·(in + out) + N``; frozen: the ``int32``
    support. Identity at init (``B = 0``, ``S2 = 0``). The support is chosen
    once at init from the pretrained slice (``dsee_support``; stacked
    kernels: per layer). Pruning the final weights: ``dsee_prune``.

    Args:
      rank: ``r`` of the low-rank update (the authors' default 4).
      alpha: ``s = alpha / r`` (the authors' default 32).
      num_sparse: ``N``, sparse entries per matrix (the authors' default 128).
      support: ``"residual"`` (the paper's rule), ``"magnitude"`` or
        ``"random"``.
      support_rank: rank of the low-rank part of the support decomposition
        (None: ``rank``); at most ``min(in, out)``.
      support_iters: rounds of the low-rank/sparse alternation for
        ``"residual"`` (1: the residual of the rank-``r`` SVD).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``; the support indexes this view.
      param_dtype: storage dtype of ``a``, ``b`` and ``values``.

    Returns:
      An ``Adapter`` with trainable ``DSEEParams(a, b, values)`` and frozen
      ``SparseSupport(indices)``; exact ``unfold``.

    Static arguments: all.

    Raises:
      ValueError: bad ``rank``/``alpha``/``num_sparse``/``support``/
        ``support_rank``/``support_iters``; at init ``rank`` or
        ``support_rank > min(in, out)``, or ``N > in·out``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = dsee(2, num_sparse=3)  # the authors' defaults are rank 4, N = 128
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.values.shape, f.indices.dtype
      ((3,), dtype('int32'))
      >>> bool((ad.apply(w, t, f) == w).all())
      True

    References:
      Chen et al., ACL 2023, https://arxiv.org/abs/2111.00160
    """
    rank = _lora.check_rank(rank, "dsee")
    num, iters = _positive(num_sparse, "num_sparse"), _positive(support_iters, "support_iters")
    k_dec = rank if support_rank is None else _positive(support_rank, "support_rank")
    if support not in _SUPPORTS:
        raise ValueError(f"dsee: support must be one of {_SUPPORTS}, got {support!r}")
    s = _lora.scaling_value(_lora.Scaling.ALPHA_OVER_RANK, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("dsee takes no stats")
        _lora.check_rank_fits(rank, w, "dsee")
        n_in, n_out = w.shape
        _sparse.sparse_num(n_in * n_out, k=num,
                           name=f"dsee on a matrix of shape {tuple(w.shape)}")
        k_a, k_s = jax.random.split(key)
        if support == "residual" and k_dec > min(n_in, n_out):
            raise ValueError(f"dsee: support_rank={k_dec} exceeds min(in, out) of the "
                             f"matrix view of shape {tuple(w.shape)}")
        idx = dsee_support(w, num, rank=k_dec, support=support, support_iters=iters,
                           key=k_s)
        a = 0.02 * jax.random.normal(k_a, (n_in, rank), param_dtype)
        return (DSEEParams(a=a,
                           b=jnp.zeros((rank, n_out), param_dtype),
                           values=jnp.zeros((num,), param_dtype)),
                _sparse.SparseSupport(idx))

    return _sltrain.low_rank_sparse_adapter(
        name=f"dsee(rank={rank}, alpha={alpha}, num_sparse={num}, support={support})",
        init_matrix=init_matrix,
        scale=s,
        sparse_scale=s,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("alpha", alpha), ("num_sparse", num),
                         ("support", support), ("support_rank", k_dec),
                         ("support_iters", iters)),
        relayout=lambda dims: dsee(rank, alpha=alpha, num_sparse=num, support=support,
                                   support_rank=support_rank, support_iters=iters,
                                   dimension_numbers=dims, param_dtype=param_dtype),
    )


def dsee_prune(w: jax.Array, sparsity: float | None = None, *,
               n_m: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """Magnitude-prunes a (merged) kernel ``w (..., in, out)``: DSEE's sparse final weights.

    Unstructured: the ``int(sparsity·in·out)`` smallest ``|w|`` of each
    ``(in, out)`` matrix become 0. ``n_m=(n, m)``: in each group of ``m``
    consecutive inputs (axis ``-2``) of every output column, the ``m - n``
    smallest become 0 (``N:M`` sparsity). Ties at the threshold keep the
    earlier positions.

    Args:
      w: the kernel, ``(in, out)`` or with leading batch axes.
      sparsity: fraction of zeros per matrix, in ``[0, 1)``.
      n_m: ``(n, m)`` with ``0 < n <= m`` and ``in % m == 0`` (exclusive with
        ``sparsity``).

    Returns:
      ``(pruned, mask)``: ``w·mask`` in ``w``'s dtype and the boolean mask.

    Raises:
      ValueError: both or neither of ``sparsity``/``n_m``, values out of range,
        ``in`` not divisible by ``m``.

    Example:
      >>> import jax.numpy as jnp
      >>> p, m = dsee_prune(jnp.array([[1.0, -4.0], [3.0, 2.0]]), 0.5)
      >>> p.tolist()
      [[0.0, -4.0], [3.0, 0.0]]
      >>> dsee_prune(jnp.array([[1.0], [-3.0], [2.0], [0.5]]), n_m=(2, 4))[0].ravel().tolist()
      [0.0, -3.0, 2.0, 0.0]
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError(f"dsee_prune: give exactly one of sparsity and n_m, got "
                         f"sparsity={sparsity!r}, n_m={n_m!r}")
    if w.ndim < 2:
        raise ValueError(f"dsee_prune: needs a matrix (..., in, out), got shape {w.shape}")
    mag = jnp.abs(w.astype(_lowrank.compute_dtype(jnp.float32, w.dtype)))
    n_in, n_out = w.shape[-2:]
    if sparsity is not None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"dsee_prune: sparsity must be in [0, 1), got {sparsity}")
        keep = n_in * n_out - int(float(sparsity) * n_in * n_out)
        flat = mag.reshape(mag.shape[:-2] + (-1,))
        # rank of each entry (0 = largest) by a stable descending argsort
        order = jnp.argsort(-flat, axis=-1, stable=True)
        ranks = jnp.argsort(order, axis=-1, stable=True)
        mask = (ranks < keep).reshape(w.shape)
    else:
        n, m = n_m
        if not (0 < n <= m) or n_in % m:
            raise ValueError(f"dsee_prune: n_m={n_m} needs 0 < n <= m and in={n_in} "
                             f"divisible by m (kernel shape {w.shape})")
        g = mag.reshape(mag.shape[:-2] + (n_in // m, m, n_out))
        order = jnp.argsort(-g, axis=-2, stable=True)
        ranks = jnp.argsort(order, axis=-2, stable=True)
        mask = (ranks < n).reshape(w.shape)
    return jnp.where(mask, w, jnp.zeros((), w.dtype)), mask
