# SPDX-License-Identifier: Apache-2.0
"""VectorFit: train the singular-value vector and the bias vector of each weight.

VectorFit: Adaptive Singular & Bias Vector Fine-Tuning of Pre-trained
Foundation Models. Hegde, Kaur & Tiwari, 2025. https://arxiv.org/abs/2503.19530

The paper decomposes each pre-trained weight by its thin SVD ``W = U Σ Vᵀ``,
freezes ``U`` and ``V`` and trains the singular-value vector ``Σ`` (all
``min(in, out)`` of them, a high-rank update ``ΔW = U ΔΣ Vᵀ``) together with
the layer's bias vector ``b``. Here the trainable leaves are the offsets
``δ_Σ = Σ' - Σ`` and ``δ_b = b' - b`` (both 0 at init), so that

``W' = W + U diag(δ_Σ) Vᵀ``,  ``b' = b + δ_b``

is the exact identity at init and never re-forms ``U Σ Vᵀ``. On a Flax
kernel ``K (in, out) = U S Vᵀ`` the torch-layout ``W = Kᵀ`` has the same
singular values (sides swapped), so both layouts train the same vector.

Adaptive Vector Freezing (AVF): every ``t_f`` steps the ``k`` vectors
(over all adapted matrices, each ``Σ`` and each ``b`` one
vector) with the largest training strength, the L1 distance from their
initial values (``‖δ‖₁`` here), are frozen for the next ``t_f`` steps and the
previously frozen ones are released; nothing is frozen before the first
refresh. ``vectorfit_avf_mask`` computes that selection as a mask (a pure
function of the trainable tree) and ``vectorfit_avf`` is the optax
transform that refreshes it every ``t_f`` steps and zeroes the frozen
vectors' updates (chain it after the optimizer). The authors have released
no code; this is transcribed from the paper's description.

Factored form: ``Δy = ((x U) ⊙ δ_Σ) Vᵀ``: ``2·n·(in + out)`` FLOPs per row with
``n = min(in, out)``, no ``(in, out)`` temporary; the bias offset is folded
into the bias leaf.

Exports: ``VectorFitParams``, ``VectorFitBasis``, ``VectorFitAVFState``,
``vectorfit``, ``vectorfit_avf_mask``, ``vectorfit_avf``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class VectorFitParams(NamedTuple):
    """Trainable VectorFit offsets (per matrix).

    Attributes:
      delta_s: ``(n,)`` offsets of all singular values, ``n = min(in, out)``.
      delta_b: ``(out,)`` offset of the sibling bias, or None when the bias
        is not trained.
    """

    delta_s: jax.Array
    delta_b: jax.Array | None = None


class VectorFitBasis(NamedTuple):
    """Frozen singular triplets of the base kernel (per matrix).

    Attributes:
      u: ``(in, n)`` left singular vectors of the kernel view ``(in, out)``.
      vt: ``(n, out)`` right singular vectors, transposed.
      singular_values: ``(n,)`` the base ``Σ`` (not used by ``apply``).
    """

    u: jax.Array
    vt: jax.Array
    singular_values: jax.Array


class VectorFitAVFState(NamedTuple):
    """State of ``vectorfit_avf``.

    Attributes:
      count: ``()`` int32, the number of updates so far.
      mask: the trainable tree's shape: 1.0 where the vector trains, 0.0
        where AVF froze it.
    """

    count: jax.Array
    mask: Any


def vectorfit(
    *,
    train_bias: bool = False,
    bias_name: str = "bias",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """VectorFit: ``W' = W + U diag(δ_Σ) Vᵀ`` and ``b' = b + δ_b``.

    ``U, V`` come from the exact SVD of the kernel view (float32 or wider, at init), so
    ``W'``'s singular values are ``Σ + δ_Σ`` (while non-negative and in order)
    with ``W``'s singular vectors. Identity at init. Trainable per matrix:
    ``min(in, out)``, plus ``out`` with ``train_bias``. For AVF see
    ``vectorfit_avf``.

    Args:
      train_bias: also train the sibling bias vector (the paper's setting for
        layers that have one); the kernel must then have a ``bias_name``
        sibling. Llama-style layers have none: leave it False.
      bias_name: last path component of the sibling bias leaf.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the offsets and the frozen basis.

    Returns:
      An ``Adapter`` with trainable ``VectorFitParams(delta_s, delta_b)`` and
      frozen ``VectorFitBasis(u, vt, singular_values)``.

    Static arguments: all.

    Raises:
      TypeError: ``train_bias`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = vectorfit()
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.delta_s.shape, t.delta_b, f.singular_values.tolist()
      ((3,), None, [3.0, 2.0, 1.0])
      >>> w2 = ad.apply(w, t._replace(delta_s=jnp.array([1.0, 0.5, 0.25])), f)
      >>> [round(x, 4) for x in jnp.linalg.svd(w2, compute_uv=False).tolist()]
      [4.0, 2.5, 1.25]

    References:
      Hegde et al., 2025, https://arxiv.org/abs/2503.19530
    """
    if not isinstance(train_bias, bool):
        raise TypeError(f"vectorfit: train_bias must be a bool, got {train_bias!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        del key  # deterministic: the basis is the weight's own SVD
        if stats is not None:
            raise ValueError("vectorfit takes no stats")
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        u, sv, vt = jnp.linalg.svd(w.astype(ct), full_matrices=False)
        basis = VectorFitBasis(u=u.astype(param_dtype), vt=vt.astype(param_dtype),
                               singular_values=sv.astype(param_dtype))
        delta_b = jnp.zeros((w.shape[1],), param_dtype) if train_bias else None
        return VectorFitParams(jnp.zeros(sv.shape, param_dtype), delta_b), basis

    def factors(t, f):
        # U diag(δ) Vᵀ = (U · δ) @ Vᵀ: δ scales the left factor's columns.
        return _lowrank.LowRank(left=f.u * t.delta_s.astype(f.u.dtype)[None, :],
                                right=f.vt)

    bias = None
    if train_bias:

        def bias_apply(b, t, f):
            c = _lowrank.compute_dtype(b.dtype, t.delta_b.dtype)
            return b.astype(c) + t.delta_b.astype(c)

        def bias_unapply(b, t, f):
            c = _lowrank.compute_dtype(b.dtype, t.delta_b.dtype)
            return b.astype(c) - t.delta_b.astype(c)

        bias = _protocol.BiasHook(name=bias_name, apply=bias_apply, unapply=bias_unapply,
                                  required=True)

    return _lift.lift_matrix(
        name=f"vectorfit(train_bias={train_bias})",
        init_matrix=init_matrix,
        bias=bias,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("train_bias", train_bias),),
        **_lowrank.low_rank_forms(factors),
    )


def _is_params(x: Any) -> bool:
    return isinstance(x, VectorFitParams)


def vectorfit_avf_mask(trainable: Any, num_frozen: int) -> Any:
    """AVF's selection: the ``num_frozen`` strongest-trained vectors, as a mask.

    Over every ``VectorFitParams`` in ``trainable`` (any pytree, stacked
    layers included: each layer's vector counts once), the training strength
    of a vector is ``‖δ‖₁``, its L1 distance from the initial value; the
    ``num_frozen`` largest are frozen. Other leaves always train.

    Args:
      trainable: a pytree holding ``VectorFitParams`` (an
        ``AdapterState.trainable`` dict).
      num_frozen: ``k``, the number of vectors to freeze (static).

    Returns:
      A pytree of ``trainable``'s structure and shapes, float32: 0.0 on the
      frozen vectors, 1.0 elsewhere.

    Raises:
      ValueError: ``num_frozen`` negative or more than the number of vectors.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"q": VectorFitParams(jnp.array([0.5, -0.5])),
      ...      "k": VectorFitParams(jnp.array([0.1, 0.0]), jnp.array([0.2, 0.0]))}
      >>> m = vectorfit_avf_mask(t, 1)
      >>> m["q"].delta_s.tolist(), m["k"].delta_s.tolist(), m["k"].delta_b.tolist()
      ([0.0, 0.0], [1.0, 1.0], [1.0, 1.0])
    """
    leaves, treedef = jax.tree.flatten(trainable, is_leaf=_is_params)
    vectors = []  # (leaf index, field) of every VectorFit vector array
    for i, leaf in enumerate(leaves):
        if _is_params(leaf):
            vectors += [(i, field) for field in leaf._fields
                        if getattr(leaf, field) is not None]
    strengths = [jnp.sum(jnp.abs(getattr(leaves[i], fld).astype(jnp.float32)), axis=-1)
                 for i, fld in vectors]
    sizes = [int(np.prod(s.shape)) for s in strengths]
    total = sum(sizes)
    if isinstance(num_frozen, bool) or not isinstance(
            num_frozen, (int, np.integer)) or not 0 <= num_frozen <= total:
        raise ValueError(f"vectorfit_avf_mask: num_frozen must be an int in [0, {total}] "
                         f"(the number of VectorFit vectors), got {num_frozen!r}")
    keep = jnp.ones((total,), jnp.float32)
    if num_frozen:
        flat = jnp.concatenate([s.reshape(-1) for s in strengths])
        _, top = jax.lax.top_k(flat, int(num_frozen))
        keep = keep.at[top].set(0.0)
    masks = {}
    start = 0
    for (i, fld), s, size in zip(vectors, strengths, sizes, strict=True):
        vec = keep[start:start + size].reshape(s.shape)
        masks[(i, fld)] = jnp.broadcast_to(vec[..., None], getattr(leaves[i], fld).shape)
        start += size
    out = []
    for i, leaf in enumerate(leaves):
        if _is_params(leaf):
            out.append(VectorFitParams(*[
                None if getattr(leaf, fld) is None else masks[(i, fld)]
                for fld in leaf._fields]))
        else:
            out.append(jnp.ones(jnp.shape(leaf), jnp.float32))
    return jax.tree.unflatten(treedef, out)


def vectorfit_avf(num_frozen: int, every: int) -> optax.GradientTransformation:
    """Adaptive Vector Freezing as an optax transform (chain it after the optimizer).

    Every ``every`` updates (the paper's ``t_f``; first at update ``every``)
    the mask is recomputed from the current parameters with
    ``vectorfit_avf_mask(params, num_frozen)`` and held until the next
    refresh; the frozen vectors' updates are zeroed, so they keep their
    values (their optimizer moments still accumulate: the wrapped optimizer
    sees every gradient). Needs ``params`` in ``update``.

    Args:
      num_frozen: ``k``, the number of vectors frozen at a time.
      every: ``t_f``, the refresh period in updates (``>= 1``).

    Returns:
      An ``optax.GradientTransformation`` with ``VectorFitAVFState``.

    Raises:
      ValueError: ``every < 1`` or ``num_frozen < 0``; at ``init``,
        ``num_frozen`` above the number of vectors.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> p = {"q": VectorFitParams(jnp.zeros(2)), "k": VectorFitParams(jnp.zeros(2))}
      >>> opt = optax.chain(optax.sgd(1.0), vectorfit_avf(1, every=2))
      >>> s = opt.init(p)
      >>> g = {"q": VectorFitParams(-jnp.ones(2)), "k": VectorFitParams(-3 * jnp.ones(2))}
      >>> @jax.jit
      ... def step(p, s):
      ...     u, s = opt.update(g, s, p)
      ...     return optax.apply_updates(p, u), s
      >>> for _ in range(3):
      ...     p, s = step(p, s)
      >>> p["q"].delta_s.tolist(), p["k"].delta_s.tolist()  # k froze at update 2
      ([3.0, 3.0], [6.0, 6.0])
    """
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"vectorfit_avf: every must be an int >= 1, got {every!r}")
    if isinstance(num_frozen, bool) or not isinstance(
            num_frozen, (int, np.integer)) or num_frozen < 0:
        raise ValueError(f"vectorfit_avf: num_frozen must be an int >= 0, got {num_frozen!r}")

    def init_fn(params):
        vectorfit_avf_mask(params, num_frozen)  # validates num_frozen against params
        ones = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.float32), params)
        return VectorFitAVFState(count=jnp.zeros((), jnp.int32), mask=ones)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("vectorfit_avf needs params in update (training strength)")
        refresh = (state.count > 0) & (state.count % every == 0)
        mask = jax.lax.cond(refresh, lambda: vectorfit_avf_mask(params, num_frozen),
                            lambda: state.mask)
        updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)
        return updates, VectorFitAVFState(count=state.count + 1, mask=mask)

    return optax.GradientTransformation(init_fn, update_fn)
