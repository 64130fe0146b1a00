# SPDX-License-Identifier: Apache-2.0
"""OSF: orthogonal subspace fine-tuning of each weight's low singular part.

Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for
Continual Learning", 2025, https://arxiv.org/abs/2504.07097, as Hugging Face
PEFT's ``tuners/osf`` implements it (followed here, also for its files).

Torch layout ``W0 (out, in) = U Σ Vᵀ`` (eq. 2) is split at the preserved rank
``k``: the top ``k`` directions (``U_high``, ``Σ_high``, ``V_high``) are frozen, the
remaining ``r = min(out, in) − k`` (``U_low (out, r)``, ``S_low (r,)``, ``V_lowᵀ
(r, in)``) are trainable, initialised from the SVD, and a frozen copy of their
initial values is kept, so

  ``W = W0 + U_low diag(S_low) V_lowᵀ − U_low⁰ diag(S_low⁰) V_low⁰ᵀ``

(identity at init). The gradients of ``U_low`` and ``V_low`` are projected away
from the preserved subspace (eq. 5, 6): ``∇U_low ← (I − U_high U_highᵀ) ∇U_low``,
``∇V_lowᵀ ← ∇V_lowᵀ (I − V_high V_highᵀ)``; PEFT does it with tensor hooks,
here a ``jax.custom_vjp`` identity on the trainable factors does it inside the
differentiated function, so any optax optimizer sees projected gradients.

On a Flax kernel ``W0 (in, out) = W0_torchᵀ``: ``v (in, r) = V_low``, ``s (r,) =
S_low``, ``u (r, out) = U_lowᵀ``, and ``ΔW = v diag(s) u − v⁰ diag(s⁰) u⁰``.

Factored form (as PEFT's forward, one rank-``2r`` product): ``ΔW = [v·s, v·s −
v⁰·s⁰] @ [u − u⁰; u⁰]`` (PEFT's ``[v·s, −v⁰·s⁰] @ [u; u⁰]`` regrouped so that
it is exactly zero at init), so ``x @ ΔW`` costs ``O(2r·(in + out))`` per row. The
SVD's signs do not matter: the frozen product ``v⁰ diag(s⁰) u⁰`` and the
projectors are sign-free, so a PEFT file's trainable factors give PEFT's
outputs with peftjax's own SVD of the base.

The optimizer form of the same method on full parameters is
``peftjax.optim.osf``.

Exports: ``OSFParams``, ``OSFBasis``, ``osf``, ``osf_rank``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class OSFParams(NamedTuple):
    """Trainable OSF factors of one matrix (stacked leaves add batch axes).

    Attributes:
      v: ``(in, r)`` = PEFT ``V_low.T`` (torch ``osf_svd_params.V_low`` is
        ``(r, in)``).
      s: ``(r,)`` = PEFT ``S_low``.
      u: ``(r, out)`` = PEFT ``U_low.T``.
    """

    v: jax.Array
    s: jax.Array
    u: jax.Array


class OSFBasis(NamedTuple):
    """Frozen OSF arrays: the initial low factors and the preserved bases.

    Attributes:
      v0, s0, u0: the initial ``v``, ``s``, ``u`` (PEFT's ``_osf_*_low_init``
        buffers, not saved in its files: recomputed from the base).
      in_high: ``(in, k)``, PEFT's ``V_high.T``, the preserved input-side basis.
      out_high: ``(out, k)``, PEFT's ``U_high``, the preserved output-side basis.
    """

    v0: jax.Array
    s0: jax.Array
    u0: jax.Array
    in_high: jax.Array
    out_high: jax.Array


def osf_rank(effective_rank: int | float | None, n_in: int, n_out: int) -> int:
    """PEFT's preserved rank ``k`` for one ``(in, out)`` matrix.

    Args:
      effective_rank: None (``min(in, out) // 2``), an int (clipped to
        ``min(in, out)``) or a float in ``(0, 1]`` (``int(min(in, out) · f)``).
      n_in, n_out: the matrix view's sizes.

    Returns:
      ``k``; the trainable rank is ``min(in, out) − k``.

    Example:
      >>> osf_rank(None, 16, 8), osf_rank(0.25, 16, 8), osf_rank(3, 16, 8)
      (4, 2, 3)
    """
    m = min(n_in, n_out)
    if effective_rank is None:
        return m // 2
    if isinstance(effective_rank, float) and 0 < effective_rank <= 1:
        return max(min(m, int(m * effective_rank)), 0)
    return max(min(m, int(effective_rank)), 0)


@jax.custom_vjp
def _project_in(v: jax.Array, basis: jax.Array) -> jax.Array:
    return v


def _project_in_fwd(v, basis):
    return v, basis


def _project_in_bwd(basis, g):
    b = basis.astype(g.dtype)
    return g - b @ (b.T @ g), jnp.zeros_like(basis)


_project_in.defvjp(_project_in_fwd, _project_in_bwd)


@jax.custom_vjp
def _project_out(u: jax.Array, basis: jax.Array) -> jax.Array:
    return u


def _project_out_fwd(u, basis):
    return u, basis


def _project_out_bwd(basis, g):
    b = basis.astype(g.dtype)
    return g - (g @ b) @ b.T, jnp.zeros_like(basis)


_project_out.defvjp(_project_out_fwd, _project_out_bwd)


def _factors(t: OSFParams, f: OSFBasis) -> _lowrank.LowRank:
    """``ΔW = [v·s, v·s − v⁰·s⁰] @ [u − u⁰; u⁰]`` (exactly 0 at init), gradients projected.

    ``v·s − v⁰·s⁰`` is computed as ``(v − v⁰)·s + v⁰·(s − s⁰)``: both
    differences are exactly 0 at init, also where a compiler fuses a product
    and a subtraction into one rounding (``v·s − v⁰·s⁰`` then leaves ~1e-9).
    """
    ct = _lowrank.compute_dtype(jnp.float32, t.v.dtype, t.u.dtype, f.v0.dtype)
    v = _project_in(t.v, f.in_high).astype(ct)
    u = _project_out(t.u, f.out_high).astype(ct)
    s, v0, s0 = t.s.astype(ct)[None, :], f.v0.astype(ct), f.s0.astype(ct)[None, :]
    vs = v * s
    u0 = f.u0.astype(ct)
    left = jnp.concatenate([vs, (v - v0) * s + v0 * (s - s0)], axis=1)
    right = jnp.concatenate([u - u0, u0], axis=0)
    return _lowrank.LowRank(left, right, 1.0)


def osf(
    effective_rank: int | float | None = None,
    *,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """OSF: ``W' = W0 + v diag(s) u − v⁰ diag(s⁰) u⁰``, gradients kept off the top-k subspace.

    ``init`` takes the SVD of the base matrix view (in float32 or wider):
    the top ``k`` (``osf_rank``) singular directions are frozen (``in_high``,
    ``out_high``), the other ``r = min(in, out) − k`` become the trainable ``v``,
    ``s``, ``u`` (and their frozen initial copies). Identity at init. Trainable
    parameters: ``r·(in + out + 1)`` per matrix, PEFT's count. Gradients of
    ``v`` and ``u`` are projected orthogonally to ``in_high`` / ``out_high``
    (a custom VJP), as PEFT's gradient hooks do.

    Args:
      effective_rank: the preserved rank (static): None (PEFT's default, half
        of ``min(in, out)``), a positive int, or a float in ``(0, 1]``.
      init_weights: True (PEFT's default): trainable factors from the SVD;
        False: standard-normal ``v``, ``s``, ``u`` (not the identity, PEFT's
        testing option).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``.
      param_dtype: storage dtype of every array.

    Returns:
      An ``Adapter`` with trainable ``OSFParams(v, s, u)`` and frozen
      ``OSFBasis(v0, s0, u0, in_high, out_high)``.

    Static arguments: all.

    Raises:
      ValueError: ``effective_rank`` not positive, or a float outside (0, 1].
      TypeError: ``effective_rank`` or ``init_weights`` of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = osf(2)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30 + jnp.eye(6, 5)
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.v.shape, t.s.shape, t.u.shape, f.in_high.shape
      ((6, 3), (3,), (3, 5), (6, 2))
      >>> bool(jnp.allclose(ad.apply(w, t, f), w, atol=1e-5))
      True

    References:
      Nayak et al., 2025, https://arxiv.org/abs/2504.07097
    """
    if effective_rank is not None:
        if (isinstance(effective_rank, bool)
                or not isinstance(effective_rank, numbers.Real)):
            raise TypeError("osf: effective_rank must be None, an int or a float in "
                            f"(0, 1], got {effective_rank!r}")
        if isinstance(effective_rank, numbers.Integral):
            if effective_rank <= 0:
                raise ValueError(f"osf: effective_rank must be positive, got {effective_rank}")
            effective_rank = int(effective_rank)
        elif not 0 < float(effective_rank) <= 1:
            raise ValueError("osf: a float effective_rank is a fraction in (0, 1], got "
                             f"{effective_rank!r}")
        else:
            effective_rank = float(effective_rank)
    if not isinstance(init_weights, bool):
        raise TypeError(f"osf: init_weights must be a bool, got {init_weights!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("osf takes no stats")
        n_in, n_out = w.shape
        k = osf_rank(effective_rank, n_in, n_out)
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        left, sv, right_t = jnp.linalg.svd(w.astype(ct), full_matrices=False)
        v0, s0, u0 = left[:, k:], sv[k:], right_t[k:, :]
        frozen = OSFBasis(v0.astype(param_dtype), s0.astype(param_dtype),
                          u0.astype(param_dtype), left[:, :k].astype(param_dtype),
                          right_t[:k, :].T.astype(param_dtype))
        if init_weights:
            t = OSFParams(*(jnp.array(x, copy=True) for x in frozen[:3]))
        else:
            kv, ks, ku = jax.random.split(key, 3)
            t = OSFParams(jax.random.normal(kv, v0.shape, param_dtype),
                          jax.random.normal(ks, s0.shape, param_dtype),
                          jax.random.normal(ku, u0.shape, param_dtype))
        return t, frozen

    return _lift.lift_matrix(
        name=f"osf(effective_rank={effective_rank})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        **_lowrank.low_rank_forms(_factors),
        hyperparameters=(("effective_rank", effective_rank),
                         ("init_weights", init_weights)),
    )
