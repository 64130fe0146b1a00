# SPDX-License-Identifier: Apache-2.0
"""AdaMSS: low-rank updates in clustered subspaces of each weight's SVD.

AdaMSS: Adaptive Multi-Subspace Approach for Parameter-Efficient Fine-Tuning.
NeurIPS 2025, https://openreview.net/forum?id=8ZdWmpYxT0

The paper writes each pretrained weight through its truncated SVD and a
low-rank self-representation whose row space it segments into ``K``
subspaces, and updates each subspace with its own low-rank residual
(``W^(k) = W0^(k) + A^(k) B^(k) C^(k)``, ``C`` zero at init), then
progressively freezes the least important subspaces (ASA). Hugging Face
PEFT's ``tuners/adamss`` (followed here, also for its files) realises this
as follows.

For a frozen torch-layout ``W (out, in)`` PEFT takes the rank-``q`` SVD
``W ≈ U S Vᵀ`` (``q = min(r, out, in)``), clusters the ``out`` rows of ``U``
(each output unit's coordinates in the left singular basis) into ``K``
groups with k-means, and gives group ``i`` (its output rows ``seg_i``) a
trainable pair ``A_i (r_i, q)``, ``B_i (|seg_i|, r_i)``, ``r_i =
min(|seg_i|, subspace_rank)``. The update projects the input on the frozen
right singular vectors ``newB = Vᵀ (q, in)``:

    ``ΔW[seg_i, :] = B_i A_i newB``,  i.e.  ``Δy[seg_i] = B_i A_i (newB x)``.

``A_i`` starts at the top ``r_i`` right singular vectors of ``U[seg_i]``
(PEFT's QR of ``U[seg_i]ᵀ`` times the Gram matrix's eigenvectors), ``B_i`` at
zero (``init_weights="orthogonal"``), so ``ΔW = 0``. The clustering is
PEFT's exactly: scikit-learn's ``KMeans(init="random", n_init=1,
max_iter=10, random_state=123456789)`` (Lloyd, centres drawn by NumPy's
``RandomState(123456789).choice``), re-implemented in NumPy
(``adamss_segments``); cluster ``i`` is k-means label ``i`` (the ``i``-th
drawn seed; PEFT's ``seg_locations`` orders by label). k-means does not see
the singular vectors' signs. peftjax's init takes the exact SVD (NumPy, on
the host); PEFT's ``svd_lowrank`` (``niter=2``, seeded) equals it for ``q =
min(out, in)`` and is a randomised sketch of it below. With ``q = out``
(``r >= out <= in``) ``U`` is orthogonal, its rows are pairwise equidistant
and k-means' groups follow float32 rounding inside torch's SVD;
``peftjax.io`` refuses those files.

Where PEFT deviates from a plain reading: a Linear layer's bias is appended
to ``W`` as an extra input column before the SVD (and the update then moves
the bias too). peftjax's adapter sees the kernel only and so adapts
bias-free matrices by default; ``bias=True`` is PEFT's layout on a layer
with a bias (the frozen basis carries the bias column and the update moves
the sibling bias leaf through a bias hook), which ``load_peft`` fills from
PEFT's files; peftjax's own init cannot see the bias and leaves that column
zero. PEFT's ``use_dynamic_rank`` (``r_i`` from the Gram matrix's
singular values above ``svd_threshold`` times the largest) is supported.

Layout: ragged per-group shapes do not stack over scanned layers (each layer
clusters differently), so peftjax pads: ``AdaMSSParams.a (K, R, q)``
(``R = subspace_rank``) and ``b (out, R)`` (row ``o`` is ``B_{c(o)}``'s row
of output ``o``); the frozen ``AdaMSSBasis`` holds ``basis = newBᵀ (in,
q)``, ``labels (out,)`` (``c(o)``) and ``mask (K, R)`` (1 for the ``r_i``
real ranks). Padded entries are multiplied by the mask, get zero gradients
and stay zero; they only count as trainable where some ``r_i < R``
(``|seg_i| < subspace_rank`` or the dynamic rank), otherwise the count is
PEFT's ``Σ r_i (q + |seg_i|)``.

Factored form: ``delta(x) = Σ_j b[o, j] · ((x basis) a[c(o)]ᵀ)_j``, per row
``2 in·q + 2 K R q + 2 out R`` FLOPs, never an ``(in, out)`` temporary. At
PEFT's defaults (``q = 100``, ``K = 5``, ``R = 1``) on ``in = out = 4096``
the trainable count is ``5q + out = 4,596``, about a rank-0.56 LoRA's, while
the term costs ``828,392`` FLOPs per row, a rank-50 LoRA's (``2r(in +
out)``): the frozen projection on ``q`` singular vectors dominates.

ASA (adaptive subspace allocation, PEFT's ``update_and_allocate`` behind
its ``asa_callback``) is a training-loop policy, not part of the adapter's
function or its files; peftjax provides it as functions of the loop's state
(as for AdaLoRA): ``adamss_init_importance``; ``adamss_update_importance``
(each active group's EMA of ``|w · g|`` and of its change, PEFT's
``update_importance``, every step from ``init_warmup`` to
``final_warmup``); ``adamss_asa_target`` (PEFT's schedule ``int(target +
(total − target)(1 − progress)^exponent)``); ``adamss_asa_allocate`` (every
``mask_interval`` steps: one global threshold over all layers' scored
groups, score ``mean(Ī·Ū)`` over ``A_i`` plus over ``B_i``, a group stays
active iff its score exceeds the ``target``-th largest, as PEFT's
``kthvalue`` test; then the estimates restart); and ``adamss_freeze``, which
zeroes the optimizer updates of inactive groups (PEFT sets
``requires_grad=False``, so torch's optimizer skips them entirely; zeroing
the gradients instead would let momentum move them).

Exports: ``AdaMSSParams``, ``AdaMSSBasis``, ``adamss``, ``adamss_segments``,
``adamss_kmeans``. ASA (the training-time group allocation) is in
``_adamss_asa``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

_SEED = 123456789


class AdaMSSParams(NamedTuple):
    """Trainable AdaMSS parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(K, R, q)``: group ``i``'s ``A_i`` in rows ``:r_i`` (zero below).
      b: ``(out, R)``: output ``o``'s row of ``B_{c(o)}`` in columns
        ``:r_{c(o)}`` (zero beyond).
    """

    a: jax.Array
    b: jax.Array


class AdaMSSBasis(NamedTuple):
    """Frozen AdaMSS arrays of one matrix.

    Attributes:
      basis: ``(in, q)`` = PEFT's ``adamss_newB`` transposed (right singular
        vectors of the torch ``W``), float32.
      labels: ``(out,)`` int32, the group ``c(o)`` of each output unit.
      mask: ``(K, R)`` float32, 1 for group ``i``'s first ``r_i`` ranks.
      bias_basis: ``(q,)`` float32, PEFT's last ``adamss_newB`` column on a
        layer with a bias (PEFT's SVD is of ``[W | b]`` and the update moves
        the bias by ``B_i A_i bias_basis``), or None (peftjax's init: the
        kernel alone).
    """

    basis: jax.Array
    labels: jax.Array
    mask: jax.Array
    bias_basis: jax.Array | None = None


def adamss_kmeans(x: np.ndarray, n_clusters: int, *, max_iter: int = 10,
                  seed: int = _SEED) -> np.ndarray:
    """scikit-learn's ``KMeans(init="random", n_init=1).fit_predict`` in NumPy.

    Lloyd's algorithm as scikit-learn runs it: the data centred, centres
    drawn by ``RandomState(seed).choice(n, n_clusters, replace=False, p=1/n)``,
    nearest centre with ties to the lowest label, empty clusters relocated to
    the farthest points, stop on unchanged labels or a squared centre shift
    within ``1e-4`` times the mean feature variance, then one final
    assignment. Float64 here (scikit-learn: the input's float32), so labels
    can only differ on exact near-ties.

    Args:
      x: ``(n, d)`` samples.
      n_clusters: ``K <= n``.
      max_iter: Lloyd iterations (PEFT: 10).
      seed: the ``RandomState`` seed (PEFT: 123456789).

    Returns:
      ``(n,)`` int64 labels in ``[0, K)``.

    Example:
      >>> pts = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
      >>> lab = adamss_kmeans(pts, 2)
      >>> bool(lab[0] == lab[1] and lab[2] == lab[3] and lab[0] != lab[2])
      True
    """
    x32 = np.asarray(x, np.float32)
    n = x32.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"adamss_kmeans: n_clusters must be in [1, {n}], got {n_clusters}")
    tol = float(np.mean(np.var(x32, axis=0))) * 1e-4
    xs = x32.astype(np.float64)
    xs = xs - xs.mean(axis=0)
    weight = np.ones(n, np.float32)
    rs = np.random.RandomState(seed)
    seeds = rs.choice(n, size=n_clusters, replace=False, p=weight / weight.sum())
    centers = xs[seeds].copy()

    def assign(c):
        d = (c * c).sum(axis=1)[None, :] - 2.0 * xs @ c.T
        return np.argmin(d, axis=1)

    labels_old = np.full(n, -1)
    strict = False
    for _ in range(max_iter):
        labels = assign(centers)
        counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, xs)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            dist = ((xs - centers[labels]) ** 2).sum(axis=1)
            if dist.max() > 0:
                far = np.argpartition(dist, -empty.size)[:-empty.size - 1:-1]
                for new, f in zip(empty, far, strict=True):
                    old = labels[f]
                    sums[old] -= xs[f]
                    counts[old] -= 1
                    sums[new] = xs[f]
                    counts[new] = 1
        new_centers = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None],
                               centers)
        shift = ((new_centers - centers) ** 2).sum()
        centers = new_centers
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        labels = assign(centers)
    return labels


def adamss_segments(u: np.ndarray, num_subspaces: int) -> np.ndarray:
    """PEFT's groups of output units: k-means labels of the rows of ``U``.

    Args:
      u: ``(out, q)`` left singular vectors of the torch ``W`` (any signs).
      num_subspaces: ``K`` (clamped to ``out``, as PEFT does).

    Returns:
      ``(out,)`` int32 labels; group ``i`` is ``np.flatnonzero(labels == i)``.

    Example:
      >>> u = np.linalg.svd(np.arange(12.0).reshape(4, 3) ** 1.5)[0][:, :3]
      >>> adamss_segments(u, 2).shape
      (4,)
    """
    u = np.asarray(u)
    return adamss_kmeans(u, min(int(num_subspaces), u.shape[0])).astype(np.int32)


def _host_init(w: np.ndarray, rank: int, num_subspaces: int, subspace_rank: int,
               use_dynamic_rank: bool, svd_threshold: float, q: int):
    m = np.asarray(w, np.float64).T  # torch (out, in)
    n_out, n_in = m.shape
    u, _, vh = np.linalg.svd(m, full_matrices=False)
    u, vh = u[:, :q], vh[:q]
    if vh.shape[0] < q:  # bias=True: PEFT's rank counts the bias column; pad with zeros
        vh = np.concatenate([vh, np.zeros((q - vh.shape[0], n_in))])
        u = np.concatenate([u, np.zeros((n_out, q - u.shape[1]))], axis=1)
    labels = adamss_segments(u.astype(np.float32), num_subspaces)
    k = min(num_subspaces, n_out)
    a = np.zeros((k, subspace_rank, q))
    mask = np.zeros((k, subspace_rank), np.float32)
    for i in range(k):
        d = u[labels == i]
        if d.shape[0] == 0:
            continue
        _, s, wh = np.linalg.svd(d, full_matrices=False)
        if use_dynamic_rank:
            s2 = s * s
            ri = min(int((s2 > svd_threshold * s2[0]).sum()), subspace_rank, s2.size)
        else:
            ri = min(d.shape[0], subspace_rank)
        ri = max(ri, 1)
        a[i, :ri] = wh[:ri]
        mask[i, :ri] = 1.0
    return (vh.T.astype(np.float32), labels, mask, a.astype(np.float32))


def adamss(
    rank: int = 100,
    *,
    num_subspaces: int = 5,
    subspace_rank: int = 1,
    init_weights: bool = True,
    use_dynamic_rank: bool = False,
    svd_threshold: float = 0.1,
    bias: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """AdaMSS: ``ΔW[seg_i] = B_i A_i newB`` per k-means group of output units.

    At init (on the host, NumPy: SVD and k-means, through
    ``jax.pure_callback``) the base's rank-``q`` SVD (``q = min(rank, in,
    out)``) gives the frozen ``newB`` and the groups; ``A_i`` starts at the
    top right singular vectors of ``U[seg_i]`` and ``B_i`` at zero (identity
    at init). Flax layout: ``W' = W0 + basis · M`` with ``M[:, o] =
    a[c(o)]ᵀ b[o]``.

    Args:
      rank: PEFT's ``r``, the SVD rank (clamped to ``min(in, out)``).
      num_subspaces: ``K`` groups (clamped to ``out``).
      subspace_rank: ``R``, each group's rank (at most ``min(rank, in, out)``).
      init_weights: True (PEFT's ``"orthogonal"``): ``B = 0``; False:
        ``B ~ N(0, 0.01²)`` (PEFT's ``None``), a non-identity start.
      use_dynamic_rank: PEFT's ``use_dynamic_rank``.
      svd_threshold: PEFT's ``svd_threshold`` (with ``use_dynamic_rank``).
      bias: PEFT's layout for a Linear with a bias, which PEFT appends to
        ``W`` as an input column (``q = min(rank, in + 1, out)``): the frozen
        ``bias_basis (q,)`` is that column of ``newB`` and the update also
        moves the sibling bias leaf by ``B_i A_i bias_basis``. ``load_peft``
        sets PEFT's column; this init sees the kernel only and sets it to
        zero (the SVD of ``[W | 0]``), so the bias stays put and
        ``save_peft`` refuses such a fresh adapter.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a`` and ``b``.

    Returns:
      An ``Adapter`` with trainable ``AdaMSSParams`` and frozen ``AdaMSSBasis``.

    Static arguments: all.

    Raises:
      ValueError: a non-positive ``rank``, ``num_subspaces`` or
        ``subspace_rank``; ``svd_threshold`` outside ``[0, 1)``;
        ``subspace_rank > min(rank, in, out)`` at init.
      TypeError: a flag is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = adamss(4, num_subspaces=2)
      >>> w = jnp.sin(jnp.arange(30.0)).reshape(5, 6)
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, f.basis.shape, f.labels.shape
      ((2, 1, 4), (6, 1), (5, 4), (6,))
      >>> bool(jnp.allclose(ad.apply(w, t, f), w))
      True
    """
    for arg, v in (("rank", rank), ("num_subspaces", num_subspaces),
                   ("subspace_rank", subspace_rank)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"adamss: {arg} must be a positive int, got {v!r}")
    for flag, v in (("init_weights", init_weights), ("use_dynamic_rank", use_dynamic_rank),
                    ("bias", bias)):
        if not isinstance(v, bool):
            raise TypeError(f"adamss: {flag} must be a bool, got {v!r}")
    if not 0.0 <= float(svd_threshold) < 1.0:
        raise ValueError(f"adamss: svd_threshold must be in [0, 1), got {svd_threshold!r}")
    rank, num_subspaces, subspace_rank = int(rank), int(num_subspaces), int(subspace_rank)
    svd_threshold = float(svd_threshold)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("adamss takes no stats")
        n_in, n_out = w.shape
        q = min(rank, n_in + bias, n_out)  # PEFT appends the bias as a column of W
        if subspace_rank > q:
            raise ValueError(f"adamss: subspace_rank={subspace_rank} exceeds the SVD rank "
                             f"min(rank, in, out)={q} of a matrix (in={n_in}, out={n_out})")
        k = min(num_subspaces, n_out)
        shapes = (jax.ShapeDtypeStruct((n_in, q), jnp.float32),
                  jax.ShapeDtypeStruct((n_out,), jnp.int32),
                  jax.ShapeDtypeStruct((k, subspace_rank), jnp.float32),
                  jax.ShapeDtypeStruct((k, subspace_rank, q), jnp.float32))
        basis, labels, mask, a = jax.pure_callback(
            lambda x: _host_init(x, rank, num_subspaces, subspace_rank,
                                 use_dynamic_rank, svd_threshold, q),
            shapes, w, vmap_method="sequential")
        if init_weights:
            b = jnp.zeros((n_out, subspace_rank), param_dtype)
        else:
            b = 0.01 * jax.random.normal(key, (n_out, subspace_rank), jnp.float32)
            b = (b * mask[labels]).astype(param_dtype)
        return AdaMSSParams(a.astype(param_dtype), b), AdaMSSBasis(
            basis, labels, mask, jnp.zeros((q,), jnp.float32) if bias else None)

    def small(t, f, ct):
        a = t.a.astype(ct) * f.mask.astype(ct)[:, :, None]
        b = t.b.astype(ct) * f.mask.astype(ct)[f.labels]
        return a, b

    def update(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        a, b = small(t, f, ct)
        m = jnp.einsum("orq,or->qo", a[f.labels], b)
        return f.basis.astype(ct) @ m

    def apply_matrix(w, t, f):
        d = update(w, t, f)
        return w.astype(d.dtype) + d

    def unapply_matrix(w, t, f, aux):
        d = update(w, t, f)
        return w.astype(d.dtype) - d

    def factored_matrix(w, t, f):
        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, t.a.dtype)
            a, b = small(t, f, ct)
            p = x.astype(ct) @ f.basis.astype(ct)
            z = jnp.einsum("...q,krq->...kr", p, a)
            return jnp.einsum("...or,or->...o", z[..., f.labels, :], b)

        return _protocol.FactoredTerms(delta=delta)

    def bias_delta(t, f, ct):
        a, b = small(t, f, ct)
        z = a @ f.bias_basis.astype(ct)  # (K, R)
        return jnp.einsum("or,or->o", z[f.labels], b)

    def bias_apply(bias, t, f):
        if f.bias_basis is None:
            return bias
        d = bias_delta(t, f, _lowrank.compute_dtype(bias.dtype, t.a.dtype))
        return bias.astype(d.dtype) + d

    def bias_unapply(bias, t, f):
        if f.bias_basis is None:
            return bias
        d = bias_delta(t, f, _lowrank.compute_dtype(bias.dtype, t.a.dtype))
        return bias.astype(d.dtype) - d

    extras = "".join(f", {k}={v!r}" for k, v, default in (
        ("num_subspaces", num_subspaces, 5), ("subspace_rank", subspace_rank, 1),
        ("init_weights", init_weights, True), ("use_dynamic_rank", use_dynamic_rank, False),
        ("svd_threshold", svd_threshold, 0.1), ("bias", bias, False)) if v != default)
    return _lift.lift_matrix(
        name=f"adamss(rank={rank}{extras})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        factored_matrix=factored_matrix,
        bias=_protocol.BiasHook(name="bias", apply=bias_apply, unapply=bias_unapply),
        dimension_numbers=dimension_numbers,
        hyperparameters=(("rank", rank), ("num_subspaces", num_subspaces),
                         ("subspace_rank", subspace_rank), ("init_weights", init_weights),
                         ("use_dynamic_rank", use_dynamic_rank),
                         ("svd_threshold", svd_threshold), ("bias", bias)),
    )
