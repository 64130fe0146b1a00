# SPDX-License-Identifier: Apache-2.0
"""CLOVER: orthogonalise attention head pairs, prune redundant vectors, train the singular values.

CLOVER: Cross-Layer Orthogonal Vectors Pruning and Fine-Tuning. Meng, Tang,
Jiang & Zhang, ICML 2025. https://arxiv.org/abs/2411.17426 (authors' code:
https://github.com/fxmeng/CLOVER).

Per attention head, the query and key projections only act through their
product ``W_Q,h W_K,hᵀ`` (the attention logits) and the value and output
projections through ``W_V,h W_O,h``: each pair is a rank-``d`` (head dim)
matrix. The paper (§3) replaces each pair by its SVD, ``W_Q,h W_K,hᵀ = U S
Vᵀ`` with ``W_Q,h ↦ U √S``, ``W_K,h ↦ V √S`` (the authors' pruning code)
and ``W_V,h W_O,h = U S Vᵀ`` with ``W_V,h ↦ U S``, ``W_O,h ↦ Vᵀ``: the
model is unchanged, every head's vectors are orthogonal, and the vectors of
the smallest singular values are redundant and can be pruned. Fine-tuning
then trains only a ``d × d`` matrix per head between the frozen orthonormal
vectors and the rest (the authors' ``QKVLinear.singular_value``, initialised
at ``S``; with RoPE, which sits between Q and K, or grouped-query attention,
where one V head feeds several O heads, the pair cannot be merged and the
authors orthogonalise ``W_Q,h`` (or ``W_V,h``) alone, by QR).

The method spans two kernels per pair, so it is split in two here:

* ``clover_orthogonalize`` is the one-off transform of one layer's
  attention kernels (Flax ``q``, ``k``, ``v`` ``(in, heads·d)``, ``o``
  ``(heads·d, out)``, optional ``q``/``k``/``v`` biases, which are folded in
  as an extra input row as the authors do): V-O by SVD when every V head has
  its own O head, Q-K by SVD when ``rope=False`` (and MHA); it preserves the
  model's function exactly (to rounding), and ``prune`` zeroes each head's
  vectors of the smallest singular values (shapes stay, the pruned vectors
  are zero on both sides of the pair). Pure, jit-able, stacked layers
  (leading axes) supported.
* ``clover(head_dim)`` is the singular-value adapter on a head-split kernel
  (``q``, ``k`` or ``v``): per head ``h`` the float32 SVD of the ``(in, d)``
  block ``W_h = U_h diag(s_h) V_hᵀ`` is frozen and the trainable ``T_h (d,
  d)`` starts at ``diag(s_h) V_hᵀ``: ``W'_h = U_h T_h``, the base at init
  (to rounding). After ``clover_orthogonalize`` the V (and non-RoPE Q/K)
  blocks have orthogonal columns, so ``V_h`` is a signed identity and ``T_h
  = ±diag(S)``: the authors' ``singular_value`` exactly (their code trains the
  full ``d × d`` matrix, and so does this one). On a RoPE query, where the
  authors take ``W_Q,hᵀ = Q R`` and train ``R``, this is the same function
  class with the rows of ``T_h`` in the singular basis instead of the QR one
  (equal under SGD, a fixed rotation apart under Adam). Pruned vectors stay
  pruned, as if removed: the rows of ``T_h`` of singular values ``<=
  1e-5·max(s_h)`` and its columns of zero columns of ``W_h`` are masked. A
  sibling bias goes through the same per-head map as the layer's output,
  ``b'_h = b_h M_h`` with ``M_h = V_h diag(1/s_h) T_h`` (``W'_h = W_h M_h``),
  as the authors' ``QKVLinear`` maps it (there with the SVD of the kernel and
  bias together: on a biased kernel the trained coordinates differ from
  theirs by a fixed linear map, ``T_authors = diag(S) M``; same init, same
  function class). ``unapply`` of the bias uses ``pinv(M_h)`` (exact while
  ``T_h`` is invertible).

Factored form: an output map, ``h_h ↦ h_h · V_h diag(1/s_h) T_h`` per head on
the base product ``h = x W`` (``x U_h = x W_h V_h diag(1/s_h)``):
``2·d·out`` FLOPs per row, no ``(in, out)`` temporary, no second base
product (a sibling bias is mapped by the bias hook). ``unapply`` rebuilds
``W`` from the frozen SVD (exact to rounding).

Exports: ``CLOVERParams``, ``CLOVERBasis``, ``CLOVERKernels``, ``clover``,
``clover_orthogonalize``.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

_RTOL = 1e-5  # singular values at or below this fraction of a head's largest are pruned


class CLOVERParams(NamedTuple):
    """Trainable CLOVER singular-value matrices (per matrix; stacked leaves add batch axes).

    Attributes:
      t: ``(heads, d, d)``, per head ``T_h`` with ``W'_h = U_h T_h`` (init
        ``diag(s_h) V_hᵀ``).
    """

    t: jax.Array


class CLOVERBasis(NamedTuple):
    """The frozen per-head SVD of the base kernel's head blocks.

    Attributes:
      u: ``(in, heads·d)``: per head the orthonormal ``U_h (in, d)``.
      s: ``(heads, d)`` singular values, descending per head.
      v: ``(heads, d, d)`` right singular vectors ``V_h`` (columns).
    """

    u: jax.Array
    s: jax.Array
    v: jax.Array


class CLOVERKernels(NamedTuple):
    """One layer's attention kernels after ``clover_orthogonalize`` (Flax layout).

    Attributes:
      q, k, v: ``(..., in, heads·d)`` (``k``/``v`` with the KV heads).
      o: ``(..., heads·d, out)``.
      q_bias, k_bias, v_bias: ``(..., heads·d)``, or None where absent.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    o: jax.Array
    q_bias: jax.Array | None
    k_bias: jax.Array | None
    v_bias: jax.Array | None


def _augment(w: jax.Array, b: jax.Array | None) -> jax.Array:
    """``(in, n)`` kernel with its bias as an extra input row ``(in + 1, n)``."""
    return w if b is None else jnp.concatenate([w, b[None, :]], axis=0)


def _split(w: jax.Array, b: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    return (w, None) if b is None else (w[:-1], w[-1])


def _orthogonalize_one(q, k, v, o, qb, kb, vb, *, d, rope, n_keep):
    heads = q.shape[-1] // d
    kv_heads = v.shape[-1] // d
    ct = _lowrank.compute_dtype(jnp.float32, q.dtype)
    keep = jnp.arange(d) < n_keep  # the pruning mask of each head's d vectors
    if kv_heads == heads:  # V-O: W_V,h W_O,h = U S Vᵀ; W_V,h ↦ U S, W_O,h ↦ Vᵀ
        va = _augment(v, vb).astype(ct)
        new_v, new_o = [], []
        for h in range(heads):
            pair = va[:, h * d:(h + 1) * d] @ o[h * d:(h + 1) * d].astype(ct)
            u, s, vt = jnp.linalg.svd(pair, full_matrices=False)
            new_v.append(u[:, :d] * jnp.where(keep, s[:d], 0.0)[None, :])
            new_o.append(jnp.where(keep[:, None], vt[:d], 0.0))
        v, vb = _split(jnp.concatenate(new_v, axis=1).astype(v.dtype), vb)
        vb = None if vb is None else vb.astype(v.dtype)
        o = jnp.concatenate(new_o, axis=0).astype(o.dtype)
    if not rope and kv_heads == heads:  # Q-K: W_Q,h W_K,hᵀ = U S Vᵀ; U √S, V √S
        qa, ka = _augment(q, qb).astype(ct), _augment(k, kb).astype(ct)
        new_q, new_k = [], []
        for h in range(heads):
            pair = qa[:, h * d:(h + 1) * d] @ ka[:, h * d:(h + 1) * d].T
            u, s, vt = jnp.linalg.svd(pair, full_matrices=False)
            root = jnp.where(keep, jnp.sqrt(s[:d]), 0.0)[None, :]
            new_q.append(u[:, :d] * root)
            new_k.append(vt[:d].T * root)
        q, qb = _split(jnp.concatenate(new_q, axis=1).astype(q.dtype), qb)
        k, kb = _split(jnp.concatenate(new_k, axis=1).astype(k.dtype), kb)
    return CLOVERKernels(q, k, v, o, qb, kb, vb)


def clover_orthogonalize(
    q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, *,
    head_dim: int,
    q_bias: jax.Array | None = None,
    k_bias: jax.Array | None = None,
    v_bias: jax.Array | None = None,
    rope: bool = True,
    prune: int = 0,
) -> CLOVERKernels:
    """CLOVER's one-off transform of one attention layer: each head pair by its SVD.

    V-O (when there are as many KV heads as heads): ``W_V,h W_O,h = U S Vᵀ``,
    ``W_V,h ↦ U S`` (columns orthogonal, norms ``S``), ``W_O,h ↦ Vᵀ``
    (orthonormal rows). Q-K (``rope=False`` and as many KV heads as heads):
    ``W_Q,h W_K,hᵀ = U S Vᵀ``, ``W_Q,h ↦ U √S``, ``W_K,h ↦ V √S``. A bias
    is part of its pair (an extra input row, as the authors do). The
    attention output is unchanged up to rounding (exactly, in exact
    arithmetic) when ``prune == 0``. Grouped-query V and RoPE Q/K are left
    unchanged (the ``clover`` adapter orthogonalises them per head on its
    own). Computed in float32 or wider; returned in the inputs' dtypes.

    Args:
      q, k, v: ``(..., in, heads·d)`` kernels (leading axes: stacked layers).
      o: ``(..., heads·d, out)``.
      head_dim: ``d``.
      q_bias, k_bias, v_bias: ``(..., heads·d)`` biases, or None.
      rope: the model rotates Q and K by position (Llama): leave them.
      prune: the number of vectors removed per head from each transformed
        pair (those of the smallest singular values), zeroed on both sides.

    Returns:
      ``CLOVERKernels(q, k, v, o, q_bias, k_bias, v_bias)``.

    Raises:
      ValueError: widths not multiples of ``head_dim``, mismatched heads or
        leading axes, ``prune`` outside ``[0, head_dim)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> q, k, v = (jax.random.normal(x, (8, 4)) for x in ks[:3])
      >>> o = jax.random.normal(ks[3], (4, 8))
      >>> out = clover_orthogonalize(q, k, v, o, head_dim=2, rope=False)
      >>> bool(jnp.allclose(v @ o, out.v @ out.o, atol=1e-4))
      True
      >>> bool(jnp.allclose(q[:, :2] @ k[:, :2].T, out.q[:, :2] @ out.k[:, :2].T,
      ...                   atol=1e-4))
      True
    """
    d = head_dim
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise ValueError(f"clover_orthogonalize: head_dim must be a positive int, got {d!r}")
    if isinstance(prune, bool) or not isinstance(prune, int) or not 0 <= prune < d:
        raise ValueError(f"clover_orthogonalize: prune must be an int in [0, head_dim="
                         f"{d}), got {prune!r}")
    shapes = {"q": q.shape, "k": k.shape, "v": v.shape, "o": o.shape}
    lead = q.shape[:-2]
    if (any(s[:-2] != lead for s in shapes.values()) or q.shape[-1] % d
            or k.shape[-1] % d or k.shape != v.shape or o.shape[-2] != q.shape[-1]
            or q.shape[-2] != k.shape[-2] or q.ndim < 2):
        raise ValueError(
            f"clover_orthogonalize: kernels of shapes {shapes} with head_dim={d}: need "
            "q (..., in, heads·d), k and v (..., in, kv_heads·d), o (..., heads·d, out) "
            "with the same leading axes")
    for name, b, w in (("q_bias", q_bias, q), ("k_bias", k_bias, k), ("v_bias", v_bias, v)):
        if b is not None and b.shape != w.shape[:-2] + w.shape[-1:]:
            raise ValueError(f"clover_orthogonalize: {name} has shape {b.shape}, its "
                             f"kernel {w.shape} needs {w.shape[:-2] + w.shape[-1:]}")
    fn = functools.partial(_orthogonalize_one, d=d, rope=bool(rope), n_keep=d - prune)
    if not lead:
        return fn(q, k, v, o, q_bias, k_bias, v_bias)
    return _lift.map_slices(fn, len(lead))(q, k, v, o, q_bias, k_bias, v_bias)


def clover(
    head_dim: int,
    *,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """CLOVER's singular-value adapter: ``W'_h = U_h T_h`` per head block of the kernel.

    For a ``q``/``k``/``v`` kernel ``(in, heads·d)``; run
    ``clover_orthogonalize`` on the layer first for the paper's method (then
    ``T_h`` starts at the pair's singular values). Trainable: ``heads·d² =
    out·d`` per matrix; frozen: the per-head SVD, ``in·out + out·(d + 1)``.
    The base at init (to rounding). The factored path maps the base
    product's head outputs (``2·d·out`` FLOPs per row).

    Args:
      head_dim: ``d``; must divide the kernel's ``out``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``T`` and of the basis.

    Returns:
      An ``Adapter`` with trainable ``CLOVERParams(t)`` and frozen
      ``CLOVERBasis(u, s, v)``, and a hook mapping a sibling ``bias`` per
      head like the output (``b'_h = b_h V_h diag(1/s_h) T_h``).

    Static arguments: all.

    Raises:
      ValueError: ``head_dim <= 0``; at init, ``out`` not a multiple of it or
        ``in < head_dim``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = clover(2)
      >>> w = jnp.array([[3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.t.shape, f.s.tolist()
      ((2, 2, 2), [[3.0, 2.0], [1.0, 1.0]])
      >>> bool(jnp.allclose(ad.apply(w, t, f), w, atol=1e-6))
      True

    References:
      Meng et al., ICML 2025, https://arxiv.org/abs/2411.17426
    """
    d = head_dim
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise ValueError(f"clover: head_dim must be a positive int, got {d!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        del key  # deterministic: the basis is the kernel's own SVD
        if stats is not None:
            raise ValueError("clover takes no stats")
        n_in, n_out = w.shape
        if n_out % d or n_in < d:
            raise ValueError(f"clover: head_dim={d} must divide out={n_out} and be <= "
                             f"in={n_in} of the matrix view of shape {tuple(w.shape)}")
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        wc = w.astype(ct)
        # one SVD per head (a batched LAPACK call can stall a jitted init, see map_slices)
        svds = [jnp.linalg.svd(wc[:, h * d:(h + 1) * d], full_matrices=False)
                for h in range(n_out // d)]
        u, s, vt = (jnp.stack(x) for x in zip(*svds, strict=True))  # (H, in, d), (H, d), (H, d, d)
        t = s[:, :, None] * vt
        basis = CLOVERBasis(u.transpose(1, 0, 2).reshape(n_in, n_out).astype(param_dtype),
                            s.astype(param_dtype), jnp.swapaxes(vt, 1, 2).astype(param_dtype))
        return CLOVERParams(t.astype(param_dtype)), basis

    def parts(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.t.dtype, f.u.dtype)
        s = f.s.astype(ct)
        tol = _RTOL * jnp.max(s, axis=-1, keepdims=True)
        live = s > tol  # input-side directions (rows of T_h)
        # output columns of the block: column e of W_h is U_h (s ⊙ V_h[e, :])
        cols = jnp.sqrt(jnp.sum((f.v.astype(ct) * s[:, None, :]) ** 2, axis=-1)) > tol
        # pruned directions and pruned (zero) columns stay zero
        tm = jnp.where(live[:, :, None] & cols[:, None, :], t.t.astype(ct), 0.0)
        return ct, s, live, tm

    def apply_matrix(w, t, f):
        ct, _, _, tm = parts(w, t, f)
        n_in, n_out = f.u.shape
        u = f.u.astype(ct).reshape(n_in, n_out // d, d)
        return jnp.einsum("ihd,hde->ihe", u, tm).reshape(n_in, n_out)

    def unapply_matrix(w, t, f, aux):
        ct = _lowrank.compute_dtype(w.dtype, f.u.dtype)
        n_in, n_out = f.u.shape
        u = f.u.astype(ct).reshape(n_in, n_out // d, d)
        return jnp.einsum("ihd,hd,hed->ihe", u, f.s.astype(ct),
                          f.v.astype(ct)).reshape(n_in, n_out)

    def out_matrices(x, t, f):
        """``(ct, M (heads, d, d))``, ``M_h = V_h diag(1/s_h) T_h``: ``x U_h T_h = (x W_h) M_h``."""
        ct, s, live, tm = parts(x, t, f)
        inv = jnp.where(live, 1.0 / jnp.where(live, s, 1.0), 0.0)
        return ct, (f.v.astype(ct) * inv[:, None, :]) @ tm

    def per_head(x, m):
        g = x.reshape(x.shape[:-1] + (-1, d))
        return jnp.einsum("...hd,hde->...he", g, m).reshape(x.shape)

    def factored_matrix(w, t, f):
        def out_map(h):
            ct, m = out_matrices(h, t, f)
            return per_head(h.astype(ct), m).astype(h.dtype)

        return _protocol.FactoredTerms(out_map=out_map)

    def bias_apply(b, t, f):
        ct, m = out_matrices(b, t, f)
        return per_head(b.astype(ct), m).astype(b.dtype)

    def bias_unapply(b, t, f):
        ct, m = out_matrices(b, t, f)
        pinv = jnp.stack([jnp.linalg.pinv(m[h]) for h in range(m.shape[0])])
        return per_head(b.astype(ct), pinv).astype(b.dtype)

    return _lift.lift_matrix(
        name=f"clover(head_dim={d})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        bias=_protocol.BiasHook(name="bias", apply=bias_apply, unapply=bias_unapply),
        factored_matrix=factored_matrix,
        dimension_numbers=dimension_numbers,
        hyperparameters=(("head_dim", d),),
    )
