# SPDX-License-Identifier: Apache-2.0
"""Subspace projectors shared by GaLore and FRUGAL, and their leaf plumbing.

A projector is a value (``Projector(init, refresh, down, up)``), not a string:
GaLore and FRUGAL accept any of them. Constructors:

* ``svd()``: the top-r singular subspace of the gradient (exact LAPACK SVD in
  float32), as GaLore (Zhao et al., 2024, arXiv:2403.03507) and FRUGAL's
  GaLore-type projector do;
* ``randomized_svd(oversample, power_iters)``: the same subspace from a
  randomized range finder with a set number of power (subspace) iterations
  (Halko, Martinsson & Tropp, 2011, arXiv:0909.4061);
* ``random_orthogonal()``: a fresh random semi-orthogonal basis per refresh
  (FRUGAL ``proj_type='random'``);
* ``coordinates()``: a random subset of rows or columns (FRUGAL ``randperm`` /
  Coord ``columns`` and ``rows``); its basis is ``int32`` indices.

Sides and layout. peftjax works on a Flax kernel's matrix view
``g: (n_in, n_out)`` (see ``peftjax.tree.DimensionNumbers``). The side names
keep the meaning they have in the PyTorch reference code, whose weights are
``W = gᵀ: (out, in)``, so the same ``proj_type`` projects the same axis of the
same linear layer:

==============  =========================================  ==================
reference name  on the Flax view ``g: (n_in, n_out)``       projected shape
==============  =========================================  ==================
``right``       project the input axis: ``Pᵀ g``, ``P: (n_in, r)``   ``(r, n_out)``
``left``        project the output axis: ``g P``, ``P: (n_out, r)``  ``(n_in, r)``
``full``        both: ``P_inᵀ g P_out``                    ``(r, r)``
``std``         ``right`` if ``n_out >= n_in`` else ``left`` (the smaller
                axis is projected away; ties project the input axis)
``reverse_std`` ``left`` if ``n_out >= n_in`` else ``right``
==============  =========================================  ==================

The side is decided once per leaf from its static shape and kept in the
(static) leaf plan, never re-derived from low-rank shapes (the reference's
``reverse_std`` back-projection bug; docs/galore.md#the-side-table-proj_type).

Exports: ``Projector``, ``svd``, ``randomized_svd``, ``random_orthogonal``,
``coordinates``, ``PROJ_TYPES``. Leaf plans and refresh plumbing live in
``_leaves``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")

# Internal side tags on the Flax view: which axis of g is projected.
SIDE_IN, SIDE_OUT, SIDE_BOTH = "in", "out", "both"


class LeafSpec(NamedTuple):
    """Static projection plan of one matrix (one slice of a stacked leaf).

    Attributes:
      side: ``"in"``, ``"out"`` or ``"both"``: the projected axis of the Flax
        view ``(n_in, n_out)``.
      rank: the projected size ``r`` (may be 0 for FRUGAL with density 0).
      n_in: rows of the matrix view.
      n_out: columns of the matrix view.
    """

    side: str
    rank: int
    n_in: int
    n_out: int

    @property
    def low_shape(self) -> tuple[int, int]:
        """The projected shape ``(r, n_out)``, ``(n_in, r)`` or ``(r, r)``."""
        if self.side == SIDE_IN:
            return (self.rank, self.n_out)
        if self.side == SIDE_OUT:
            return (self.n_in, self.rank)
        return (self.rank, self.rank)


class Projector(NamedTuple):
    """A subspace selector: pure functions over one unbatched matrix.

    Attributes:
      init: ``(spec, dtype) -> basis``: a valid placeholder basis (the first
        ``r`` coordinate axes), used before the first refresh.
      refresh: ``(g, basis, spec, key) -> basis``: a new basis from the float32
        gradient view ``g: (n_in, n_out)``; ``basis`` is the previous one.
      down: ``(g, basis, spec) -> low``: project to ``spec.low_shape``.
      up: ``(low, basis, spec) -> full``: map back to ``(n_in, n_out)``.
      rounding: ``"round"`` or ``"floor"``: how FRUGAL turns a density into a
        rank for this projector (the reference rounds dense projectors and
        floors coordinate ones).
    """

    init: Callable[..., Any]
    refresh: Callable[..., Any]
    down: Callable[..., jax.Array]
    up: Callable[..., jax.Array]
    rounding: str = "round"


# ----------------------------------------------------------------------------
# Dense (orthonormal-basis) projectors.


def _eye_basis(n: int, r: int, dtype) -> jax.Array:
    return jnp.eye(n, r, dtype=dtype)


def _dense_init(spec: LeafSpec, dtype) -> Any:
    if spec.side == SIDE_IN:
        return _eye_basis(spec.n_in, spec.rank, dtype)
    if spec.side == SIDE_OUT:
        return _eye_basis(spec.n_out, spec.rank, dtype)
    return (
        _eye_basis(spec.n_in, spec.rank, dtype),
        _eye_basis(spec.n_out, spec.rank, dtype),
    )


def _dense_down(g: jax.Array, basis: Any, spec: LeafSpec) -> jax.Array:
    if spec.side == SIDE_IN:
        return basis.T.astype(g.dtype) @ g
    if spec.side == SIDE_OUT:
        return g @ basis.astype(g.dtype)
    p_in, p_out = basis
    return p_in.T.astype(g.dtype) @ g @ p_out.astype(g.dtype)


def _dense_up(low: jax.Array, basis: Any, spec: LeafSpec) -> jax.Array:
    if spec.side == SIDE_IN:
        return basis.astype(low.dtype) @ low
    if spec.side == SIDE_OUT:
        return low @ basis.T.astype(low.dtype)
    p_in, p_out = basis
    return p_in.astype(low.dtype) @ low @ p_out.T.astype(low.dtype)


def _finite_or(new: Any, old: Any) -> Any:
    """Keeps ``old`` where ``new`` has a non-finite entry (never passes NaN on)."""
    ok = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)])
    )
    return jax.tree.map(lambda n, o: jnp.where(ok, n.astype(o.dtype), o), new, old)


def _canonical_signs(u: jax.Array, vt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips singular pairs so each output-axis vector's largest entry is > 0.

    Singular vectors are defined up to sign; GaLore keeps its moments across
    refreshes, so the sign convention changes the numbers. Fixing it makes the
    basis a deterministic function of the gradient, independent of LAPACK.
    """
    idx = jnp.argmax(jnp.abs(vt), axis=1)
    s = jnp.sign(jnp.take_along_axis(vt, idx[:, None], axis=1))[:, 0]
    s = jnp.where(s == 0, 1.0, s).astype(vt.dtype)
    return u * s[None, :], vt * s[:, None]


def _pick(u: jax.Array, vt: jax.Array, old: Any, spec: LeafSpec) -> Any:
    r = spec.rank
    u, vt = _canonical_signs(u, vt)
    if spec.side == SIDE_IN:
        new = u[:, :r]
    elif spec.side == SIDE_OUT:
        new = vt[:r, :].T
    else:
        new = (u[:, :r], vt[:r, :].T)
    return _finite_or(new, old)


def svd() -> Projector:
    """Returns the exact-SVD projector (GaLore's, FRUGAL's ``svd``).

    The basis is the top-``r`` singular subspace of the refresh step's
    gradient, computed in float32 with LAPACK (``jnp.linalg.svd``,
    ``full_matrices=False``) and stored in the gradient's dtype. A zero or
    ill-conditioned gradient gives a valid orthonormal basis (LAPACK returns
    coordinate axes for a zero matrix); a non-finite result keeps the old basis.
    Signs are canonical: each singular pair is flipped so that the
    largest-magnitude entry of its output-axis vector is positive (the golden
    tests apply the same convention to the reference).

    Returns:
      A ``Projector``. Basis shapes: ``(n_in, r)``, ``(n_out, r)`` or both.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.optim import _projectors as pr
      >>> spec = pr.LeafSpec("in", 2, 4, 3)
      >>> p = svd().refresh(jnp.ones((4, 3)), svd().init(spec, jnp.float32), spec,
      ...                   jax.random.key(0))
      >>> p.shape
      (4, 2)
    """

    def refresh(g, basis, spec, key):
        del key
        if spec.rank == 0:
            return basis
        u, _, vt = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
        return _pick(u, vt, basis, spec)

    return Projector(_dense_init, refresh, _dense_down, _dense_up, "round")


def _range_finder(a: jax.Array, k: int, power_iters: int, key) -> jax.Array:
    """Orthonormal ``(rows(a), k)`` basis of a's dominant column space."""
    omega = jax.random.normal(key, (a.shape[1], k), jnp.float32)
    q, _ = jnp.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(a.T @ q)
        q, _ = jnp.linalg.qr(a @ z)
    return q


def randomized_svd(oversample: int = 8, power_iters: int = 2) -> Projector:
    """Returns a randomized-SVD projector (range finder + power iterations).

    With ``q = power_iters`` subspace iterations the captured subspace is that
    of ``(g gᵀ)^q g``; the cost is ``O(n_in·n_out·(r+p)·(2q+1))`` matmuls plus a
    small ``(r+p) x n`` SVD, instead of a full LAPACK SVD. Falls back to the
    exact SVD when ``r + p`` reaches the smaller dimension.

    Args:
      oversample: extra random directions ``p`` (static).
      power_iters: subspace iterations ``q`` (static; QR re-orthonormalised).

    Returns:
      A ``Projector`` with the same basis shapes as ``svd()``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.optim import _projectors as pr
      >>> spec = pr.LeafSpec("out", 2, 6, 5)
      >>> proj = randomized_svd(oversample=2, power_iters=1)
      >>> proj.refresh(jnp.ones((6, 5)), proj.init(spec, jnp.float32), spec,
      ...              jax.random.key(0)).shape
      (5, 2)
    """
    if oversample < 0 or power_iters < 0:
        raise ValueError(
            f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}"
        )

    def refresh(g, basis, spec, key):
        if spec.rank == 0:
            return basis
        g = g.astype(jnp.float32)
        k = spec.rank + oversample
        if k >= min(g.shape):
            u, _, vt = jnp.linalg.svd(g, full_matrices=False)
            return _pick(u, vt, basis, spec)
        q = _range_finder(g, k, power_iters, key)  # (n_in, k)
        ub, _, vt = jnp.linalg.svd(q.T @ g, full_matrices=False)
        return _pick(q @ ub, vt, basis, spec)

    return Projector(_dense_init, refresh, _dense_down, _dense_up, "round")


def _random_semi_orthogonal(key, n: int, r: int) -> jax.Array:
    a = jax.random.normal(key, (n, r), jnp.float32)
    q, rr = jnp.linalg.qr(a)
    d = jnp.sign(jnp.diagonal(rr))
    return q * jnp.where(d == 0, 1.0, d)[None, :]


def random_orthogonal() -> Projector:
    """Returns a projector drawing a fresh random semi-orthogonal basis.

    FRUGAL's ``proj_type='random'`` (the reference uses ``orthogonal_`` init);
    the gradient is ignored. Keys come from the transform state.

    Returns:
      A ``Projector`` with the same basis shapes as ``svd()``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.optim import _projectors as pr
      >>> spec = pr.LeafSpec("in", 2, 4, 3)
      >>> p = random_orthogonal().refresh(jnp.zeros((4, 3)), None, spec,
      ...                                 jax.random.key(0))
      >>> bool(jnp.allclose(p.T @ p, jnp.eye(2), atol=1e-5))
      True
    """

    def refresh(g, basis, spec, key):
        del g
        if spec.rank == 0:
            return basis
        k_in, k_out = jax.random.split(key)
        if spec.side == SIDE_IN:
            new = _random_semi_orthogonal(k_in, spec.n_in, spec.rank)
        elif spec.side == SIDE_OUT:
            new = _random_semi_orthogonal(k_out, spec.n_out, spec.rank)
        else:
            new = (
                _random_semi_orthogonal(k_in, spec.n_in, spec.rank),
                _random_semi_orthogonal(k_out, spec.n_out, spec.rank),
            )
        if basis is None:
            return new
        return jax.tree.map(lambda n, o: n.astype(o.dtype), new, basis)

    return Projector(_dense_init, refresh, _dense_down, _dense_up, "round")


# ----------------------------------------------------------------------------
# Coordinate projector.


def _coord_init(spec: LeafSpec, dtype) -> Any:
    del dtype
    if spec.side == SIDE_BOTH:
        return (jnp.arange(spec.rank, dtype=jnp.int32),) * 2
    return jnp.arange(spec.rank, dtype=jnp.int32)


def _coord_down(g, idx, spec):
    if spec.side == SIDE_IN:
        return g[idx, :]
    if spec.side == SIDE_OUT:
        return g[:, idx]
    return g[idx[0], :][:, idx[1]]


def _coord_up(low, idx, spec):
    full = jnp.zeros((spec.n_in, spec.n_out), low.dtype)
    if spec.side == SIDE_IN:
        return full.at[idx, :].set(low)
    if spec.side == SIDE_OUT:
        return full.at[:, idx].set(low)
    return full.at[idx[0][:, None], idx[1][None, :]].set(low)


def coordinates() -> Projector:
    """Returns a projector selecting a random subset of rows or columns.

    FRUGAL's Coord projector (``columns``: the reference's columns are the
    input features, i.e. ``proj_type='right'`` here; ``rows``:
    ``proj_type='left'``) and its ``randperm`` GaLore-type projector. The basis
    is ``int32`` indices, ``(r,)``; ``down`` gathers and ``up`` scatters into
    zeros, so ``up(down(g)) + (g - up(down(g))) == g`` exactly.

    Returns:
      A ``Projector`` whose FRUGAL rank is ``floor(density·dim)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax.optim import _projectors as pr
      >>> spec = pr.LeafSpec("in", 2, 4, 3)
      >>> proj = coordinates()
      >>> idx = proj.refresh(jnp.ones((4, 3)), proj.init(spec, None), spec,
      ...                    jax.random.key(0))
      >>> proj.down(jnp.ones((4, 3)), idx, spec).shape
      (2, 3)
    """

    def refresh(g, basis, spec, key):
        del g
        k_in, k_out = jax.random.split(key)
        perm_in = jax.random.permutation(k_in, spec.n_in)[: spec.rank].astype(jnp.int32)
        perm_out = jax.random.permutation(k_out, spec.n_out)[: spec.rank].astype(
            jnp.int32
        )
        if spec.side == SIDE_IN:
            return perm_in
        if spec.side == SIDE_OUT:
            return perm_out
        return (perm_in, perm_out)

    return Projector(_coord_init, refresh, _coord_down, _coord_up, "floor")


def validate_projector(projector: Any, what: str) -> Projector:
    if not isinstance(projector, Projector):
        raise TypeError(
            f"{what}: projector must be a peftjax.optim Projector (svd(), "
            "randomized_svd(), random_orthogonal(), coordinates()), got "
            f"{type(projector).__name__}"
        )
    return projector
