# SPDX-License-Identifier: Apache-2.0
"""FRoD: a shared basis per module role, trained spectrum plus a sparse rotation.

FRoD (Hugging Face PEFT 0.21.2 ``tuners/frod``; paper: AAAI 2026,
https://doi.org/10.1609/aaai.v40i31.39813, no arXiv version). PEFT's
implementation is followed throughout, also for its files; equation numbers
are not cited because PEFT's code is the reference here.

For every module role (PEFT's "category": ``self_attn_q_proj``, ``mlp_down_proj``,
``self_query``, ...), a basis ``V (in, in)`` is computed once from the base
weights ``W_l (out, in)`` (torch layout) of all the role's layers (PEFT's
``_projection_from_weights``): with ``Σ out < in``, the right singular
vectors of the stacked ``[W_1; ...; W_L]``; otherwise its QR factors
``Q R``, ``T = mean_l inv(Q_lᵀ Q_l + α I)`` over the row blocks ``Q_l`` and
``V = Rᵀ E`` with ``E`` the eigenvectors of ``T``. Each layer then factors
``W = U diag(λ) Vᵀ`` (``U = W V⁻ᵀ`` with unit columns, ``λ`` their norms)
and is reparametrised as

    W' = U (S + diag(λ)) Vᵀ,

``λ (in,)`` and the ``nnz`` values of the sparse ``S (in, in)`` trainable
(``S``'s off-diagonal positions drawn once per role: ``nnz =
int(in²·sparse_rate)``, at least one when ``sparse_rate > 0``). ``U`` and
``V`` are frozen; at init ``S = 0`` and ``W' = W`` up to rounding.

Here ``V`` and the positions (``indices (2, nnz)``: PEFT's row and column
of ``S``) are arrays shared by every leaf of a ``group`` (one group per
role; ``adapters.Shared``), made by ``adapters.init`` from all the group's
kernels; ``U`` (``u = Uᵀ (in, out)``) and ``λ0`` are frozen per leaf (PEFT
keeps ``U`` as a buffer too and recomputes it when loading; peftjax's reader
recomputes it in float64 as PEFT does, which matters for the directions
with ``λ0 ≈ 0`` that ``S`` can still couple into). On a Flax kernel ``w (in,
out)`` (``= Wᵀ``): ``z = V⁻¹ w``, ``λ0`` its row norms, ``u = z / λ0``
(rows with ``λ0 ≤ 1e-12`` zero), and ``w' = V (Sᵀ + diag(λ)) u``; the base
kernel is not read (FRoD replaces the weight, as PEFT's forward). ``unfold``
returns ``V diag(λ0) u`` (the base up to the factorisation's rounding).

Factored form: ``delta(x̃) = ((x̃ V)(Sᵀ + diag λ)) u - x̃ w``, which is
also PEFT's forward with ``frod_dropout`` (``base(x) + F(x̃) - x̃ W``). Per
row ``4·in²`` (``x V`` and the dense ``Sᵀ + diag λ``) + ``4·in·out`` (``u``
and the second base product) FLOPs: no ``(in, out)`` temporary, but dearer
than the materialised weight for long inputs (FRoD has no additive
low-rank form).

Exports: ``FRoDParams``, ``FRoDFrozen``, ``frod``, ``frod_basis``, ``frod_nnz``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol, _shared

_EPS = 1e-12  # PEFT's threshold on λ0


class FRoDParams(NamedTuple):
    """Trainable FRoD parameters (per matrix).

    Attributes:
      lambda_l: ``(in,)`` the spectrum ``λ`` (PEFT ``frod_lambda_l``).
      s_values: ``(nnz,)`` the values of ``S`` at ``FRoDFrozen.indices``
        (PEFT ``frod_lambda_s_values``).
    """

    lambda_l: jax.Array
    s_values: jax.Array


class FRoDFrozen(NamedTuple):
    """Frozen FRoD arrays (per matrix; ``v`` and ``indices`` shared by the group).

    Attributes:
      u: ``(in, out)`` PEFT's ``Uᵀ``: the rows of ``V⁻¹ w`` normalised
        (recomputed from the base kernel, never stored in PEFT's files).
      lambda0: ``(in,)`` their norms ``λ0`` (``w = V diag(λ0) u``).
      v: ``(in, in)`` the basis ``V`` (PEFT ``frod_V.<category>``), a
        ``Shared`` placeholder.
      indices: ``(2, nnz)`` int32 rows and columns of ``S``'s values (PEFT
        ``frod_s_indices.<category>``), a ``Shared`` placeholder.
    """

    u: jax.Array
    lambda0: jax.Array
    v: Any
    indices: Any


def frod_nnz(n_in: int, sparse_rate: float) -> int:
    """PEFT's number of trainable entries of ``S (in, in)`` (off-diagonal).

    Args:
      n_in: the input size ``in``.
      sparse_rate: the fraction of ``in²`` entries.

    Returns:
      ``min(int(in²·sparse_rate), in(in-1))``, at least 1 when
      ``sparse_rate > 0`` and ``in > 1``.

    Example:
      >>> frod_nnz(16, 0.1), frod_nnz(16, 0.001), frod_nnz(16, 0.0)
      (25, 1, 0)
    """
    n_off = n_in * (n_in - 1)
    nnz = min(int(n_in * n_in * sparse_rate), n_off)
    if sparse_rate > 0 and n_off > 0:
        nnz = max(1, nnz)
    return nnz


def frod_basis(matrices: list[jax.Array], regularization_alpha: float = 1e-3) -> jax.Array:
    """PEFT's shared basis ``V (in, in)`` from a role's weights ``W_l (out_l, in)`` (torch layout).

    Args:
      matrices: the role's weights, torch layout, all with the same ``in``.
      regularization_alpha: the ridge ``α`` of the QR branch.

    Returns:
      ``V``; right singular vectors when ``Σ out_l < in``, else ``Rᵀ E``
      (module docstring). Signs and the order of equal eigenvalues follow
      the LAPACK in use, so ``V`` matches PEFT's up to those.

    Example:
      >>> import jax.numpy as jnp
      >>> v = frod_basis([jnp.eye(3)[:2], jnp.eye(3)[1:]])
      >>> v.shape
      (3, 3)
    """
    stacked = jnp.concatenate(matrices, axis=0)
    n_in = stacked.shape[1]
    if stacked.shape[0] < n_in:
        _, _, vh = jnp.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q, r = jnp.linalg.qr(stacked)
    t_pi = jnp.zeros((n_in, n_in), stacked.dtype)
    eye = jnp.eye(n_in, dtype=stacked.dtype)
    start = 0
    for m in matrices:
        q_l = q[start:start + m.shape[0]]
        start += m.shape[0]
        t_pi = t_pi + jnp.linalg.inv(q_l.T @ q_l + regularization_alpha * eye)
    _, vecs = jnp.linalg.eigh(t_pi / len(matrices))
    return r.T @ vecs


def _core(t: FRoDParams, f: FRoDFrozen, n_in: int, ct: Any) -> jax.Array:
    """``Sᵀ + diag(λ)`` ``(in, in)`` (Flax layout of PEFT's ``S + L``)."""
    idx = f.indices.astype(jnp.int32)
    m = jnp.zeros((n_in, n_in), ct).at[idx[1], idx[0]].add(t.s_values.astype(ct))
    return m + jnp.diag(t.lambda_l.astype(ct))


def _split(w: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(u, λ0)``: ``V⁻¹ w`` with unit rows and its row norms (PEFT's ``U``, ``L``)."""
    z = jnp.linalg.solve(v, w)
    lam0 = jnp.linalg.norm(z, axis=1)
    keep = lam0 > _EPS
    u = jnp.where(keep[:, None], z / jnp.where(keep, lam0, 1.0)[:, None], 0.0)
    return u, lam0


def frod(
    sparse_rate: float = 0.01,
    *,
    group: str = "frod",
    regularization_alpha: float = 1e-3,
    init_weights: bool = True,
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """FRoD: ``W' = U (S + diag λ) Vᵀ`` with ``V`` shared by the leaves of ``group``.

    Trainable per matrix: ``in + nnz`` (``λ`` and ``S``'s values; PEFT's
    count), ``nnz = int(in²·sparse_rate)`` (``frod_nnz``). The group's ``V``
    ``(in, in)`` and positions ``(2, nnz)`` are frozen shared arrays
    (``AdapterState.frozen["@shared"]["<group>/V"]``, ``"<group>/indices"``),
    computed by ``adapters.init`` from every kernel of the group (the layers
    of one module role: give each role its own ``group``; all its kernels
    need the same ``in``). ``U`` and ``λ0`` are frozen per leaf (one
    weight-sized ``u`` each, as PEFT's ``U``). ``W' = W`` up to rounding at
    init (``init_weights=True``). Factored form: the module docstring.

    Args:
      sparse_rate: fraction of ``S``'s ``in²`` entries trained (PEFT's
        default 0.01), in ``[0, 1]``.
      group: the name of the shared arrays (one per module role).
      regularization_alpha: ridge of the basis' QR branch (PEFT's 1e-3).
      init_weights: True (PEFT's default): ``S = 0``, ``λ = λ0``; False:
        ``S ~ N(0, 0.1²)`` and ``λ0 + N(0, 0.1²)``, not the identity.
      dropout: rate of dropout on the adapter input (factored path only).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)`` (the only layouts the basis accepts).
      param_dtype: storage dtype of the parameters and of ``V``.

    Returns:
      An ``Adapter`` with trainable ``FRoDParams``, frozen ``FRoDFrozen``
      (``v``/``indices`` shared placeholders) and a ``SharedInit`` for the
      group.

    Static arguments: all.

    Raises:
      ValueError: ``sparse_rate`` outside ``[0, 1]``; an empty ``group``; at
        ``adapters.init``, a group whose kernels differ in ``in`` or are not
        ``(batch..., in, out)``.
      TypeError: ``init_weights`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters
      >>> params = {"a": jnp.arange(30.0).reshape(6, 5) ** 0.5,
      ...           "b": jnp.arange(36.0).reshape(6, 6) ** 0.3}
      >>> ad = adapters.frod(0.1, group="role")
      >>> st = adapters.init({"a": ad, "b": ad}, jax.random.key(0), params)
      >>> st.trainable["a"].s_values.shape, st.frozen["@shared"]["role/V"].shape
      ((3,), (6, 6))
      >>> m = adapters.materialize({"a": ad, "b": ad}, params, *st)
      >>> bool(jnp.allclose(m["a"], params["a"], atol=1e-4))
      True
    """
    rate = float(sparse_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"frod: sparse_rate must be in [0, 1], got {sparse_rate!r}")
    if not isinstance(group, str) or not group:
        raise ValueError(f"frod: group must be a non-empty str, got {group!r}")
    if not isinstance(init_weights, bool):
        raise TypeError(f"frod: init_weights must be a bool, got {init_weights!r}")
    alpha = float(regularization_alpha)
    param_dtype = jnp.dtype(param_dtype)
    v_name, idx_name = f"{group}/V", f"{group}/indices"

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("frod takes no stats")
        n_in = w.shape[0]
        nnz = frod_nnz(n_in, rate)
        return (FRoDParams(jnp.zeros((n_in,), param_dtype), jnp.zeros((nnz,), param_dtype)),
                FRoDFrozen(jnp.zeros(w.shape, param_dtype), jnp.zeros((n_in,), param_dtype),
                           _shared.Shared(v_name), _shared.Shared(idx_name)))

    def group_arrays(key, ms):
        """``(V, indices, (λ, s) per leaf)`` from the group's ``(n, in, out)`` stacks."""
        n_in = ms[0].shape[1]
        v = frod_basis([m[i].T for m in ms for i in range(m.shape[0])], alpha)
        k_idx, k_s, k_l = jax.random.split(key, 3)
        rows, cols = np.nonzero(~np.eye(n_in, dtype=bool))  # row-major, as PEFT
        pick = jax.random.permutation(k_idx, rows.size)[:frod_nnz(n_in, rate)]
        indices = jnp.stack([jnp.asarray(rows)[pick], jnp.asarray(cols)[pick]]).astype(
            jnp.int32)
        per = []
        for i, m in enumerate(ms):
            u, lam0 = jax.vmap(lambda x: _split(x, v))(m)
            lam = lam0
            s = jnp.zeros((m.shape[0], frod_nnz(n_in, rate)), lam0.dtype)
            if not init_weights:
                s = 0.1 * jax.random.normal(jax.random.fold_in(k_s, i), s.shape, s.dtype)
                lam = lam0 + 0.1 * jax.random.normal(jax.random.fold_in(k_l, i),
                                                     lam0.shape, lam0.dtype)
            per.append(tuple(x.astype(param_dtype) for x in (lam, s, u, lam0)))
        return v.astype(param_dtype), indices, per

    def init_group(key, leaves):
        ms, batches, n_ins = [], [], {}
        for path, (w, t, _f) in leaves.items():
            nb = t.lambda_l.ndim - 1
            shape = tuple(np.shape(w))
            if len(shape) != nb + 2:
                raise ValueError(f"frod: {path!r} has shape {shape}; the group basis "
                                 "needs (batch..., in, out) kernels")
            n_ins[path] = shape[-2]
            ct = _lowrank.compute_dtype(jnp.float32, w.dtype, param_dtype)
            ms.append(jnp.reshape(w, (-1,) + shape[-2:]).astype(ct))
            batches.append(shape[:-2])
        if len(set(n_ins.values())) > 1:
            raise ValueError(f"frod: the kernels of group {group!r} differ in their input "
                             f"size {n_ins}; give each module role its own group")
        v, indices, per = jax.jit(group_arrays)(key, tuple(ms))  # one compile
        out = {}
        for (path, (_, _, f)), batch, arrays in zip(leaves.items(), batches, per,
                                                     strict=True):
            lam, s, u, lam0 = (x.reshape(batch + x.shape[1:]) for x in arrays)
            out[path] = (FRoDParams(lam, s), f._replace(u=u, lambda0=lam0))
        return _shared.SharedParts(frozen={v_name: v, idx_name: indices}, leaves=out)

    def apply_matrix(w, t, f):
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype, t.lambda_l.dtype)
        return f.v.astype(ct) @ (_core(t, f, w.shape[0], ct) @ f.u.astype(ct))

    def unapply_matrix(w, t, f, aux):
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype, t.lambda_l.dtype)
        return f.v.astype(ct) @ (f.lambda0.astype(ct)[:, None] * f.u.astype(ct))

    def factored_matrix(w, t, f):
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype, t.lambda_l.dtype)
        v, u, core = f.v.astype(ct), f.u.astype(ct), _core(t, f, w.shape[0], ct)

        def delta(x):
            c = _lowrank.compute_dtype(ct, x.dtype)
            xc = x.astype(c)
            return ((xc @ v) @ core) @ u - xc @ w.astype(c)

        return _protocol.FactoredTerms(delta=delta)

    return _lift.lift_matrix(
        name=f"frod(sparse_rate={rate}, group={group!r})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=factored_matrix,
        hyperparameters=(("sparse_rate", rate), ("group", group),
                         ("regularization_alpha", alpha), ("init_weights", init_weights),
                         ("dropout", float(dropout))),
        shared=_shared.SharedInit(
            group=group, config=("frod", rate, alpha, init_weights, param_dtype.name),
            init=init_group),
    )
