# SPDX-License-Identifier: Apache-2.0
"""MiCA: a frozen ``B`` spanning the weight's minor singular directions, ``A`` trains.

Minor Component Adaptation. https://arxiv.org/abs/2604.01694 (PEFT 0.21.2
``init_lora_weights="mica"``: ``tuners/lora/layer.py::mica_init`` and
``tuners/lora/variants.py::MiCALinearVariant``).

Torch layout ``W (out, in) = U S Vhᵀ`` (float32 SVD, ``S`` descending):
``B = U[:, -r:]`` (the left singular vectors of the ``r`` *smallest*
singular values, the minor components) is **frozen** and ``A = 0`` trains;
``ΔW = s·B A`` is zero at init, so the base is not modified. Forward and
merge are LoRA's. Flax kernel ``K = Wᵀ = U_K S V_Kᵀ`` (so ``U = V_K``):
``b = Bᵀ = V_Kᵀ[-r:]`` ``(r, out)`` frozen, ``a = Aᵀ = 0`` ``(in, r)``
trainable (↔ ``mica``). Trainable parameters: ``r·in`` per matrix (PEFT's
count: ``lora_B`` is registered as a frozen PEFT weight).

Exports: ``MiCAParams``, ``MiCABasis``, ``mica``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _common, _linalg


class MiCAParams(NamedTuple):
    """Trainable factor.

    Attributes:
      a: ``(in, r)`` (``lora_A.T``), zero at init.
    """

    a: jax.Array


class MiCABasis(NamedTuple):
    """Frozen factor.

    Attributes:
      b: ``(r, out)`` (``lora_B.T``): orthonormal rows, the minor directions.
    """

    b: jax.Array


def mica(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _base.Initializer:
    """MiCA: frozen ``b`` = minor singular directions of the kernel, trainable ``a = 0``.

    The adapter (``inits.mica(r).adapter``, usable with ``adapters.init``
    directly too: it needs only the weight) is ``W' = W + s·a@b`` with
    trainable ``MiCAParams(a)`` and frozen ``MiCABasis(b)``; factored form
    ``x@W + s·(x@a)@b`` (``2r·(in+out)`` FLOPs per row, LoRA's). The base is
    unchanged. Trainable parameters: ``r·in`` per matrix; frozen ``r·out``.
    Export with ``inits.to_lora`` (a rank-``r`` plain LoRA, ``b`` copied).

    Args:
      rank: ``r`` (``<= min(in, out)``).
      alpha: ``lora_alpha``.
      scaling: ``adapters.Scaling`` member.
      dimension_numbers: the kernels' matrix view.
      param_dtype: dtype of the factors.
      dropout: adapter-input dropout (PEFT ``lora_dropout``; factored path only).

    Returns:
      An ``Initializer`` whose adapter has ``MiCAParams`` / ``MiCABasis`` state.

    Raises:
      ValueError: non-positive rank; at init, rank larger than ``min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import inits, tree
      >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.mica(rank=1))])
      >>> st = inits.run(plan, jax.random.key(0), params).state
      >>> st.trainable["w"].a.shape, jnp.abs(st.frozen["w"].b).tolist()
      ((3, 1), [[0.0, 0.0, 1.0]])

    References:
      https://arxiv.org/abs/2604.01694
    """
    rank = _adapters.check_rank(rank, "mica")
    param_dtype = jnp.dtype(param_dtype)
    s = _adapters.scaling_value(scaling, alpha, rank)

    def adapter_init(key, w, stats):
        if stats is not None:
            raise ValueError("mica takes no stats")
        _common.check_fits(rank, w, "mica")
        _, _, vt = _linalg.svd(w)
        b = vt[vt.shape[0] - rank:]
        a = jnp.zeros((w.shape[0], rank), param_dtype)
        return MiCAParams(a=a), MiCABasis(b=b.astype(param_dtype))

    def delta(w, t, f):
        ct = _adapters.compute_dtype(w.dtype, t.a.dtype)
        return ct, (t.a.astype(ct) @ f.b.astype(ct)) * jnp.asarray(s, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        def term(x):
            ct = _adapters.compute_dtype(x.dtype, t.a.dtype)
            h = (x.astype(ct) @ t.a.astype(ct)) * jnp.asarray(s, ct)
            return h @ f.b.astype(ct)
        return _adapters.FactoredTerms(delta=term)

    adapter = _adapters.lift_matrix(
        name=f"mica(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=adapter_init, apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix, factored_matrix=factored_matrix,
        dimension_numbers=dimension_numbers, dropout=dropout,
        hyperparameters=(("rank", rank), ("alpha", alpha), ("scaling", scaling),
                         ("dropout", dropout)))

    def init_matrix(key, w, stats):
        t, f = adapter_init(key, w, stats)
        return w, t, f

    return _base.Initializer(
        init=_base.lift("mica", init_matrix, dimension_numbers, None),
        adapter=adapter, stats=None, modifies_base=False, rank=rank,
        alpha=float(alpha), scaling=scaling, dimension_numbers=dimension_numbers,
        param_dtype=param_dtype,
        name=f"mica(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        relayout=lambda dims: mica(rank, alpha=alpha, scaling=scaling,
                                   dimension_numbers=dims, param_dtype=param_dtype,
                                   dropout=dropout))
