# SPDX-License-Identifier: Apache-2.0
"""SpIEL drop-and-regrow of a fixed-size sparse support, pure and jittable.

Scaling Sparse Fine-Tuning to Large Language Models (SpIEL). Ansell, Vulić,
Sterz, Korhonen, Ponti, 2024. https://arxiv.org/abs/2401.16405

Equation/algorithm map (paper §3.2 and the reference ``SftSelector``):
"update" ↔ the optimizer on ``values``; "prune" (drop the ``n`` entries with
smallest ``|φ−θ0|``) and "regrow" (grow the top-``n`` candidates by
``|Σ grad|``, SpIEL-AG) ↔ ``regrow``; the candidate pool (top-``k`` of the
first accumulated dense gradient) ↔ ``top_k_candidates``; the replaced
fraction (``p = 1`` at the first selection, then ``ξ·(1 − c/T)`` or
``ξ·(1 + cos(π c/T))/2``) ↔ ``replace_fraction`` / ``replace_counts``.
``random_support`` is the initial uniform support; ``top_k`` is the plain
selection heuristic ``scores -> indices``.

Everything works on one matrix's ``(k,)`` arrays with a possibly traced
``num``; ``jax.vmap`` lifts it over stacked layers.

Exports: ``Regrowth``, ``random_support``, ``top_k``, ``top_k_candidates``,
``regrow``, ``replace_fraction``, ``replace_counts``, ``Selector``,
``spiel_selector``.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("linear", "cosine")


class Regrowth(NamedTuple):
    """The result of one drop-and-regrow on a ``(k,)`` support.

    Attributes:
      indices: ``(k,)`` int32, the new support (unique; same shape).
      values: ``(k,)`` values with the replaced slots set to 0.
      changed: ``(k,)`` bool, the replaced slots.
      source: ``(k,)`` int32, for a replaced slot the position in the
        candidate arrays it was grown from (0 where not replaced), to gather
        the candidate's accumulated statistics.
    """

    indices: jax.Array
    values: jax.Array
    changed: jax.Array
    source: jax.Array


def random_support(key: jax.Array, size: int, k: int) -> jax.Array:
    """Returns a uniform random ``k``-subset of ``range(size)``, sorted, int32.

    Args:
      key: PRNG key.
      size: number of positions (static).
      k: subset size (static, ``1 <= k <= size``).

    Returns:
      ``(k,)`` int32 sorted unique positions.

    Example:
      >>> import jax
      >>> random_support(jax.random.key(0), 10, 3).shape
      (3,)
    """
    if not 1 <= k <= size:
        raise ValueError(f"random_support: need 1 <= k <= size, got k={k}, size={size}")
    return jnp.sort(jax.random.permutation(key, size)[:k]).astype(jnp.int32)


def top_k(scores: jax.Array, k: int) -> jax.Array:
    """Selects the ``k`` largest entries of a flat ``scores`` vector (a heuristic).

    Args:
      scores: ``(N,)`` scores (e.g. ``|grad|``, ``|θ−θ0|``).
      k: how many (static).

    Returns:
      ``(k,)`` int32 positions, largest score first.

    Example:
      >>> import jax.numpy as jnp
      >>> top_k(jnp.array([0.1, 3.0, -2.0, 2.0]), 2).tolist()
      [1, 3]
    """
    return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def top_k_candidates(dense_grad: jax.Array, k: int) -> jax.Array:
    """The SpIEL-AG candidate pool: top-``k`` positions by ``|dense grad|``.

    Args:
      dense_grad: ``(N,)`` the flat dense gradient of the first micro-batch of
        an accumulation phase.
      k: the pool size (the reference uses the leaf's ``k``).

    Returns:
      ``(k,)`` int32 positions.

    Example:
      >>> import jax.numpy as jnp
      >>> top_k_candidates(jnp.array([0.1, -3.0, 2.0]), 2).tolist()
      [1, 2]
    """
    return top_k(jnp.abs(dense_grad), k)


def _member(query: jax.Array, pool: jax.Array, keep: jax.Array) -> jax.Array:
    """``query[i] in {pool[j] : keep[j]}`` by sorting (O((k+C) log k), no N-sized mask)."""
    sentinel = jnp.iinfo(jnp.int32).min
    ref = jnp.sort(jnp.where(keep, pool, sentinel))
    pos = jnp.clip(jnp.searchsorted(ref, query), 0, ref.shape[0] - 1)
    return (ref[pos] == query) & (query != sentinel)


def _ordinal(flag: jax.Array, order: jax.Array) -> jax.Array:
    """For each element, its rank among flagged elements in ``order``."""
    ranked = jnp.cumsum(flag[order].astype(jnp.int32)) - 1
    return jnp.zeros_like(ranked).at[order].set(ranked)


def regrow(
    indices: jax.Array,
    values: jax.Array,
    candidates: jax.Array,
    scores: jax.Array,
    num: jax.typing.ArrayLike,
) -> Regrowth:
    """Drops the ``num`` smallest ``|values|`` and regrows the best candidates.

    The reference rule (``SftSelector.select_rigl``): outgoing = the ``num``
    slots of smallest ``|values|``; valid candidates = candidates not in the
    remaining support; incoming = the top ``min(num, #valid)`` valid
    candidates by ``scores``; positions both outgoing and incoming stay
    (value and optimizer state kept); the ``j``-th remaining outgoing slot
    (ascending ``|value|``) receives the ``j``-th incoming position
    (descending score), so ``#dropped == #grown`` and ``k`` never changes.
    Replaced slots get value 0. Ties break towards the lower slot/candidate.

    Args:
      indices: ``(k,)`` int32 current support (unique).
      values: ``(k,)`` current deltas.
      candidates: ``(C,)`` int32 unique candidate positions.
      scores: ``(C,)`` growth scores (``|Σ grad|`` for SpIEL-AG).
      num: how many slots to replace (may be traced; clipped to ``[0, k]``).

    Returns:
      A ``Regrowth(indices, values, changed, source)``.

    Example:
      >>> import jax.numpy as jnp
      >>> r = regrow(jnp.array([0, 1, 2, 3]), jnp.array([0.5, -0.1, 0.3, 0.2]),
      ...            jnp.array([7, 3, 9]), jnp.array([1.0, 5.0, 2.0]), 2)
      >>> r.indices.tolist(), r.changed.tolist()  # 3 is dropped and regrown: kept
      ([0, 9, 2, 3], [False, True, False, False])
    """
    k = indices.shape[0]
    num = jnp.clip(jnp.asarray(num, jnp.int32), 0, k)
    # Prune: slots ranked by ascending |value| (stable: lower slot first).
    slot_order = jnp.argsort(jnp.abs(values), stable=True)
    slot_rank = jnp.zeros((k,), jnp.int32).at[slot_order].set(
        jnp.arange(k, dtype=jnp.int32))
    outgoing = slot_rank < num
    # Valid candidates are not in the remaining support.
    in_remaining = _member(candidates, indices, ~outgoing)
    valid = ~in_remaining
    neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
    cand_score = jnp.where(valid, jnp.abs(scores).astype(jnp.float32), neg_inf)
    cand_order = jnp.argsort(-cand_score, stable=True)
    cand_rank = jnp.zeros(candidates.shape, jnp.int32).at[cand_order].set(
        jnp.arange(candidates.shape[0], dtype=jnp.int32))
    incoming = valid & (cand_rank < num)
    # Both outgoing and incoming: stays as it is.
    inc_also_out = incoming & _member(candidates, indices, outgoing)
    out_also_inc = outgoing & _member(indices, candidates, incoming)
    incoming = incoming & ~inc_also_out
    outgoing = outgoing & ~out_also_inc
    n_in = jnp.sum(incoming.astype(jnp.int32))
    out_ord = _ordinal(outgoing, slot_order)
    in_ord = _ordinal(incoming, cand_order)
    changed = outgoing & (out_ord < n_in)
    # source[j-th incoming] = candidate position; slots look up their ordinal.
    size = max(k, candidates.shape[0])
    by_ord = jnp.zeros((size,), jnp.int32).at[jnp.where(incoming, in_ord, size)].set(
        jnp.arange(candidates.shape[0], dtype=jnp.int32), mode="drop")
    source = jnp.where(changed, by_ord[jnp.clip(out_ord, 0, size - 1)], 0)
    new_indices = jnp.where(changed, candidates[source].astype(indices.dtype), indices)
    new_values = jnp.where(changed, jnp.zeros_like(values), values)
    return Regrowth(new_indices, new_values, changed, source.astype(jnp.int32))


def replace_fraction(count: int, *, accumulation_steps: int, total_steps: int,
                     initial_rate: float, policy: str = "linear") -> float:
    """The fraction ``p`` replaced at completed step ``count`` (host-side, float64).

    Linear: ``p = 1`` at the first selection (``count == accumulation_steps``),
    else ``initial_rate·(1 − count/total_steps)``. Cosine:
    ``initial_rate·(1 + cos(π·count/total_steps))/2`` (no special case).

    Args:
      count: completed optimizer steps at the selection.
      accumulation_steps: ``γ`` (the first selection happens at ``count = γ``).
      total_steps: ``T``.
      initial_rate: ``ξ``.
      policy: ``"linear"`` or ``"cosine"``.

    Returns:
      ``p`` as a Python float.

    Example:
      >>> replace_fraction(5, accumulation_steps=5, total_steps=100, initial_rate=0.2)
      1.0
      >>> round(replace_fraction(25, accumulation_steps=5, total_steps=100,
      ...                        initial_rate=0.2), 6)
      0.15
    """
    if policy not in POLICIES:
        raise ValueError(f"replace_fraction: policy must be one of {POLICIES}, got {policy!r}")
    if policy == "linear":
        if count == accumulation_steps:
            return 1.0
        return initial_rate * (1 - count / total_steps)
    return initial_rate * (1 + math.cos(math.pi * count / total_steps)) / 2


def replace_counts(k: int, *, reselection_steps: int, accumulation_steps: int,
                   total_steps: int, initial_rate: float, policy: str = "linear"
                   ) -> np.ndarray:
    """Per-selection replacement counts ``int(k·p)`` for selections ``e = 0, 1, ...``.

    Selection ``e`` happens at completed step ``e·S + γ`` (none after
    ``total_steps``); the table is computed on the host in float64 exactly as
    the reference's ``int(len(values) * p)``, then indexed with a traced ``e``.

    Args:
      k: slots per matrix.
      reselection_steps: ``S``.
      accumulation_steps: ``γ``.
      total_steps: ``T``.
      initial_rate: ``ξ``.
      policy: ``"linear"`` or ``"cosine"``.

    Returns:
      ``(E,)`` int32 with ``E = T // S + 1`` (0 for selections after ``T``).

    Example:
      >>> replace_counts(10, reselection_steps=20, accumulation_steps=5,
      ...                total_steps=60, initial_rate=0.2).tolist()
      [10, 1, 0, 0]
    """
    out = []
    for e in range(total_steps // reselection_steps + 1):
        c = e * reselection_steps + accumulation_steps
        p = replace_fraction(c, accumulation_steps=accumulation_steps,
                             total_steps=total_steps, initial_rate=initial_rate,
                             policy=policy) if c <= total_steps else 0.0
        out.append(int(k * p))
    return np.asarray(out, np.int32)


class Selector(NamedTuple):
    """A SpIEL reselection schedule and its heuristics, passed as a value.

    ``peftjax.train.trainer(..., sparse=selector)`` takes one.

    Attributes:
      total_steps: ``T``; no reselection after it.
      reselection_steps: ``S``.
      accumulation_steps: ``γ``.
      counts: ``k -> (E,) int32`` replacements at selection ``e``.
      candidates: ``(dense_grad (N,), k) -> (C,) int32`` candidate pool.
      regrow: ``(indices, values, candidates, scores, num) -> Regrowth``.
    """

    total_steps: int
    reselection_steps: int
    accumulation_steps: int
    counts: Callable[[int], np.ndarray]
    candidates: Callable[[jax.Array, int], jax.Array]
    regrow: Callable[..., Regrowth]


def spiel_selector(
    *,
    total_steps: int,
    reselection_steps: int = 20,
    accumulation_steps: int = 5,
    initial_rate: float = 0.2,
    policy: str = "linear",
) -> Selector:
    """The reference SpIEL-AG schedule: top-``k`` |grad| pool, prune/regrow.

    Args:
      total_steps: ``T`` (static).
      reselection_steps: ``S`` (reference 20).
      accumulation_steps: ``γ`` (reference 5); ``0 < γ < S``.
      initial_rate: ``ξ`` (reference 0.2).
      policy: ``"linear"`` (``p = 1`` at the first selection) or ``"cosine"``.

    Returns:
      A ``Selector``.

    Raises:
      ValueError: non-positive steps, ``γ`` outside ``(0, S)``, unknown policy.

    Example:
      >>> sel = spiel_selector(total_steps=60)
      >>> sel.counts(10).tolist()
      [10, 1, 0, 0]
    """
    for name, v in (("total_steps", total_steps), ("reselection_steps", reselection_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"spiel_selector: {name} must be a positive int, got {v!r}")
    if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int)
            or not 0 < accumulation_steps < reselection_steps):
        raise ValueError(
            "spiel_selector: need 0 < accumulation_steps < reselection_steps, got "
            f"accumulation_steps={accumulation_steps!r}, "
            f"reselection_steps={reselection_steps}"
        )
    if policy not in POLICIES:
        raise ValueError(f"spiel_selector: policy must be one of {POLICIES}, got {policy!r}")

    def counts(k: int) -> np.ndarray:
        return replace_counts(k, reselection_steps=reselection_steps,
                              accumulation_steps=accumulation_steps,
                              total_steps=total_steps, initial_rate=initial_rate,
                              policy=policy)

    return Selector(total_steps, reselection_steps, accumulation_steps, counts,
                    top_k_candidates, regrow)
