# SPDX-License-Identifier: Apache-2.0
"""SPP: sparsity-preserving column/row scaling of a pruned weight, with a residual.

SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language
Models. Lu, Zhou, Xu, Zhang, Gao & Li, ICML 2024.
https://arxiv.org/abs/2405.16057 (authors' code: github.com/Lucky-Lance/SPP)

SPP fine-tunes an already pruned ``W`` (unstructured or ``N:M``) with two
small trainable matrices that multiply ``W`` element-wise, added to ``W`` as a
residual (the paper's Eq. (5), its Fig. 4): ``W' = W + s·(W_α ⊙ W_β) ⊙ W``,
where ``W_α`` is ``r`` row vectors over the inputs, each repeated for a block
of ``out/r`` consecutive outputs, and ``W_β`` one scale per output. Every
entry of the update is a multiple of the same entry of ``W``, so ``W'`` keeps
``W``'s zero mask (and with it any ``N:M`` pattern) in training and after
merging. The authors' ``DiagonalLinear`` (followed here) stores ``W_α`` as
``weight (r, in)`` with ``r = 16``, kaiming-uniform (``U(±1/sqrt(in))``), and
``W_β`` as ``weight_col (out, 1)`` initialised to 0 (identity at init); the
scale is their LoRA ``lora_alpha / lora_r = 16 / 8 = 2``. Torch layout:
``ΔW[j, i] = s·weight[j // (out/r), i]·weight_col[j]·W[j, i]``.

Flax layout (``W0 (in, out)``): ``a = weightᵀ (in, r)``, ``c = weight_col
(out,)``, ``g = out / r`` (``out`` must be divisible by ``r``)::

    W'[i, j] = W0[i, j] · (1 + s · a[i, j // g] · c[j])

``unapply`` divides by the same factor (exact up to rounding where
``1 + s·a·c ≠ 0``; a zero factor erases the entry, which cannot be undone).

Factored form: ``y = x W0 + s · c ⊙ [(x ⊙ a[:, k]) @ W0[:, block k]]_k``,
the authors' memory-saving forward: ``in·r`` multiplies for the scaled
inputs plus a second product with the base, ``2·in·out`` FLOPs per row, and
no ``(in, out)`` temporary (``W0`` is only reshaped to ``(in, r, g)``).
Trainable per matrix: ``r·in + out``.

Exports: ``SPPParams``, ``spp``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class SPPParams(NamedTuple):
    """Trainable SPP parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` = the authors' ``weight`` (``W_α``) transposed.
      c: ``(out,)`` = the authors' ``weight_col`` (``W_β``).
    """

    a: jax.Array
    c: jax.Array


def spp(
    rank: int = 16,
    *,
    scale: float = 2.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SPP: ``W' = W0 ⊙ (1 + s·a[:, j // (out/r)]·c[j])``: keeps ``W0``'s zeros (Eq. (5)).

    ``a (in, r)`` starts kaiming-uniform and ``c (out,)`` at 0, so ``W' =
    W0`` at init; any zero of ``W0`` stays zero whatever the parameters (the
    mask and ``N:M`` pattern of a pruned base survive merging). Factored:
    a second product with the base (module docstring).

    Args:
      rank: ``r``, the number of input-scale rows (the authors' fixed 16);
        ``out`` must be divisible by it.
      scale: ``s`` (the authors' ``lora_alpha / lora_r = 16 / 8``).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a`` and ``c``.

    Returns:
      An ``Adapter`` with trainable ``SPPParams(a, c)`` and no frozen part;
      ``unfold`` divides by the factor.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, a non-finite ``scale``; at init ``out`` not
        divisible by ``rank``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = spp(2)
      >>> w = jnp.array([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]])
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.c.shape
      ((2, 2), (4,))
      >>> w2 = ad.apply(w, t._replace(c=jnp.ones(4)), f)
      >>> bool(((w2 == 0) == (w == 0)).all())
      True

    References:
      Lu et al., ICML 2024, https://arxiv.org/abs/2405.16057
    """
    rank = _lora.check_rank(rank, "spp")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(
            scale):
        raise ValueError(f"spp: scale must be a finite number, got scale={scale!r}")
    s = float(scale)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("spp takes no stats")
        n_in, n_out = w.shape
        if n_out % rank:
            raise ValueError(f"spp: out={n_out} of the matrix view of shape "
                             f"{tuple(w.shape)} is not divisible by rank={rank}")
        return SPPParams(a=_lora.kaiming_uniform_a(key, n_in, rank, param_dtype),
                         c=jnp.zeros((n_out,), param_dtype)), None

    def factor(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype, t.c.dtype)
        g = w.shape[1] // rank
        rows = jnp.repeat(t.a.astype(ct), g, axis=1)  # (in, out): a[i, j // g]
        return ct, 1.0 + jnp.asarray(s, ct) * rows * t.c.astype(ct)[None, :]

    def apply_matrix(w, t, f):
        ct, fac = factor(w, t)
        return w.astype(ct) * fac

    def unapply_matrix(w, t, f, aux):
        ct, fac = factor(w, t)
        return w.astype(ct) / fac

    def factored_matrix(w, t, f):
        n_in, n_out = w.shape
        g = n_out // rank

        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, t.a.dtype, w.dtype)
            blocks = w.astype(ct).reshape(n_in, rank, g)
            h = jnp.einsum("...i,ik,ikj->...kj", x.astype(ct), t.a.astype(ct), blocks)
            h = h.reshape(x.shape[:-1] + (n_out,))
            col = (jnp.asarray(s, ct) * t.c.astype(ct)).reshape((1,) * (h.ndim - 1) + (-1,))
            return h * col

        return _protocol.FactoredTerms(delta=delta)

    return _lift.lift_matrix(
        name=f"spp(rank={rank}, scale={s})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("scale", s)),
    )
