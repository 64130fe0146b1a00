# SPDX-License-Identifier: Apache-2.0
"""PVeRA: VeRA with a learned Gaussian over the projected activations.

PVeRA: Probabilistic Vector-Based Random Matrix Adaptation. Fillioux et al.,
2025 (WACV 2026). https://arxiv.org/abs/2512.07703

As in Hugging Face PEFT (``tuners/pvera``), which this module follows for
its files: shared frozen ``A (2r, in_max)`` (kaiming-uniform,
``U(±√(6/in_max))``) and ``B (out_max, r)`` (``U(±√(6/r))``), drawn A first;
each layer uses ``A[:, :in]`` and ``B[:out, :]``; trainable ``λ_d (2r,)``
(init ``d_initial = 0.1``) and ``λ_b (out,)`` (init 0: the identity at
init). For an input row ``x``, ``h = λ_d ⊙ (A x)`` is split into the mean
``μ = h[:r]`` and log-variance ``ℓ = h[r:]`` of a Gaussian over the rank-``r``
code ``z``, and the layer adds ``λ_b ⊙ (B z)`` (``pvera_delta``):

* evaluation (PEFT's default, ``sample_at_inference=False``): ``z = μ``, a
  fixed linear update ``ΔW = Λ_b B Λ_{d,1} A_1`` with the first halves
  ``λ_{d,1} = λ_d[:r]``, ``A_1 = A[:r]`` (what ``apply`` and PEFT's merge
  compute);
* training in PEFT: ``z = μ + ε ⊙ exp(ℓ/2)``, ``ε ~ N(0, I)`` drawn per
  token (the reparametrisation trick).

What peftjax does in training: an ``Adapter`` maps a weight to a weight and
its factored terms see no PRNG key, so ``materialize``, ``peftjax.factored``
and ``peftjax.train`` train the mean ``z = μ``, the same function PEFT
evaluates. ``λ_d[r:]`` and ``A[r:]`` then get no gradient (they are kept,
and counted, so files and counts match PEFT's). ``pvera_delta`` with a key
is PEFT's sampled term, for a model that calls it itself.

On a Flax kernel ``(in, out)``: ``ΔW = (a₁ · λ_{d,1}) @ (b · λ_b)`` with
``a = A[:, :in]ᵀ (in, 2r)``, ``a₁ = a[:, :r]`` and ``b = B[:out]ᵀ (r, out)``.
The factored path computes ``((x @ a₁) ⊙ λ_{d,1}) @ (b · λ_b)``: ``O(r·(in +
out))`` per token, never ``W + ΔW`` or its cotangent.

The shared matrices are frozen arrays stored once
(``AdapterState.frozen["@shared"]``, ``adapters.Shared`` placeholders in each
leaf's ``PVeRABasis``); each matrix slices what it needs. They are
regenerated from ``projection_seed`` with JAX's generator, which does not
reproduce torch's: PEFT files carry them (``save_projection=True``, PEFT's
default) and ``peftjax.io`` reads them from there.

Exports: ``PVeRAParams``, ``PVeRABasis``, ``pvera_shared``, ``pvera``,
``pvera_delta``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _shared


class PVeRAParams(NamedTuple):
    """Trainable PVeRA vectors.

    Attributes:
      lambda_d: ``(2r,)``: scales of the mean (``[:r]``) and log-variance
        (``[r:]``) projections, init ``d_initial``.
      lambda_b: ``(out,)``, init 0.
    """

    lambda_d: jax.Array
    lambda_b: jax.Array


class PVeRABasis(NamedTuple):
    """The shared frozen matrices (Flax layout).

    In a leaf's frozen part both fields are ``adapters.Shared`` placeholders
    for the arrays in ``AdapterState.frozen["@shared"]`` (or plain copies,
    after ``adapters.unshare``); a matrix ``(in, out)`` uses ``a[:in]`` and
    ``b[:, :out]``.

    Attributes:
      a: ``(in_max, 2r)`` = PEFT's ``pvera_A`` transposed (mean columns first).
      b: ``(r, out_max)`` = PEFT's ``pvera_B`` transposed.
    """

    a: Any
    b: Any


def pvera_shared(rank: int, max_in: int, max_out: int, *, projection_seed: int = 0,
                 dtype: Any = jnp.float32) -> PVeRABasis:
    """Regenerates the shared matrices (Flax layout) from the seed.

    Args:
      rank: ``r``.
      max_in: the largest input width over the targeted kernels.
      max_out: the largest output width.
      projection_seed: the seed (PEFT's ``projection_prng_key``); JAX's
        generator, so the values are not torch's.
      dtype: storage dtype.

    Returns:
      ``PVeRABasis(a (max_in, 2r), b (r, max_out))``.

    Example:
      >>> s = pvera_shared(4, 8, 6)
      >>> s.a.shape, s.b.shape
      ((8, 8), (4, 6))
    """
    rank = _lora.check_rank(rank, "pvera_shared")
    return _draw(rank, max_in, max_out, int(projection_seed), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=tuple(range(5)))
def _draw(rank: int, max_in: int, max_out: int, seed: int, dtype: Any) -> PVeRABasis:
    """The shared matrices (jitted, every argument static: one compile per shape)."""
    ka, kb = jax.random.split(jax.random.key(seed))
    bound_a = math.sqrt(6.0 / max_in)
    bound_b = math.sqrt(6.0 / rank)
    a_t = jax.random.uniform(ka, (2 * rank, max_in), jnp.float32, -bound_a, bound_a)
    b_t = jax.random.uniform(kb, (max_out, rank), jnp.float32, -bound_b, bound_b)
    return PVeRABasis(a=a_t.T.astype(dtype), b=b_t.T.astype(dtype))


def pvera_delta(x: jax.Array, trainable: PVeRAParams, frozen: PVeRABasis, *,
                key: jax.Array | None = None) -> jax.Array:
    """PEFT's additive PVeRA term ``λ_b ⊙ (z @ b)`` of one ``(in, out)`` matrix.

    Args:
      x: ``(..., in)`` adapter input.
      trainable: the matrix's ``PVeRAParams`` (unbatched).
      frozen: the shared ``PVeRABasis`` (full arrays; sliced here).
      key: None: ``z = μ`` (PEFT's evaluation and peftjax's training);
        a key: ``z = μ + ε ⊙ exp(ℓ/2)`` with ``ε ~ N(0, 1)`` of ``μ``'s shape
        (PEFT's training; not torch's draws).

    Returns:
      ``(..., out)`` in the wider of ``x``'s and the parameters' dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = pvera_shared(2, 3, 4)
      >>> t = PVeRAParams(jnp.full((4,), 0.1), jnp.ones((4,)))
      >>> pvera_delta(jnp.ones((5, 3)), t, f).shape
      (5, 4)
    """
    ct = _lowrank.compute_dtype(x.dtype, trainable.lambda_d.dtype, frozen.a.dtype)
    r = frozen.b.shape[0]
    n_in, n_out = x.shape[-1], trainable.lambda_b.shape[-1]
    lead = (1,) * (x.ndim - 1)
    h = (x.astype(ct) @ frozen.a[:n_in].astype(ct)) * trainable.lambda_d.astype(
        ct).reshape(lead + (2 * r,))
    z = h[..., :r]
    if key is not None:
        eps = jax.random.normal(key, z.shape, ct)
        z = z + eps * jnp.exp(0.5 * h[..., r:])
    return (z @ frozen.b[:, :n_out].astype(ct)) * trainable.lambda_b.astype(ct).reshape(
        lead + (n_out,))


def pvera(
    rank: int = 256,
    *,
    max_in: int,
    max_out: int,
    projection_seed: int = 0,
    d_initial: float = 0.1,
    shared_name: str = "pvera",
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """PVeRA adapter (mean form): ``W' = W + (a₁·λ_d[:r]) @ (b·λ_b)``, a, b frozen and shared.

    Identity at init (``λ_b = 0``). Trainable parameters: ``2r + out`` per
    matrix (as PEFT counts; ``λ_d[r:]`` only acts when sampling, see the
    module docstring). The frozen ``a (in_max, 2r)``, ``b (r, out_max)`` are
    stored once for every leaf naming the same ``shared_name``
    (``AdapterState.frozen["@shared"]``), regenerated from
    ``projection_seed``. No ``α/r`` scaling. Exact inverse (``unfold``): yes.
    Factored form: ``((x @ a₁) ⊙ λ_d[:r]) @ (b · λ_b)``, ``O(r·(in + out))``
    per token.

    Args:
      rank: ``r`` (static; PEFT's default 256).
      max_in: the largest input width over all PVeRA targets (the shared
        ``A`` has this many columns); every target must fit.
      max_out: the largest output width over all targets.
      projection_seed: seed of the shared matrices.
      d_initial: initial value of ``λ_d`` (PEFT's default 0.1).
      shared_name: the shared matrices are ``frozen["@shared"][shared_name +
        "_A" / "_B"]``; adapters naming the same matrices must agree on
        ``rank``, ``max_in``, ``max_out``, the seed and dtype.
      dropout: adapter-input dropout rate (PEFT's ``pvera_dropout``;
        factored path only).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype.

    Returns:
      An ``Adapter`` with trainable ``PVeRAParams`` and frozen ``PVeRABasis``
      (``Shared`` placeholders).

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"q": jnp.zeros((8, 6)), "v": jnp.zeros((8, 8))}
      >>> ad = pvera(4, max_in=8, max_out=8)
      >>> a = tree.assign(params, [tree.Rule(where="q|v", then=ad)])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> s.trainable["q"].lambda_d.shape, s.trainable["q"].lambda_b.shape
      ((8,), (6,))
      >>> s.frozen["@shared"]["pvera_A"].shape, s.frozen["@shared"]["pvera_B"].shape
      ((8, 8), (4, 8))

    References:
      Fillioux et al., 2025, https://arxiv.org/abs/2512.07703
    """
    rank = _lora.check_rank(rank, "pvera")
    if not math.isfinite(d_initial):
        raise ValueError(f"pvera: d_initial must be finite, got {d_initial!r}")
    for label, v in (("max_in", max_in), ("max_out", max_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"pvera: {label} must be a positive int, got {v!r}")
    if not isinstance(shared_name, str) or not shared_name or shared_name.startswith("@"):
        raise ValueError(f"pvera: shared_name must be a non-empty name, got "
                         f"{shared_name!r}")
    param_dtype = jnp.dtype(param_dtype)
    name_a, name_b = f"{shared_name}_A", f"{shared_name}_B"

    def init_matrix(key, w, stats):
        del key  # the matrices come from projection_seed, not the leaf key
        if stats is not None:
            raise ValueError("pvera takes no stats")
        n_in, n_out = w.shape
        if n_in > max_in or n_out > max_out:
            raise ValueError(
                f"pvera: matrix (in={n_in}, out={n_out}), dtype {w.dtype}, exceeds the "
                f"shared shape (max_in={max_in}, max_out={max_out}); raise "
                "max_in/max_out")
        t = PVeRAParams(lambda_d=jnp.full((2 * rank,), d_initial, param_dtype),
                        lambda_b=jnp.zeros((n_out,), param_dtype))
        return t, PVeRABasis(a=_shared.Shared(name_a), b=_shared.Shared(name_b))

    def init_shared(key, leaves):
        del key, leaves  # the matrices come from projection_seed
        full = pvera_shared(rank, max_in, max_out, projection_seed=projection_seed,
                            dtype=param_dtype)
        return _shared.SharedParts(frozen={name_a: full.a, name_b: full.b})

    def factors(t, f):
        # The mean path: (a₁ · λ_d[:r]) @ (b · λ_b), sliced to this matrix.
        n_out = t.lambda_b.shape[-1]
        b = f.b[:, :n_out]
        return _lowrank.LowRank(
            left=f.a[:, :rank] * t.lambda_d[:rank].astype(f.a.dtype)[None, :],
            right=b * t.lambda_b.astype(b.dtype)[None, :])

    forms = _lowrank.low_rank_forms(factors)

    def sliced(fn):
        # The left factor's rows are the matrix's inputs: slice a to w's.
        def run(w, t, f, *rest):
            return fn(w, t, f._replace(a=f.a[:w.shape[0]]), *rest)

        return run

    return _lift.lift_matrix(
        name=f"pvera(rank={rank}, seed={projection_seed}, shared={shared_name!r})",
        init_matrix=init_matrix,
        apply_matrix=sliced(forms["apply_matrix"]),
        unapply_matrix=sliced(forms["unapply_matrix"]),
        factored_matrix=sliced(forms["factored_matrix"]),
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("max_in", max_in), ("max_out", max_out),
                         ("projection_seed", int(projection_seed)),
                         ("d_initial", float(d_initial)), ("shared_name", shared_name)),
        shared=_shared.SharedInit(
            group=shared_name,
            config=("pvera", rank, max_in, max_out, int(projection_seed),
                    param_dtype.name),
            init=init_shared),
    )
