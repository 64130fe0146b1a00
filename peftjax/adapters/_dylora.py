# SPDX-License-Identifier: Apache-2.0
"""DyLoRA: one LoRA trained for every rank ``b <= r_max`` at once (nested ranks).

DyLoRA: Parameter-Efficient Tuning of Pretrained Models using Dynamic
Search-Free Low Rank Adaptation. Valipour, Rezagholizadeh, Kobyzev & Ghodsi,
EACL 2023. https://arxiv.org/abs/2210.07558

The paper keeps LoRA's ``h = W0 x + (α/r) W_up W_dw x`` (torch layout,
``W_dw (r, in)``, ``W_up (out, r)``) and, at every training step, samples a
rank ``b ~ p_B`` (uniform on ``{r_min, …, r_max}``) and truncates both
factors to their first ``b`` rows/columns, ``W_dw↓b = W_dw[:b, :]``,
``W_up↓b = W_up[:, :b]``, so that ``h = W0 x + (α/b) W_up↓b W_dw↓b x``. The
components are thereby ordered (nested dropout): the model can be evaluated
at any ``b <= r_max`` after one training run. In the "frozen" variant of the
paper's update only the ``b``-th row/column is updated at that step and the
first ``b − 1`` are held fixed.

The authors' code (huawei-noah/KD-NLP, ``DyLoRA/loralib``: its ``dynamic``
truncation module and ``set_rank(rank, frozen=False)``) scales each
truncated factor by ``sqrt(r_max/b)`` on top of ``α/r_max``, which is the
paper's ``α/b``; its default is the non-frozen update (all first ``b``
components trained), followed here (``frozen=False``); ``frozen=True`` is
the ``b``-th-only update.

On a Flax kernel ``W0 (in, out)``: ``W' = W0 + (α/b)·(a ⊙ m_b)@(b_ ⊙ m_bᵀ)``
with ``a = W_dwᵀ (in, r_max)``, ``b_ = W_upᵀ (r_max, out)`` and ``m_b`` the
0/1 mask of the first ``b`` components. Shapes never depend on ``b``
(static under ``jit``): components ``>= b`` are masked, so their gradient is
exactly zero; with ``frozen=True`` the components ``< b − 1`` pass through
``stop_gradient``.

How the per-step rank reaches the adapter: ``b`` lives in the *frozen*
partition, ``DyLoRARank(rank)`` (an int32 per matrix, ``r_max`` after
``init``, i.e. evaluation at full rank). ``dylora_sample_rank(key, r_max)``
draws ``b`` from a PRNG key and ``dylora_set_rank(state, b)`` writes it into
every DyLoRA entry; both are pure and traceable, so a jitted step that takes
the frozen state as an argument does not retrace when ``b`` changes, and
``materialize``, ``fold`` and the factored path all see the same ``b``.
Evaluation at rank ``b``: ``fold(assignment, params, *dylora_set_rank(state,
b))``. (The adapter-dropout key of ``peftjax.factored`` is not used: it
exists only on the factored path, differs per leaf and per use of a kernel,
and ``materialize`` has none; DyLoRA needs one ``b`` per step for every
leaf, in every path.)

Factored form: ``y = x@W0 + (α/b)·((x@(a ⊙ m_b))@(b_ ⊙ m_bᵀ))``: ``2·r_max·(in
+ out)`` FLOPs per row (masked, not sliced, so that shapes stay static),
never an ``(in, out)`` temporary.

Exports: ``DyLoRAParams``, ``DyLoRARank``, ``dylora``, ``dylora_sample_rank``,
``dylora_set_rank``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class DyLoRAParams(NamedTuple):
    """Trainable DyLoRA factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r_max)`` (``W_dwᵀ``); column ``i`` is the ``i``-th component.
      b: ``(r_max, out)`` (``W_upᵀ``), zero at init.
    """

    a: jax.Array
    b: jax.Array


class DyLoRARank(NamedTuple):
    """Frozen part of ``dylora``: the rank in use (per matrix).

    Attributes:
      rank: int32 scalar ``b`` in ``[1, r_max]`` (values outside are clipped):
        only the first ``b`` components are used (and trained).
    """

    rank: jax.Array


def dylora(
    rank: int,
    *,
    alpha: float = 8.0,
    frozen: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """DyLoRA: a LoRA of maximum rank ``r_max`` usable (and trained) at every ``b <= r_max``.

    ``W' = W + (alpha/b)·a[:, :b]@b_[:b, :]`` where ``b`` is the frozen
    ``DyLoRARank`` (``r_max`` after init). Trainable parameters:
    ``r_max·(in + out)`` per matrix (LoRA's at ``r_max``); the model is
    unchanged at init (``b_ = 0``, ``a`` kaiming-uniform as LoRA's).

    Args:
      rank: ``r_max`` (static; ``<= min(in, out)``); the paper uses 8.
      alpha: ``α``; the scale at rank ``b`` is ``α/b`` (8, as ``lora``).
      frozen: if True, only the ``b``-th component is updated at a step
        (the first ``b − 1`` are held by ``stop_gradient``); the authors'
        default, False, updates all first ``b``.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the factors.
      dropout: dropout on the adapter input (factored path only, as ``lora``).

    Returns:
      An ``Adapter`` with trainable ``DyLoRAParams(a, b)`` and frozen
      ``DyLoRARank(rank)``.

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``; at init, ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = dylora(4)
      >>> t, f = jax.eval_shape(ad.init, jax.random.key(0), jnp.ones((6, 5)))
      >>> t.a.shape, t.b.shape, f.rank.shape, ad.num_trainable(jnp.ones((6, 5)))
      ((6, 4), (4, 5), (), 44)

    References:
      Valipour et al., 2023, https://arxiv.org/abs/2210.07558
    """
    r_max = _lora.check_rank(rank, "dylora")
    alpha = _lora.check_alpha(alpha, "dylora")
    if not isinstance(frozen, bool):
        raise TypeError(f"dylora: frozen must be a bool, got {frozen!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("dylora takes no stats")
        _lora.check_rank_fits(r_max, w, "dylora")
        n_in, n_out = w.shape
        return (DyLoRAParams(a=_lora.kaiming_uniform_a(key, n_in, r_max, param_dtype),
                             b=jnp.zeros((r_max, n_out), param_dtype)),
                DyLoRARank(rank=jnp.asarray(r_max, jnp.int32)))

    def factors(t, f):
        b = jnp.clip(f.rank, 1, r_max)
        j = jnp.arange(r_max, dtype=jnp.int32)
        keep = j < b
        a, up = t.a, t.b
        if frozen:  # only the b-th component learns at this step
            held = (j < b - 1)
            a = jnp.where(held[None, :], jax.lax.stop_gradient(a), a)
            up = jnp.where(held[:, None], jax.lax.stop_gradient(up), up)
        a = jnp.where(keep[None, :], a, jnp.zeros_like(a))
        up = jnp.where(keep[:, None], up, jnp.zeros_like(up))
        # α/b as a per-component scale on a (b is traced: LowRank.scale is static)
        ct = _lowrank.compute_dtype(a.dtype, jnp.float32)
        s = jnp.asarray(alpha, ct) / b.astype(ct)
        return _lowrank.LowRank(left=a * s.astype(a.dtype), right=up, scale=1.0)

    hyper = (("rank", r_max), ("alpha", alpha), ("frozen", frozen))
    return _lift.lift_matrix(
        name=f"dylora(rank={r_max}, alpha={alpha}, frozen={frozen})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=hyper,
        **_lowrank.low_rank_forms(factors),
    )


def dylora_sample_rank(key: jax.Array, r_max: int, *, r_min: int = 1) -> jax.Array:
    """Draws the step's rank ``b`` uniformly from ``{r_min, …, r_max}`` (the paper's ``p_B``).

    Args:
      key: a PRNG key (fold the step in for a new ``b`` each step).
      r_max: the largest rank (the adapters' ``rank``).
      r_min: the smallest rank (1).

    Returns:
      An int32 scalar, traceable (usable inside ``jit``).

    Raises:
      ValueError: not ``1 <= r_min <= r_max``.

    Example:
      >>> import jax
      >>> b = dylora_sample_rank(jax.random.key(0), 8)
      >>> 1 <= int(b) <= 8
      True
    """
    r_max = _lora.check_rank(r_max, "dylora_sample_rank")
    r_min = _lora.check_rank(r_min, "dylora_sample_rank")
    if r_min > r_max:
        raise ValueError(f"dylora_sample_rank: need r_min <= r_max, got r_min={r_min}, "
                         f"r_max={r_max}")
    return jax.random.randint(key, (), r_min, r_max + 1, dtype=jnp.int32)


def dylora_set_rank(state: Any, rank: Any) -> Any:
    """Sets the rank ``b`` of every DyLoRA entry of an adapter state.

    Args:
      state: an ``AdapterState``, or its ``frozen`` dict.
      rank: ``b``: a Python int ``>= 1`` or an integer scalar array (traced
        values allowed, e.g. from ``dylora_sample_rank``); it is clipped to
        ``[1, r_max]`` of each adapter when applied.

    Returns:
      The same kind of object with each ``DyLoRARank`` replaced (stacked
      entries get ``b`` in every layer); other entries are unchanged.

    Raises:
      ValueError: no DyLoRA entry, or a Python ``rank < 1``.
      TypeError: ``rank`` is not an integer.

    Example:
      >>> import jax.numpy as jnp
      >>> frozen = {"w": DyLoRARank(jnp.asarray(4, jnp.int32)), "v": None}  # r_max = 4
      >>> int(dylora_set_rank(frozen, 2)["w"].rank)
      2
    """
    if isinstance(rank, bool):
        raise TypeError(f"dylora_set_rank: rank must be an integer, got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"dylora_set_rank: rank must be >= 1, got rank={rank}")
    else:
        dtype = getattr(rank, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(rank):
            raise TypeError("dylora_set_rank: rank must be an int or an integer scalar "
                            f"array, got {rank!r}")
    is_state = isinstance(state, _protocol.AdapterState)
    frozen = state.frozen if is_state else state
    if not any(isinstance(f, DyLoRARank) for f in frozen.values()):
        raise ValueError("dylora_set_rank: the state has no DyLoRA entry (DyLoRARank)")
    # a fresh buffer per entry: a donating step (train.trainer) must not receive
    # one buffer twice, nor delete the caller's ``rank``
    new = {p: (DyLoRARank(jnp.array(jnp.full(jnp.shape(f.rank), rank, jnp.int32), copy=True))
               if isinstance(f, DyLoRARank) else f)
           for p, f in frozen.items()}
    return state._replace(frozen=new) if is_state else new
