# SPDX-License-Identifier: Apache-2.0
"""HRA: a chain of Householder reflections on the weight's input side.

Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation. Yuan, Liu, Xu, Pan & Tan, NeurIPS 2024.
https://arxiv.org/abs/2405.17484

The paper (Eq. 3) adapts a frozen ``W (out, in)`` (torch layout) by ``r``
Householder reflections ``H_i = I - 2 u_i u_iᵀ / ‖u_i‖²`` of its input
space, ``W' = W · H_1 H_2 ⋯ H_r``; the product is orthogonal whatever the
``u_i``, so ``W'`` keeps ``W``'s singular values. Eq. 5's variant
orthogonalises the ``u_i`` first (Gram-Schmidt, PEFT's ``apply_GS``): with
``Q = GS(U)`` orthonormal, ``W' = W · (I - 2 Q Qᵀ)``. Hugging Face PEFT's
``tuners/hra`` (followed here, also for its files) stores ``U = hra_u (in,
r)`` and trains it without a regulariser. The paper's optional
orthogonality regulariser ``λ‖I - ÛᵀÛ‖²_F`` on the column-normalised
``Û`` (added to the task loss; it pushes the reflections towards mutual
orthogonality without Gram-Schmidt) is ``hra_orthogonality``: add
``λ · hra_orthogonality(trainable)`` to the loss.

On a Flax kernel ``W0 (in, out)`` (= ``Wᵀ``): ``W' = H_r ⋯ H_1 W0`` (each
``H_i`` symmetric), i.e. ``x ↦ x H_r ⋯ H_1`` before the base matmul;
``apply_GS``: ``W' = (I - 2 Q Qᵀ) W0``. ``unapply`` applies the reflections
in the other order (exact inverse up to rounding: ``H_i² = I``).

PEFT's ``reset_hra_parameters`` ↔ ``init``: for even ``r`` a kaiming-uniform
``(in, r/2)`` half (torch's fan-in = ``r/2``, bound ``sqrt(2/r)``) with each
column repeated twice, so consecutive reflections cancel and ``W' = W0`` at
init; for odd ``r`` (PEFT warns) or ``init_weights=False``, kaiming-uniform
``(in, r)`` (bound ``1/sqrt(r)``), not the identity.

Factored form: ``y = x W' = (x H_r ⋯ H_1) W0``, the reflections applied to
the input rows before the model's own base product (``FactoredTerms.in_map``):
``4·r·in`` FLOPs per row (``x - 2 (x·u) uᵀ``), never an ``(in, in)`` or
rotated ``(in, out)`` matrix, and no second base product. LoRA at HRA's
trainable count (``r·in = r'·(in+out)``) costs ``2·r'·(in+out) = 2·r·in``
per row, so HRA's factored path is twice LoRA's adapter FLOPs. An input map
cannot vary per example (``adapters.batched`` refuses HRA).

Exports: ``HRAParams``, ``hra``, ``hra_rotation``, ``hra_orthogonality``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class HRAParams(NamedTuple):
    """Trainable HRA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      u: ``(in, r)`` = PEFT ``hra_u``: column ``i`` is the (unnormalised)
        normal vector ``u_i`` of the ``i``-th reflection.
    """

    u: jax.Array


def _gram_schmidt(u: jax.Array) -> jax.Array:
    """``(in, r)`` orthonormal columns spanning ``u``'s leading columns (Eq. 5), PEFT's loop."""
    cols = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in cols:
            v = v - jnp.dot(q, v) * q
        cols.append(v / jnp.linalg.norm(v))
    return jnp.stack(cols, axis=1)


def _reflect_rows(m: jax.Array, u: jax.Array, apply_gs: bool, order: range) -> jax.Array:
    """``m (..., in)`` times the reflections, in ``order`` (rows are vectors of the input space)."""
    if apply_gs:
        q = _gram_schmidt(u)
        return m - 2.0 * (m @ q) @ q.T
    un = u / jnp.linalg.norm(u, axis=0, keepdims=True)
    for i in order:
        col = un[:, i:i + 1]
        m = m - 2.0 * (m @ col) @ col.T
    return m


def hra_rotation(u: jax.Array, *, apply_GS: bool = False) -> jax.Array:  # noqa: N803
    """The ``(in, in)`` orthogonal matrix ``R`` with ``W' = R · W0`` (Flax layout).

    ``R = H_r ⋯ H_1`` (``apply_GS``: ``I - 2 Q Qᵀ``), PEFT's
    ``get_delta_weight`` transposed. For tests and analysis: neither ``apply``
    nor the factored path forms it.

    Args:
      u: ``(in, r)`` reflection vectors (``HRAParams.u``).
      apply_GS: orthogonalise the vectors first (Eq. 5).

    Returns:
      ``(in, in)`` in ``u``'s dtype (float32 or wider for the computation).

    Example:
      >>> import jax.numpy as jnp
      >>> r = hra_rotation(jnp.ones((3, 1)))
      >>> bool(jnp.allclose(r @ r.T, jnp.eye(3), atol=1e-6))
      True
    """
    ct = _lowrank.compute_dtype(jnp.float32, u.dtype)
    eye = jnp.eye(u.shape[0], dtype=ct)
    # Rows of R = H_r ⋯ H_1 are e_j H_r ⋯ H_1 (each H_i symmetric).
    return _reflect_rows(eye, u.astype(ct), apply_GS, range(u.shape[1] - 1, -1, -1))


def hra(
    rank: int,
    *,
    apply_GS: bool = False,  # noqa: N803
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """HRA: ``W' = H_r ⋯ H_1 · W0`` with ``H_i = I - 2 u_i u_iᵀ / ‖u_i‖²`` (Eq. 3).

    ``u (in, r)`` is trainable (``r·in`` per matrix, PEFT's count); nothing is
    frozen. Identity at init for even ``r`` (paired columns). The factored
    path reflects the input rows before the base product (no second base
    product, see the module docstring); ``unapply`` reflects back. For the
    paper's orthogonality regulariser see ``hra_orthogonality``.

    Args:
      rank: ``r``, the number of reflections (static; PEFT's default 8).
      apply_GS: Gram-Schmidt-orthogonalise the ``u_i`` (Eq. 5; PEFT's
        ``apply_GS``): ``W' = (I - 2 Q Qᵀ) W0``. Needs ``r <= in``.
      init_weights: True (PEFT's default): the paired symmetric init, the
        identity for even ``r``; False: kaiming-uniform ``U(±1/sqrt(r))``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``u``.

    Returns:
      An ``Adapter`` with trainable ``HRAParams(u)`` and no frozen part.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; with ``apply_GS``, ``rank > in`` at init.
      TypeError: ``apply_GS`` or ``init_weights`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = hra(2)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.u.shape, f
      ((6, 2), None)
      >>> bool(jnp.allclose(ad.apply(w, t, f), w, atol=1e-6))
      True

    References:
      Yuan et al., NeurIPS 2024, https://arxiv.org/abs/2405.17484
    """
    rank = _lora.check_rank(rank, "hra")
    if not isinstance(apply_GS, bool):
        raise TypeError(f"hra: apply_GS must be a bool, got {apply_GS!r}")
    if not isinstance(init_weights, bool):
        raise TypeError(f"hra: init_weights must be a bool, got {init_weights!r}")
    param_dtype = jnp.dtype(param_dtype)
    forward = range(rank - 1, -1, -1)  # x H_r ⋯ H_1: u_r first
    backward = range(rank)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("hra takes no stats")
        n_in = w.shape[0]
        if apply_GS and rank > n_in:
            raise ValueError(f"hra: apply_GS needs rank <= in, got rank={rank} for a "
                             f"matrix view of shape {tuple(w.shape)}")
        if init_weights and rank % 2 == 0:
            bound = 1.0 / math.sqrt(rank // 2)
            half = jax.random.uniform(key, (n_in, rank // 2), param_dtype, -bound, bound)
            return HRAParams(u=jnp.repeat(half, 2, axis=1)), None
        bound = 1.0 / math.sqrt(rank)
        return HRAParams(u=jax.random.uniform(key, (n_in, rank), param_dtype, -bound, bound)), None

    def rotate(w, t, order):
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype, t.u.dtype)
        # W' = R W0: the columns of W0 are vectors of the input space.
        return _reflect_rows(w.astype(ct).T, t.u.astype(ct), apply_GS, order).T

    def apply_matrix(w, t, f):
        return rotate(w, t, backward)

    def unapply_matrix(w, t, f, aux):
        return rotate(w, t, forward)

    def factored_matrix(w, t, f):
        def in_map(x):
            ct = _lowrank.compute_dtype(x.dtype, t.u.dtype)
            return _reflect_rows(x.astype(ct), t.u.astype(ct), apply_GS,
                                 forward).astype(x.dtype)

        return _protocol.FactoredTerms(in_map=in_map)

    return _lift.lift_matrix(
        name=f"hra(rank={rank}" + (", apply_GS=True)" if apply_GS else ")"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("apply_GS", apply_GS),
                         ("init_weights", init_weights)),
    )


def hra_orthogonality(trainable: Any) -> jax.Array:
    """The HRA paper's orthogonality regulariser, summed over every HRA matrix.

    For each ``HRAParams`` in ``trainable`` (any pytree: an
    ``AdapterState.trainable`` dict, stacked layers included), the columns of
    ``U (in, r)`` are normalised to ``Û`` and ``‖I_r - ÛᵀÛ‖²_F`` is added; it is
    zero exactly when the reflection vectors are mutually orthogonal. Add
    ``λ · hra_orthogonality(trainable)`` to the task loss (the paper sweeps
    ``λ``; PEFT trains without it). Differentiable; computed in float32 or
    wider.

    Args:
      trainable: a pytree holding ``HRAParams`` leaves (others are ignored).

    Returns:
      A scalar (0.0 when there is no HRA matrix).

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"q": HRAParams(u=jnp.eye(4)[:, :2] * 3.0)}
      >>> float(hra_orthogonality(t))
      0.0
      >>> float(hra_orthogonality({"q": HRAParams(u=jnp.ones((4, 2)))}))
      2.0
    """
    total = jnp.zeros((), jnp.float32)
    for p in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, HRAParams)):
        if not isinstance(p, HRAParams):
            continue
        ct = _lowrank.compute_dtype(jnp.float32, p.u.dtype)
        u = p.u.astype(ct)
        un = u / jnp.linalg.norm(u, axis=-2, keepdims=True)
        gram = jnp.swapaxes(un, -1, -2) @ un
        eye = jnp.broadcast_to(jnp.eye(u.shape[-1], dtype=ct), gram.shape)
        total = total + jnp.sum((gram - eye) ** 2).astype(total.dtype)
    return total
