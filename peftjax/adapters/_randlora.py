# SPDX-License-Identifier: Apache-2.0
"""RandLoRA: a full-rank update from shared random bases and trainable diagonals.

RandLoRA: Full-rank parameter-efficient fine-tuning of large models.
Albert et al., 2025. https://arxiv.org/abs/2502.00987

The paper's update (its method section) ``ΔW = Σ_{b=1..n} B_b Λ_b A Γ_b``
↔ ``randlora_factors``: ``n = ⌈min(in, out)/r⌉``
frozen random rank-``r`` bases ``B_b`` (shared by every layer) against one
shared frozen ``A (r, min)``, each scaled by two trainable diagonal matrices,
``Λ_b (r×r)`` between the factors and ``Γ_b (min×min)`` on the small side,
so that ``n·r ≥ min(in, out)`` makes the sum full rank. Hugging Face PEFT
(``tuners/randlora``), which this module follows for its files, stores

* shared ``A (r, 1, min_max)`` and ``B (max_max, n_max, r)`` (``min_max`` /
  ``max_max`` the smaller / larger of the largest input and output widths
  over the targets); each layer with ``s = min(in, out)``,
  ``L = max(in, out)``, ``n = ⌈s/r⌉`` uses ``A[:, 0, :s]`` and
  ``B[:L, :n, :]``;
* trainable ``λ (r, n)`` (init 0: the identity at init) and ``γ (n, s)``
  (init ``1/max(n, s)``);
* ``U[(k, b), j] = λ[k, b]·A[k, j]·γ[b, j]`` flattened ``k``-major into
  ``(r·n, s)`` and ``V = B[:L, :n, :]`` flattened ``b``-major into
  ``(L, n·r)``, and ``ΔW = (α/r)·V @ U`` on the ``(large, small)`` sides
  (PEFT pairs the flat index ``m`` of both, so the ``(b, k)`` of ``V``'s
  column ``m`` and of ``U``'s row ``m`` differ: a fixed permutation of the
  paper's pairing, reproduced here exactly), default ``r = 32``,
  ``α = 640``.

On a Flax kernel ``(in, out)``: ``ΔW = (α/r)·Uᵀ @ Vᵀ`` when ``in ≤ out``,
else ``(α/r)·V @ U``.

The shared bases are frozen arrays stored once
(``AdapterState.frozen["@shared"]``, ``adapters.Shared`` placeholders in each
leaf's ``RandLoRABasis``), as PEFT shares one pair over all layers; each
matrix slices what it needs. They are regenerated from ``projection_seed``
with JAX's generator, which does not reproduce torch's: PEFT files carry
them (``save_projection=True``, PEFT's default), and ``peftjax.io`` reads
them from there.

Exports: ``RandLoRAParams``, ``RandLoRABasis``, ``RandLoRABases``,
``randlora_shared``, ``randlora``.
"""

import enum
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _shared


class RandLoRAParams(NamedTuple):
    """Trainable RandLoRA diagonals (PEFT's ``randlora_lambda`` / ``randlora_gamma``).

    Attributes:
      lam: ``(r, n)``: ``Λ_b = diag(lam[:, b])``, init 0.
      gamma: ``(n, s)``: ``Γ_b = diag(gamma[b])``, init ``1/max(n, s)``.
    """

    lam: jax.Array
    gamma: jax.Array


class RandLoRABasis(NamedTuple):
    """The shared frozen bases, in PEFT's index order (``A`` without its unit axis).

    In a leaf's frozen part both fields are ``adapters.Shared`` placeholders
    for the arrays in ``AdapterState.frozen["@shared"]`` (or plain copies,
    after ``adapters.unshare``); a matrix with ``s = min(in, out)``,
    ``L = max(in, out)``, ``n = ⌈s/r⌉`` uses ``a[:, :s]`` and ``b[:L, :n]``.

    Attributes:
      a: ``(r, s_max)`` = PEFT's ``randlora_A[:, 0, :]``.
      b: ``(L_max, n_max, r)`` = PEFT's ``randlora_B``.
    """

    a: Any
    b: Any


class RandLoRABases(enum.Enum):
    """How the shared random bases are drawn (PEFT's ``sparse`` / ``very_sparse``).

    Attributes:
      DENSE: uniform entries (PEFT's kaiming-uniform), each basis divided by
        its sample standard deviation (PEFT's default).
      SPARSE: ternary ``{-1, 0, 1}`` with probabilities ``1/6, 2/3, 1/6``,
        divided by the sample standard deviation (``sparse=True``).
      VERY_SPARSE: ternary with ``P(±1) = 1/(2√min_max)`` each
        (``very_sparse=True``).
    """

    DENSE = "dense"
    SPARSE = "sparse"
    VERY_SPARSE = "very_sparse"


def _num_bases(small: int, rank: int) -> int:
    """``n = ⌈small / r⌉``: enough rank-``r`` bases for a full-rank sum."""
    return -(-small // rank)


def randlora_shared(rank: int, max_in: int, max_out: int, *, projection_seed: int = 0,
                    bases: RandLoRABases = RandLoRABases.DENSE,
                    dtype: Any = jnp.float32) -> RandLoRABasis:
    """Regenerates the shared bases (PEFT's index layout) from the seed.

    Args:
      rank: ``r``.
      max_in: the largest input width over the targeted kernels.
      max_out: the largest output width.
      projection_seed: the seed (PEFT's ``projection_prng_key``); JAX's
        generator, so the values are not torch's.
      bases: how the entries are drawn.
      dtype: storage dtype.

    Returns:
      ``RandLoRABasis(a (r, s_max), b (L_max, n_max, r))`` with
      ``s_max = min(max_in, max_out)``, ``L_max = max(max_in, max_out)`` and
      ``n_max = ⌈s_max / r⌉``; each of ``a`` and ``b`` has unit sample
      standard deviation.

    Example:
      >>> s = randlora_shared(4, 10, 6)
      >>> s.a.shape, s.b.shape
      ((4, 6), (10, 2, 4))
    """
    rank = _lora.check_rank(rank, "randlora_shared")
    if not isinstance(bases, RandLoRABases):
        raise TypeError(f"randlora_shared: bases must be a RandLoRABases, got {bases!r}")
    small, large = min(max_in, max_out), max(max_in, max_out)
    return _draw(rank, small, large, int(projection_seed), bases, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=tuple(range(6)))
def _draw(rank: int, small: int, large: int, seed: int, bases: RandLoRABases,
          dtype: Any) -> RandLoRABasis:
    """The shared bases (jitted, every argument static: one compile per shape)."""
    n = _num_bases(small, rank)
    ka, kb = jax.random.split(jax.random.key(seed))
    shape_a, shape_b = (rank, small), (large, n, rank)

    def unit_std(x):
        return (x / jnp.std(x, ddof=1)).astype(dtype)

    if bases is RandLoRABases.DENSE:
        a = jax.random.uniform(ka, shape_a, jnp.float32, -1.0, 1.0)
        b = jax.random.uniform(kb, shape_b, jnp.float32, -1.0, 1.0)
    else:
        sparsity = 3.0 if bases is RandLoRABases.SPARSE else math.sqrt(small)
        cut = 1.0 / (2.0 * sparsity)

        def ternary(key, shape):
            u = jax.random.uniform(key, shape, jnp.float32)
            return jnp.where(u < cut, -1.0, jnp.where(u > 1.0 - cut, 1.0, 0.0))

        a, b = ternary(ka, shape_a), ternary(kb, shape_b)
    return RandLoRABasis(a=unit_std(a), b=unit_std(b))


def randlora_factors(trainable: RandLoRAParams, frozen: RandLoRABasis, n_in: int,
                     n_out: int, scale: float) -> _lowrank.LowRank:
    """The update of one ``(in, out)`` matrix as ``scale · left @ right``.

    Args:
      trainable: ``RandLoRAParams`` of the matrix.
      frozen: the shared ``RandLoRABasis`` (full arrays; sliced here).
      n_in: input width.
      n_out: output width.
      scale: ``α/r``.

    Returns:
      ``LowRank(left (in, n·r), right (n·r, out), scale)`` in the wider of
      the parameters' dtypes: the scaled basis ``U (n·r, s)`` and the
      flattened ``V (L, n·r)`` placed on the input/output sides.

    Example:
      >>> import jax.numpy as jnp
      >>> f = RandLoRABasis(jnp.ones((2, 4)), jnp.ones((6, 2, 2)))
      >>> t = RandLoRAParams(jnp.ones((2, 2)), jnp.ones((2, 3)))
      >>> lr = randlora_factors(t, f, 3, 5, 1.0)
      >>> lr.left.shape, lr.right.shape
      ((3, 4), (4, 5))
    """
    ct = _lowrank.compute_dtype(trainable.lam.dtype, frozen.a.dtype)
    lam = trainable.lam.astype(ct)
    gamma = trainable.gamma.astype(ct)
    r, n = lam.shape
    small, large = min(n_in, n_out), max(n_in, n_out)
    a = frozen.a[:, :small].astype(ct)
    # U[(k, b), j] = λ[k, b]·A[k, j]·γ[b, j], rows k-major (PEFT's flatten order).
    u = (lam[:, :, None] * a[:, None, :] * gamma[None, :, :]).reshape(r * n, small)
    v = frozen.b[:large, :n, :].astype(ct).reshape(large, n * r)  # columns b-major
    if n_in <= n_out:
        return _lowrank.LowRank(left=u.T, right=v.T, scale=scale)
    return _lowrank.LowRank(left=v, right=u, scale=scale)


def randlora(
    rank: int = 32,
    *,
    max_in: int,
    max_out: int,
    alpha: float = 640.0,
    projection_seed: int = 0,
    bases: RandLoRABases = RandLoRABases.DENSE,
    init_weights: bool = True,
    shared_name: str = "randlora",
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """RandLoRA adapter: ``W' = W + (α/r)·Σ_b (shared basis b) scaled by trainable diagonals``.

    With ``s = min(in, out)``, ``L = max(in, out)``, ``n = ⌈s/r⌉``:
    trainable parameters ``n·(r + s)`` per matrix (``λ (r, n)``,
    ``γ (n, s)``). The frozen bases ``A (r, s_max)`` and
    ``B (L_max, n_max, r)`` are stored once for every leaf that names the
    same ``shared_name`` (``AdapterState.frozen["@shared"]``), regenerated
    from ``projection_seed``. Identity at init (``λ = 0``) with
    ``init_weights=True``. Exact inverse (``unfold``): yes.

    Factored form: ``x ↦ (α/r)·(x @ left) @ right`` with ``left (in, M)``,
    ``right (M, out)``, ``M = n·r`` (the scaled basis ``U (M, s)`` is formed
    once per call, never ``W + ΔW`` or its cotangent). Per token that costs
    ``O(M·(in + out))``, i.e. ``O(r·n·(in + out))``; RandLoRA is full rank
    by design (``M ≥ min(in, out)``), so this is about as many FLOPs as the
    dense matmul itself, not the ``O(r·(in+out))`` of a rank-``r`` LoRA.

    Args:
      rank: ``r``, the rank of each random basis (PEFT's default 32; fewer
        trainable parameters as ``r`` grows).
      max_in: the largest input width over all RandLoRA targets (PEFT sizes
        the shared bases from the largest targeted widths; only
        ``min(max_in, max_out)`` and ``max(max_in, max_out)`` shape them, and
        a matrix fits when its smaller and larger sides do).
      max_out: the largest output width over all targets.
      alpha: ``α`` (PEFT's ``randlora_alpha``, default 640); scale ``α/r``.
      projection_seed: seed of the shared bases.
      bases: how the shared bases are drawn (``RandLoRABases``).
      init_weights: True (PEFT's default): ``λ = 0``, ``γ = 1/max(n, s)``;
        False: ``λ ~ N(0, 1)``, ``γ = 1/L`` (PEFT's values before its reset).
      shared_name: the shared bases are ``frozen["@shared"][shared_name +
        "_A" / "_B"]``; adapters naming the same bases must agree on
        ``rank``, the bases' shapes, the seed, ``bases`` and dtype.
      dropout: adapter-input dropout rate (PEFT's ``randlora_dropout``;
        factored path only).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the diagonals and the bases.

    Returns:
      An ``Adapter`` with trainable ``RandLoRAParams`` and frozen
      ``RandLoRABasis`` (``Shared`` placeholders).

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"q": jnp.zeros((6, 5)), "v": jnp.zeros((6, 4))}
      >>> ad = randlora(2, max_in=6, max_out=5, alpha=4.0)
      >>> a = tree.assign(params, [tree.Rule(where="q|v", then=ad)])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> s.trainable["q"].lam.shape, s.trainable["v"].gamma.shape
      ((2, 3), (2, 4))
      >>> shared = s.frozen["@shared"]
      >>> shared["randlora_A"].shape, shared["randlora_B"].shape
      ((2, 5), (6, 3, 2))

    References:
      Albert et al., 2025, https://arxiv.org/abs/2502.00987
    """
    rank = _lora.check_rank(rank, "randlora")
    if not isinstance(bases, RandLoRABases):
        raise TypeError(f"randlora: bases must be a RandLoRABases, got {bases!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"randlora: alpha must be finite, got {alpha!r}")
    for label, v in (("max_in", max_in), ("max_out", max_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"randlora: {label} must be a positive int, got {v!r}")
    if not isinstance(shared_name, str) or not shared_name or shared_name.startswith("@"):
        raise ValueError(f"randlora: shared_name must be a non-empty name, got "
                         f"{shared_name!r}")
    param_dtype = jnp.dtype(param_dtype)
    scale = float(alpha) / rank
    name_a, name_b = f"{shared_name}_A", f"{shared_name}_B"
    small_max, large_max = min(max_in, max_out), max(max_in, max_out)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("randlora takes no stats")
        n_in, n_out = w.shape
        small, large = min(n_in, n_out), max(n_in, n_out)
        if small > small_max or large > large_max:
            raise ValueError(
                f"randlora: matrix (in={n_in}, out={n_out}), dtype {w.dtype}, exceeds "
                f"the shared bases (max_in={max_in}, max_out={max_out}: min side "
                f"{small_max}, max side {large_max}); raise max_in/max_out")
        n = _num_bases(small, rank)
        if init_weights:
            lam = jnp.zeros((rank, n), param_dtype)
            gamma = jnp.full((n, small), 1.0 / max(n, small), param_dtype)
        else:
            lam = jax.random.normal(key, (rank, n), jnp.float32).astype(param_dtype)
            gamma = jnp.full((n, small), 1.0 / large, param_dtype)
        return (RandLoRAParams(lam=lam, gamma=gamma),
                RandLoRABasis(a=_shared.Shared(name_a), b=_shared.Shared(name_b)))

    def init_bases(key, leaves):
        del key, leaves  # the bases come from projection_seed
        full = randlora_shared(rank, max_in, max_out, projection_seed=projection_seed,
                               bases=bases, dtype=param_dtype)
        return _shared.SharedParts(frozen={name_a: full.a, name_b: full.b})

    def factors(w, t, f):
        return randlora_factors(t, f, w.shape[0], w.shape[1], scale)

    def delta(w, t, f):
        lr = factors(w, t, f)
        ct = _lowrank.compute_dtype(w.dtype, lr.left.dtype)
        return ct, (lr.left.astype(ct) @ lr.right.astype(ct)) * jnp.asarray(scale, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t, f)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t, f)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        lr = factors(w, t, f)
        return _protocol.FactoredTerms(
            delta=lambda x: _lowrank.low_rank(x, lr.left, lr.right, lr.scale))

    return _lift.lift_matrix(
        name=(f"randlora(rank={rank}, alpha={float(alpha)!r}, seed={projection_seed}, "
              f"bases={bases.value}, shared={shared_name!r})"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=factored_matrix,
        hyperparameters=(("rank", rank), ("alpha", float(alpha)),
                         ("max_in", max_in), ("max_out", max_out),
                         ("projection_seed", int(projection_seed)),
                         ("bases", bases.value), ("init_weights", bool(init_weights)),
                         ("shared_name", shared_name)),
        shared=_shared.SharedInit(
            group=shared_name,
            config=("randlora", rank, small_max, large_max, int(projection_seed),
                    bases.value, param_dtype.name),
            init=init_bases),
    )
