# SPDX-License-Identifier: Apache-2.0
"""SVFT: a sparse trainable mix of the weight's own singular vectors.

SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors. Lingam, Tejaswi,
Vavre, Shetty, Gudur, Ghosh, Dimakis, Choi, Bojchevski & Sanghavi, NeurIPS 2024.
https://arxiv.org/abs/2405.19597

With the thin SVD ``W = U Σ Vᵀ`` of the frozen weight, the paper fine-tunes
``W' = U (Σ + M) Vᵀ`` where ``M (n, n)`` is sparse with a fixed
support: the diagonal (SVFT^P, "plain"), ``d`` off-diagonals on each side
(SVFT^B_d, "banded"), ``k`` random entries (SVFT^R_d, "random"), or the ``k``
entries picked by the singular vectors (SVFT^T_d, "top_k"), with
``k = n(2d + 1) - d(d + 1)``, the count of the band of half-width ``d``, for all
four. The authors' code (``svft/svft_layers.py``, followed here) scales the
trainable values by a trainable gate, ``M = σ(g) · sparse(values)`` with
``g = 0`` at init (so ``σ(g) = 1/2``), and draws ``values`` kaiming-normal
(``N(0, 2/k)``): SVFT is not the identity at init (``zero_init=True`` starts at
``M = 0``). Duplicate random positions add up (a sparse matmul).

Here ``W' = W + U_n M Vₙᵀ``: equal to the paper's form when ``n`` is the full
rank (the default). With ``rank`` below ``min(in, out)`` the authors' code
keeps only ``U_n (Σ_n + M) Vₙᵀ`` and drops the residual ``W - U_n Σ_n Vₙᵀ``;
peftjax keeps it, so the update is the same and ``M = 0`` is the identity.

Orientation. The Flax kernel ``K (in, out)`` is ``Wᵀ``; its SVD
``K = A diag(s) B`` (``A = u (in, n)``, ``B = vt (n, out)``) is torch's with
the sides swapped (``A`` = torch's ``V``, ``B`` = torch's ``Uᵀ``), so torch's
``M[i, j]`` is ``M_K[j, i]`` here: ``ΔK = σ(g) · A M_K B``. ``SVFTBasis.rows``
index ``A``'s columns (input side) and ``cols`` ``B``'s rows (output side). The
banded support is symmetric; the ``top_k`` scores are the code's, transposed:
``Aᵀ B`` for a square kernel, else the square factor (``B`` when
``out < in``, ``A`` when ``in < out``), largest signed values first (the
paper's text selects by the alignment of left and right singular vectors; the
scores here are the code's). ``top_k`` needs the full rank (as the code does).

Factored form: ``Δy = σ(g) · ((x A) M_K) B``: ``2·n·in + 2·k + 2·n·out`` FLOPs
per row (the sparse ``M_K`` by gather and scatter-add), no ``(in, out)``
temporary. The weight-space form costs ``k·out + n·in·out``.

Exports: ``SVFTParams``, ``SVFTBasis``, ``svft``, ``svft_pattern``,
``svft_count``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

PATTERNS = ("plain", "banded", "random", "top_k")


class SVFTParams(NamedTuple):
    """Trainable SVFT parameters (per matrix).

    Attributes:
      values: ``(k,)`` the non-zeros of ``M`` (the code's ``s``).
      gate: ``()`` the code's ``gate``; ``M = sigmoid(gate) · values``.
    """

    values: jax.Array
    gate: jax.Array


class SVFTBasis(NamedTuple):
    """Frozen singular vectors and the support of ``M`` (per matrix).

    Attributes:
      u: ``(in, n)`` left singular vectors of the kernel view ``(in, out)``.
      vt: ``(n, out)`` right singular vectors, transposed.
      singular_values: ``(n,)`` the kernel's ``Σ_n`` (descending; not used by
        ``apply``).
      rows: ``(k,)`` int32, the column of ``u`` of each value.
      cols: ``(k,)`` int32, the row of ``vt`` of each value.
    """

    u: jax.Array
    vt: jax.Array
    singular_values: jax.Array
    rows: jax.Array
    cols: jax.Array


def svft_count(n: int, off_diag: int) -> int:
    """The number of non-zeros ``k = n(2d + 1) - d(d + 1)`` of ``M``.

    Args:
      n: the rank (side of ``M``).
      off_diag: ``d``.

    Returns:
      ``k`` (``n`` for the plain pattern, ``d = 0``).

    Example:
      >>> svft_count(576, 0), svft_count(576, 2)
      (576, 2874)
    """
    return n * (2 * off_diag + 1) - off_diag * (off_diag + 1)


def _banded(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.nonzero(np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= d)
    return r.astype(np.int32), c.astype(np.int32)


def svft_pattern(
    pattern: str,
    u: jax.Array,
    vt: jax.Array,
    off_diag: int = 0,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The support ``(rows, cols)`` of ``M`` for one kernel's singular vectors.

    Args:
      pattern: ``"plain"``, ``"banded"``, ``"random"`` or ``"top_k"``.
      u: ``(in, n)`` left singular vectors of the kernel view.
      vt: ``(n, out)`` right singular vectors, transposed.
      off_diag: ``d`` (0 for ``"plain"``).
      key: PRNG key, used by ``"random"`` only.

    Returns:
      ``rows, cols``: ``(k,)`` int32 each, ``k = svft_count(n, d)``; row-major
      for ``"plain"``/``"banded"``, by decreasing score for ``"top_k"``,
      uniform draws with replacement for ``"random"``.

    Raises:
      ValueError: unknown pattern, ``off_diag`` out of ``[0, n)``, ``"plain"``
        with ``off_diag != 0``, ``"top_k"`` below full rank, ``"random"``
        without a key.

    Example:
      >>> import jax.numpy as jnp
      >>> r, c = svft_pattern("banded", jnp.eye(3), jnp.eye(3), off_diag=1)
      >>> r.tolist(), c.tolist()
      ([0, 0, 1, 1, 1, 2, 2], [0, 1, 0, 1, 2, 1, 2])
    """
    if pattern not in PATTERNS:
        raise ValueError(f"svft: pattern must be one of {PATTERNS}, got {pattern!r}")
    n_in, n = u.shape
    n_out = vt.shape[1]
    if vt.shape[0] != n:
        raise ValueError(f"svft: u {tuple(u.shape)} and vt {tuple(vt.shape)} disagree on n")
    if pattern == "plain" and off_diag != 0:
        raise ValueError(f"svft: pattern='plain' is the diagonal (off_diag=0), got "
                         f"off_diag={off_diag}; use pattern='banded'")
    if not 0 <= off_diag < n:
        raise ValueError(f"svft: off_diag must be in [0, n={n}) for a rank-{n} basis, "
                         f"got {off_diag}")
    k = svft_count(n, off_diag)
    if pattern in ("plain", "banded"):
        r, c = _banded(n, off_diag)
        return jnp.asarray(r), jnp.asarray(c)
    if pattern == "random":
        if key is None:
            raise ValueError("svft: pattern='random' needs a PRNG key")
        kr, kc = jax.random.split(key)
        return (jax.random.randint(kr, (k,), 0, n, jnp.int32),
                jax.random.randint(kc, (k,), 0, n, jnp.int32))
    if n != min(n_in, n_out):
        raise ValueError(f"svft: pattern='top_k' needs the full rank {min(n_in, n_out)}, "
                         f"got a rank-{n} basis")
    if n_in == n_out:
        scores = u.T @ vt
    elif n_out < n_in:
        scores = vt
    else:
        scores = u
    _, flat = jax.lax.top_k(scores.reshape(-1), k)
    return (flat // n).astype(jnp.int32), (flat % n).astype(jnp.int32)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"svft: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def svft(
    pattern: str = "plain",
    *,
    off_diag: int = 0,
    rank: int | None = None,
    zero_init: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """SVFT: ``W' = W + σ(g) · U_n M Vₙᵀ`` with a sparse trainable ``M``.

    ``U_n, V_n`` are the kernel's own top-``n`` singular vectors (SVD in
    float32 or the kernel's wider dtype, at init), frozen with the support of
    ``M``; ``values (k,)`` and the gate ``g`` train: ``k + 1`` per matrix,
    ``k = svft_count(n, off_diag)``. Not
    the identity at init unless ``zero_init`` (the authors' kaiming-normal
    values, see the module docstring). The factored path computes
    ``σ(g)·((x U_n) M) Vₙᵀ`` with a gather/scatter for ``M``.

    Args:
      pattern: ``"plain"`` (SVFT^P, the diagonal), ``"banded"`` (SVFT^B_d),
        ``"random"`` (SVFT^R_d) or ``"top_k"`` (SVFT^T_d); see ``svft_pattern``.
      off_diag: ``d``, the half-width of the band; the random and top-k
        patterns use the same count ``k``. 0 for ``"plain"``.
      rank: ``n``, the number of singular triplets; None (the code's
        default): ``min(in, out)``.
      zero_init: ``values = 0`` (the identity) instead of the authors'
        kaiming-normal ``N(0, 2/k)``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the parameters and the frozen basis.

    Returns:
      An ``Adapter`` with trainable ``SVFTParams(values, gate)`` and frozen
      ``SVFTBasis(u, vt, singular_values, rows, cols)``.

    Static arguments: all.

    Raises:
      ValueError: unknown ``pattern``; ``off_diag`` or ``rank`` not an int in
        range; at init, ``rank > min(in, out)`` or the pattern's constraints
        (``svft_pattern``).
      TypeError: ``zero_init`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = svft("banded", off_diag=1)
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.values.shape, t.gate.shape, f.rows.tolist()
      ((7,), (), [0, 0, 1, 1, 1, 2, 2])
      >>> t0 = t._replace(values=jnp.zeros(7))
      >>> bool(jnp.allclose(ad.apply(w, t0, f), w))
      True

    References:
      Lingam et al., NeurIPS 2024, https://arxiv.org/abs/2405.19597
    """
    if pattern not in PATTERNS:
        raise ValueError(f"svft: pattern must be one of {PATTERNS}, got {pattern!r}")
    off_diag = _check_int("off_diag", off_diag, 0)
    if pattern == "plain" and off_diag != 0:
        raise ValueError(f"svft: pattern='plain' is the diagonal (off_diag=0), got "
                         f"off_diag={off_diag}; use pattern='banded'")
    if rank is not None:
        rank = _check_int("rank", rank, 1)
    if not isinstance(zero_init, bool):
        raise TypeError(f"svft: zero_init must be a bool, got {zero_init!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("svft takes no stats")
        return init_core(key, w)

    @jax.jit  # one compilation per shape, also when called eagerly
    def init_core(key, w):
        full = min(w.shape)
        n = full if rank is None else rank
        if n > full:
            raise ValueError(f"svft: rank={n} exceeds min(in, out)={full} of the matrix "
                             f"view of shape {tuple(w.shape)}")
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
        u, sv, vt = jnp.linalg.svd(w.astype(ct), full_matrices=False)
        u, sv, vt = u[:, :n], sv[:n], vt[:n]
        kp, kv = jax.random.split(key)
        rows, cols = svft_pattern(pattern, u, vt, off_diag, kp)
        k = rows.shape[0]
        if zero_init:
            values = jnp.zeros((k,), param_dtype)
        else:  # torch kaiming_normal_ on a (1, k) view: fan_in = k, gain sqrt(2)
            values = (math.sqrt(2.0 / k) * jax.random.normal(kv, (k,), jnp.float32)
                      ).astype(param_dtype)
        basis = SVFTBasis(u=u.astype(param_dtype), vt=vt.astype(param_dtype),
                          singular_values=sv.astype(param_dtype), rows=rows, cols=cols)
        return SVFTParams(values=values, gate=jnp.zeros((), param_dtype)), basis

    def coefficients(t, ct):
        return t.values.astype(ct) * jax.nn.sigmoid(t.gate.astype(ct))

    def delta(w, t, f):
        ct = _lowrank.compute_dtype(jnp.float32, w.dtype, t.values.dtype, f.u.dtype)
        vt = f.vt.astype(ct)
        # M_K B: row rows[i] gets values[i] · B[cols[i]] (scatter-add, duplicates sum).
        mb = jnp.zeros(vt.shape, ct).at[f.rows].add(
            coefficients(t, ct)[:, None] * vt[f.cols])
        return ct, f.u.astype(ct) @ mb

    @jax.jit
    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    @jax.jit
    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        def term(x):
            ct = _lowrank.compute_dtype(jnp.float32, x.dtype, t.values.dtype, f.u.dtype)
            z = x.astype(ct) @ f.u.astype(ct)  # (..., n)
            coef = coefficients(t, ct)
            picked = z[..., f.rows] * coef.reshape((1,) * (z.ndim - 1) + coef.shape)
            mixed = jnp.zeros(z.shape, ct).at[..., f.cols].add(picked)
            return mixed @ f.vt.astype(ct)

        return _protocol.FactoredTerms(delta=term)

    return _lift.lift_matrix(
        name=f"svft(pattern={pattern}, off_diag={off_diag}, rank={rank})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("pattern", pattern), ("off_diag", off_diag), ("rank", rank),
                         ("zero_init", zero_init)),
    )
