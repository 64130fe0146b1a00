# SPDX-License-Identifier: Apache-2.0
"""SALT: scale and shift of the top singular values, LoRA on the residual singular subspace.

SALT: Singular Value Adaptation with Low-Rank Transformation. Elsayed,
Hashmi, Elseiagy, Wang, Yaqub & Almakky, BMVC 2025.
https://arxiv.org/abs/2503.16055 (authors' code:
https://github.com/BioMedIA-MBZUAI/SALT, ``SALTLinear``).

The paper (§3, Method) keeps the full SVD ``W = U Σ Vᵀ`` of the frozen
weight (``k = min(in, out)`` triplets) and modifies only its singular-value
matrix: the top ``r`` singular values get a trainable scale and shift,
``σ_i ↦ α_i σ_i + β_i``, and the ``k - r`` residual ones a low-rank update
in the singular-vector coordinates, ``Σ_res ↦ Σ_res + X Y`` (``X (k-r,
r_lora)``, ``Y (r_lora, k-r)``); the new matrix passes through a ReLU and

``W' = U · ReLU(Σ') · Vᵀ``,   ``Σ' = diag(α ⊙ σ_top + β) ⊕ (Σ_res + X Y)``.

The authors' ``SALTLinear`` applies the ReLU to every entry of ``Σ'``
(also the off-diagonal entries of the residual block), and so does this
module. Their regulariser (``reg_loss``, weighted by the training config's
``reg_multiplier``, 0 in their released config) is ``‖diag(α ⊙ σ_top + β -
σ_top)‖_F + ‖X Y‖_F`` per layer: ``salt_loss``. Defaults follow the
authors' SAM 2 code: ``r = max(1, ⌊0.1·k⌋)`` (``ratio_salt``), ``r_lora =
8`` (``SALTLinear``'s default); init ``α = 1``, ``β = 0``, one LoRA factor
zero and the other kaiming-uniform with ReLU gain (``U(±√(6/r_lora))``), so
``W' = W`` at init.

Here (Flax kernel ``W0 (in, out) = Wᵀ = Ũ Σ Ṽᵀ``, the frozen ``u = Ũ (in,
k)``, ``s = σ (k,)``, ``vt = Ṽᵀ (k, out)`` from a float32 SVD at ``init``)
the update is added to ``W0`` rather than ``W0`` rebuilt, so the identity at
init is exact::

    W' = W0 + u_top diag(ReLU(α ⊙ s_top + β) - s_top) vt_top
            + u_res (ReLU(diag(s_res) + x y) - diag(s_res)) vt_res

with ``x (k-r, r_lora)``, ``y (r_lora, k-r)``. In Flax coordinates the
residual block is the transpose of the authors' (``x = Yᵀ``, ``y = Xᵀ``:
the zero factor is ``x``). Trainable: ``2r + 2·(k-r)·r_lora`` per matrix;
frozen: the full SVD, ``k·(in + out + 1)``.

No factored form: the ReLU of the dense ``(k-r)²`` block makes the update
full-rank in the residual subspace, and applying it to a row costs
``2·k·(in + out) + (k-r)²`` FLOPs, more than the base product itself; the
factored path materialises ``W'`` (with a warning).

Exports: ``SALTParams``, ``SALTBasis``, ``salt``, ``salt_rank``, ``salt_loss``.
"""

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class SALTParams(NamedTuple):
    """Trainable SALT parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      scale: ``(r,)`` ``α``, the top singular values' scale (init 1).
      shift: ``(r,)`` ``β``, their shift (init 0).
      x: ``(k-r, r_lora)`` left factor of the residual update (init 0).
      y: ``(r_lora, k-r)`` right factor (kaiming-uniform).
    """

    scale: jax.Array
    shift: jax.Array
    x: jax.Array
    y: jax.Array


class SALTBasis(NamedTuple):
    """The frozen full SVD of the kernel view ``W0 (in, out) = u diag(s) vt``.

    Attributes:
      u: ``(in, k)`` left singular vectors.
      s: ``(k,)`` singular values, descending.
      vt: ``(k, out)`` right singular vectors (transposed).
    """

    u: jax.Array
    s: jax.Array
    vt: jax.Array


def salt_rank(rank: int | float, n_in: int, n_out: int) -> int:
    """The number ``r`` of scaled-and-shifted singular values of an ``(in, out)`` matrix.

    Args:
      rank: an int (the count) or a float in ``(0, 1)`` (the authors'
        ``ratio_salt``: ``max(1, ⌊ratio·k⌋)``, ``k = min(in, out)``).
      n_in, n_out: the matrix view's sizes.

    Returns:
      ``r``.

    Raises:
      ValueError: ``r >= k`` (no residual subspace is left).

    Example:
      >>> salt_rank(0.1, 576, 192), salt_rank(3, 8, 6)
      (19, 3)
    """
    k = min(n_in, n_out)
    r = rank if isinstance(rank, int) else max(1, int(k * rank))
    if r >= k:
        raise ValueError(f"salt: rank={rank!r} gives r={r} >= min(in, out)={k} of the "
                         f"matrix view (in={n_in}, out={n_out}); no residual singular "
                         "subspace would be left")
    return r


def salt(
    rank: int | float = 0.1,
    *,
    lora_rank: int = 8,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SALT: ``W' = U·ReLU(diag(α⊙σ_top + β) ⊕ (Σ_res + XY))·Vᵀ`` over ``W``'s full SVD.

    Trainable: ``2r + 2·(k-r)·r_lora`` per matrix (``k = min(in, out)``);
    frozen: the SVD, ``k·(in + out + 1)``. Identity at init. Weight space
    only (no factored form, see the module docstring). ``salt_loss`` is the
    authors' regulariser.

    Args:
      rank: ``r``, the number of top singular values that are scaled and
        shifted: an int, or a float in ``(0, 1)`` for ``max(1, ⌊rank·k⌋)``
        (the authors' ``ratio_salt``; default 0.1, their SAM 2 setting).
        Must leave ``r < k``.
      lora_rank: ``r_lora``, the rank of the residual update (default 8).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the parameters and of the basis.

    Returns:
      An ``Adapter`` with trainable ``SALTParams(scale, shift, x, y)`` and
      frozen ``SALTBasis(u, s, vt)``.

    Static arguments: all.

    Raises:
      ValueError: ``rank`` not a positive int or a float in ``(0, 1)``,
        ``lora_rank <= 0``; at init, ``r >= min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = salt(1, lora_rank=2)
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 0.5]))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.scale.shape, t.x.shape, t.y.shape, f.s.tolist()
      ((1,), (2, 2), (2, 2), [3.0, 2.0, 0.5])
      >>> t = t._replace(scale=jnp.array([2.0]), shift=jnp.array([-1.0]))
      >>> [round(v, 4) for v in jnp.diag(ad.apply(w, t, f)).tolist()]
      [5.0, 2.0, 0.5]

    References:
      Elsayed et al., BMVC 2025, https://arxiv.org/abs/2503.16055
    """
    if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, float)):
        raise ValueError(f"salt: rank must be a positive int or a float in (0, 1), "
                         f"got {rank!r}")
    if isinstance(rank, numbers.Integral):
        rank = _lora.check_rank(rank, "salt")
    elif not 0.0 < rank < 1.0:
        raise ValueError(f"salt: a float rank is a ratio in (0, 1), got rank={rank!r}")
    lora_rank = _lora.check_rank(lora_rank, "salt (lora_rank)")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("salt takes no stats")
        n_in, n_out = w.shape
        r = salt_rank(rank, n_in, n_out)
        k = min(n_in, n_out)
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        u, s, vt = jnp.linalg.svd(w.astype(ct), full_matrices=False)
        bound = math.sqrt(6.0 / lora_rank)  # kaiming-uniform, ReLU gain, fan-in r_lora
        t = SALTParams(scale=jnp.ones((r,), param_dtype),
                       shift=jnp.zeros((r,), param_dtype),
                       x=jnp.zeros((k - r, lora_rank), param_dtype),
                       y=jax.random.uniform(key, (lora_rank, k - r), param_dtype,
                                            -bound, bound))
        return t, SALTBasis(u.astype(param_dtype), s.astype(param_dtype),
                            vt.astype(param_dtype))

    def delta(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.x.dtype, f.u.dtype)
        r = t.scale.shape[0]
        u, s, vt = f.u.astype(ct), f.s.astype(ct), f.vt.astype(ct)
        top = jax.nn.relu(t.scale.astype(ct) * s[:r] + t.shift.astype(ct)) - s[:r]
        res_diag = jnp.diag(s[r:])
        res = jax.nn.relu(res_diag + t.x.astype(ct) @ t.y.astype(ct)) - res_diag
        return ct, (u[:, :r] * top[None, :]) @ vt[:r] + (u[:, r:] @ res) @ vt[r:]

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    return _lift.lift_matrix(
        name=f"salt(rank={rank}, lora_rank={lora_rank})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("lora_rank", lora_rank)),
    )


def _fro(m: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Euclidean/Frobenius norm over ``axes``, with a zero (not NaN) gradient at 0."""
    sq = jnp.sum(m ** 2, axis=axes)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def salt_loss(trainable: dict[str, Any], frozen: dict[str, Any]) -> jax.Array:
    """The SALT authors' regulariser, summed over SALT matrices.

    Per matrix (each layer of a stacked leaf on its own): ``‖α ⊙ σ_top + β
    - σ_top‖₂ + ‖x y‖_F`` (``SALTLinear``'s ``reg_loss``: the Frobenius norms
    of the scale-shift change and of the residual update, before the ReLU).
    Multiply by a weight (their ``reg_multiplier``) and add it to the task
    loss. Differentiable (a zero gradient where a norm is 0, as at init);
    computed in float32 or wider.

    Args:
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen`` (the singular values).

    Returns:
      A scalar (0.0 without SALT leaves).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=salt(1, lora_rank=1))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> t = {"w": st.trainable["w"]._replace(shift=jnp.array([0.5]))}
      >>> float(salt_loss(t, st.frozen))
      0.5
    """
    total = jnp.zeros((), jnp.float32)
    for p, t in trainable.items():
        if not isinstance(t, SALTParams):
            continue
        f = frozen.get(p)
        if not isinstance(f, SALTBasis):
            raise ValueError(f"salt_loss: {p!r} holds SALTParams but its frozen part "
                             f"is {type(f).__name__}, not a SALTBasis")
        ct = _lowrank.compute_dtype(jnp.float32, t.x.dtype, f.s.dtype)
        r = t.scale.shape[-1]
        s_top = f.s.astype(ct)[..., :r]
        change = t.scale.astype(ct) * s_top + t.shift.astype(ct) - s_top
        xy = t.x.astype(ct) @ t.y.astype(ct)
        loss = jnp.sum(_fro(change, (-1,))) + jnp.sum(_fro(xy, (-2, -1)))
        total = total + loss.astype(total.dtype)
    return total
