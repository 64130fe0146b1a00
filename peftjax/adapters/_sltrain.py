# SPDX-License-Identifier: Apache-2.0
"""SLTrain: a low-rank plus fixed-support sparse weight, ``W = s·BA ⊕_Ω S``.

SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining. Han, Li, Lin, Hong, Mishra & Kasai, NeurIPS 2024.
https://arxiv.org/abs/2406.02214 (authors' code: github.com/andyjm3/SLTrain)

The paper parametrises each linear weight as the sum of a low-rank product
and a sparse matrix with a random support ``Ω`` fixed at initialisation,
``W = BA ⊕_Ω S`` (§3, "SLTrain"), where ``⊕_Ω`` scatter-adds the ``|Ω|``
trainable values of ``S`` into the product. The authors' ``SpLoRaLinear``
(followed here) scales the product by ``s = lora_alpha / r``, draws ``Ω`` as
a uniform random ``int(δ·in·out)``-subset of the flat positions, sorted, and
initialises ``A`` kaiming-uniform (``U(±1/sqrt(in))``), ``B = 0`` and the
sparse values ``U(±1/sqrt(in))``; its pre-training scripts use ``δ = 0.03``
and ``lora_alpha = 32``.

Two uses, one parametrisation ``W' = W0 + s·A@B ⊕_Ω S`` (Flax ``(in, out)``
layout: ``a = A_torchᵀ (in, r)``, ``b = B_torchᵀ (r, out)``; a flat position
``p`` of ``Ω`` is entry ``(p // out, p % out)`` of the leaf's ``(in, out)``
matrix view, row-major (as ``sparse_delta``, but any view is allowed,
transposed or head-split kernels included, since nothing exports the flat
positions), whereas the authors index the torch ``(out, in)`` weight:
``p_torch = j·in + i``):

* ``from_scratch=True`` (the paper's pre-training): the sparse values start at
  ``U(±1/sqrt(in))`` as in the authors' code, and the frozen base ``W0`` is
  the zero matrix: the model holds no dense weight (give the adapter a zero
  kernel, e.g. ``jnp.zeros``; ``W0 = 0`` makes ``W'`` exactly ``s·BA ⊕_Ω S``).
* ``from_scratch=False`` (default; fine-tuning a pretrained ``W0``): the
  sparse values start at 0 (with ``B = 0``), so ``W' = W0`` at init.

Trainable parameters per matrix: ``r·(in + out) + int(δ·in·out)``; frozen:
the ``int32`` support (``4·|Ω|`` bytes). ``unapply`` subtracts the same terms
(exact up to rounding).

Factored form: ``y = x W0 + s·(x a) b + scatter(x[rows]·values, cols)``, a
``FactoredTerms.delta`` of ``2·r·(in + out) + 2·|Ω|`` FLOPs per row (a gather
and a scatter-add of ``|Ω|`` entries), never an ``(in, out)`` temporary.

Exports: ``SLTrainParams``, ``sltrain``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _sparse


class SLTrainParams(NamedTuple):
    """Trainable SLTrain parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` = the authors' ``lora_A`` transposed.
      b: ``(r, out)`` = the authors' ``lora_B`` transposed.
      values: ``(k,)`` the sparse matrix's values at the frozen support
        (``SparseSupport.indices``), the authors' ``sparse_value``.
    """

    a: jax.Array
    b: jax.Array
    values: jax.Array


def check_density(density: Any, name: str) -> float:
    """Validates a density in ``(0, 1)`` (a Python float)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name}: density must be a float in (0, 1), got {density!r}")
    if not 0.0 < float(density) < 1.0:
        raise ValueError(f"{name}: density must be in (0, 1), got density={density}")
    return float(density)


def sparse_rows_delta(x: jax.Array, values: jax.Array, indices: jax.Array,
                      n_out: int) -> jax.Array:
    """``x @ S`` for the sparse ``S`` with ``values`` at flat ``indices`` of ``(in, out)``."""
    rows, cols = indices // n_out, indices % n_out
    ct = _lowrank.compute_dtype(x.dtype, values.dtype)
    vals = values.astype(ct).reshape((1,) * (x.ndim - 1) + (-1,))
    contrib = x[..., rows].astype(ct) * vals
    return jnp.zeros(x.shape[:-1] + (n_out,), ct).at[..., cols].add(contrib)


def low_rank_sparse_adapter(
    *,
    name: str,
    init_matrix: Callable[..., tuple[Any, Any]],
    scale: float,
    sparse_scale: float,
    dimension_numbers: tree.DimensionNumbers | None,
    hyperparameters: tuple[tuple[str, Any], ...],
    relayout: Callable[[tree.DimensionNumbers], _protocol.Adapter],
) -> _protocol.Adapter:
    """``W' = W + s·a@b ⊕ s_S·scatter(indices, values)``: the shared forms of SLTrain and DSEE.

    ``init_matrix`` returns ``(params with a, b, values; SparseSupport)``.
    """

    def delta(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype, t.values.dtype)
        d = (t.a.astype(ct) @ t.b.astype(ct)) * jnp.asarray(scale, ct)
        vals = t.values.astype(ct) * jnp.asarray(sparse_scale, ct)
        return ct, d.reshape(-1).at[f.indices].add(vals, unique_indices=True).reshape(w.shape)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        n_out = w.shape[1]

        def term(x):
            lr = _lowrank.low_rank(x, t.a, t.b, scale)
            sp = sparse_rows_delta(x, t.values, f.indices, n_out)
            if sparse_scale != 1.0:
                sp = sp * jnp.asarray(sparse_scale, sp.dtype)
            ct = _lowrank.compute_dtype(lr.dtype, sp.dtype)
            return lr.astype(ct) + sp.astype(ct)

        return _protocol.FactoredTerms(delta=term)

    return _lift.lift_matrix(
        name=name,
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=hyperparameters,
    )._replace(relayout=relayout)


def sltrain(
    rank: int,
    *,
    alpha: float = 32.0,
    density: float = 0.03,
    from_scratch: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SLTrain: ``W' = W0 + (alpha/r)·A@B ⊕_Ω S`` with a fixed random support ``Ω``.

    ``a (in, r)``, ``b (r, out)`` and the ``|Ω| = int(density·in·out)``
    sparse values are trainable; the sorted ``int32`` support is frozen
    (``SparseSupport``, as ``sparse_delta``'s). Fine-tuning
    (``from_scratch=False``): identity at init (``B = 0``, ``S = 0``).
    Pre-training (``from_scratch=True``): the sparse values start at
    ``U(±1/sqrt(in))`` (the authors' init) and the base kernel must be the
    zero matrix (the model has no dense weight). Factored form: a low-rank
    plus gather/scatter ``delta`` (module docstring).

    Args:
      rank: ``r`` (static; ``<= min(in, out)``).
      alpha: the authors' ``lora_alpha``; ``s = alpha / r`` (their scripts: 32).
      density: ``δ``, the fraction of each matrix in the support, in
        ``(0, 1)`` (their scripts: 0.03).
      from_scratch: True for pre-training from scratch (non-zero sparse init,
        zero base), False to fine-tune a pretrained base (identity at init).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``; the support indexes this view.
      param_dtype: storage dtype of ``a``, ``b`` and ``values``.

    Returns:
      An ``Adapter`` with trainable ``SLTrainParams(a, b, values)`` and frozen
      ``SparseSupport(indices)``; exact ``unfold``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``, ``density`` outside
        ``(0, 1)``; at init ``rank > min(in, out)`` or an empty support.
      TypeError: ``from_scratch`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = sltrain(2, alpha=4.0, density=0.25)
      >>> w = jnp.ones((8, 6))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, t.values.shape, f.indices.shape
      ((8, 2), (2, 6), (12,), (12,))
      >>> bool((ad.apply(w, t, f) == w).all())
      True

    References:
      Han et al., NeurIPS 2024, https://arxiv.org/abs/2406.02214
    """
    rank = _lora.check_rank(rank, "sltrain")
    density = check_density(density, "sltrain")
    if not isinstance(from_scratch, bool):
        raise TypeError(f"sltrain: from_scratch must be a bool, got {from_scratch!r}")
    s = _lora.scaling_value(_lora.Scaling.ALPHA_OVER_RANK, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    name = (f"sltrain(rank={rank}, alpha={alpha}, density={density}"
            + (", from_scratch=True)" if from_scratch else ")"))

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("sltrain takes no stats")
        _lora.check_rank_fits(rank, w, "sltrain")
        n_in, n_out = w.shape
        num = _sparse.sparse_num(n_in * n_out, density=density,
                                 name=f"sltrain on a matrix of shape {tuple(w.shape)}")
        k_a, k_idx, k_val = jax.random.split(key, 3)
        a = _lora.kaiming_uniform_a(k_a, n_in, rank, param_dtype)
        b = jnp.zeros((rank, n_out), param_dtype)
        idx = jnp.sort(jax.random.permutation(k_idx, n_in * n_out)[:num]).astype(jnp.int32)
        if from_scratch:
            bound = 1.0 / math.sqrt(n_in)
            values = jax.random.uniform(k_val, (num,), param_dtype, -bound, bound)
        else:
            values = jnp.zeros((num,), param_dtype)
        return SLTrainParams(a=a, b=b, values=values), _sparse.SparseSupport(idx)

    return low_rank_sparse_adapter(
        name=name,
        init_matrix=init_matrix,
        scale=s,
        sparse_scale=1.0,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("alpha", alpha), ("density", density),
                         ("from_scratch", from_scratch)),
        relayout=lambda dims: sltrain(rank, alpha=alpha, density=density,
                                      from_scratch=from_scratch, dimension_numbers=dims,
                                      param_dtype=param_dtype),
    )
