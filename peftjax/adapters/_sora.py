# SPDX-License-Identifier: Apache-2.0
"""SoRA: LoRA with a sparsified gate between the factors, pruned afterwards.

Sparse Low-rank Adaptation of Pre-trained Language Models. Ding et al., 2023
(EMNLP). https://arxiv.org/abs/2311.11696

``W' = W + s·A diag(g) B`` on a Flax kernel ``(in, out)`` (``a = A_tᵀ``,
``b = B_tᵀ`` of the torch-layout ``W_t + s·B_t diag(g) A_t``), with a trainable
gate ``g (r,)``. Training applies a proximal (L1 soft-threshold) step to ``g``
after each optimizer step (``peftjax.optim.scale_by_sora``), which drives gates to
exactly zero; ``sora_prune`` then drops the zeroed ranks and returns a plain,
smaller LoRA state with the same weights.

Paper Eq. (gated forward) ↔ ``apply``; the proximal gradient update of ``g``
↔ ``optim.scale_by_sora``; pruning the zeroed ranks ↔ ``sora_prune``.

Conventions: ``a`` is kaiming-uniform (PEFT's LoRA default), ``b = 0`` and
``g = 1``, so the adapter is the identity and starts as plain LoRA. The
reference code draws ``g ~ N(0, 1)`` (the adapter is the identity at init
either way, because ``b = 0``).

Exports: ``SoRAParams``, ``sora``, ``sora_prune``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class SoRAParams(NamedTuple):
    """Trainable SoRA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)``, kaiming-uniform at init.
      b: ``(r, out)``, 0 at init.
      gate: ``(r,)``, 1 at init; sparsified by ``optim.scale_by_sora``.
    """

    a: jax.Array
    b: jax.Array
    gate: jax.Array


def sora(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """SoRA: ``W' = W + s·A diag(g) B`` with trainable ``A``, ``B`` and gate ``g``.

    Identity at init (``B = 0``, ``g = 1``). Trainable parameters:
    ``r·(in + out + 1)`` per matrix. Train with an optimizer followed by
    ``optim.scale_by_sora`` (the L1 proximal step on the gates); afterwards
    ``sora_prune`` gives a plain LoRA state of rank ``#{g ≠ 0}``. The factored
    path computes ``s·((x@A)·g)@B``.

    Args:
      rank: ``r``, the maximal rank (static; ``<= min(in, out)``).
      alpha: ``lora_alpha``.
      scaling: a ``Scaling`` member (as for ``lora``); default ``alpha/r``.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``a``, ``b`` and ``gate``.
      dropout: adapter-input dropout (factored path only, as for ``lora``).

    Returns:
      An ``Adapter`` with trainable ``SoRAParams(a, b, gate)`` and frozen
      part None.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; at init, ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = sora(rank=3, alpha=6.0)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 5)))
      >>> t.a.shape, t.b.shape, t.gate.tolist(), f
      ((6, 3), (3, 5), [1.0, 1.0, 1.0], None)

    References:
      Ding et al., 2023, https://arxiv.org/abs/2311.11696
    """
    rank = _lora.check_rank(rank, "sora")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("sora takes no stats")
        _lora.check_rank_fits(rank, w, "sora")
        n_in, n_out = w.shape
        t = SoRAParams(
            a=_lora.kaiming_uniform_a(key, n_in, rank, param_dtype),
            b=jnp.zeros((rank, n_out), param_dtype),
            gate=jnp.ones((rank,), param_dtype),
        )
        return t, None

    def factors(t, f):
        # A diag(g) B = (A · g) @ B: the gate scales the left factor's columns.
        return _lowrank.LowRank(left=t.a * t.gate.astype(t.a.dtype)[None, :],
                             right=t.b, scale=s)

    return _lift.lift_matrix(
        name=f"sora(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        **_lowrank.low_rank_forms(factors),
    )


def _scale_of(adapter: _protocol.Adapter, rank: int, dtype: Any) -> jax.Array:
    """Reads ``s`` back from a SoRA adapter: its per-matrix apply on a unit probe.

    With ``W = 0 (1, 1)``, ``a = e_0 (1, r)``, ``b = e_0 (r, 1)`` and ``g = 1``
    the adapter returns ``s·1·1·1``, computed exactly as it computes its delta.
    """
    unit = jnp.zeros((rank,), dtype).at[0].set(1)
    probe = SoRAParams(a=unit[None, :], b=unit[:, None], gate=jnp.ones((rank,), dtype))
    return adapter.factored.apply(jnp.zeros((1, 1), dtype), probe, None)[0, 0]


@jax.jit
def _fold(t: SoRAParams, idx: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s·a[..., k]·g[k], b[..., k, :])`` over the kept ranks ``idx (..., r')``."""
    g = jnp.take_along_axis(t.gate.astype(t.a.dtype), idx, axis=-1)
    a = jnp.take_along_axis(t.a, idx[..., None, :], axis=-1) * (s * g)[..., None, :]
    b = jnp.take_along_axis(t.b, idx[..., :, None], axis=-2)
    return a, b


def sora_prune(
    assignment: dict[str, _protocol.Adapter],
    trainable: dict[str, Any],
    frozen: dict[str, Any],
) -> tuple[dict[str, _protocol.Adapter], _protocol.AdapterState]:
    """Turns trained SoRA adapters into plain LoRA adapters of the surviving rank.

    For each SoRA path, the ranks whose gate is exactly 0 are dropped and the
    scale and gates are folded into the left factor: ``a' = s·a[:, k]·g[k]``,
    ``b' = b[k]`` over the kept ranks ``k``, with adapter
    ``lora(r', scaling=Scaling.NONE)`` (same dimension numbers, dtype and
    dropout), so ``materialize`` gives the same weights up to float32
    rounding. ``r' = #{g ≠ 0}`` is a static shape, so call this eagerly
    (outside ``jit``). A stacked leaf keeps one rank for all its layers, the
    largest count; layers with fewer non-zero gates get zero columns. A path
    whose gates are all zero is dropped from the assignment (its weight is the
    base weight). Other adapters and their state pass through unchanged. The
    scale ``s`` is read from each SoRA adapter itself (its per-matrix apply on
    a unit probe), so no hyperparameter has to be repeated.

    Args:
      assignment: ``{path: Adapter}`` with SoRA adapters (others allowed).
      trainable: ``AdapterState.trainable``, SoRA leaves as ``SoRAParams``.
      frozen: ``AdapterState.frozen``.

    Returns:
      ``(assignment', AdapterState(trainable', frozen'))`` for
      ``materialize(assignment', params, *state')``.

    Raises:
      TypeError: when called under ``jit`` (the gates must be concrete), or
        for a ``SoRAParams`` state whose adapter has no factored form.
      ValueError: when ``trainable`` / ``frozen`` lack an assigned path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((6, 5))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=adapters.sora(3))])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> t = s.trainable["w"]._replace(b=jnp.ones((3, 5)),
      ...                               gate=jnp.array([0.5, 0.0, 2.0]))
      >>> a2, s2 = adapters.sora_prune(a, {"w": t}, s.frozen)
      >>> s2.trainable["w"].a.shape, s2.trainable["w"].b.shape
      ((6, 2), (2, 5))
      >>> w1 = adapters.materialize(a, params, {"w": t}, s.frozen)["w"]
      >>> bool(jnp.allclose(adapters.materialize(a2, params, *s2)["w"], w1))
      True

    References:
      Ding et al., 2023, https://arxiv.org/abs/2311.11696
    """
    missing = [p for p in assignment if p not in trainable or p not in frozen]
    if missing:
        raise ValueError(f"sora_prune: the state lacks assigned paths {missing[:10]}")
    new_assignment: dict[str, _protocol.Adapter] = {}
    new_trainable: dict[str, Any] = {}
    new_frozen: dict[str, Any] = {}
    for path, adapter in assignment.items():
        t = trainable[path]
        if not isinstance(t, SoRAParams):
            new_assignment[path] = adapter
            new_trainable[path] = t
            new_frozen[path] = frozen[path]
            continue
        if isinstance(t.gate, jax.core.Tracer):
            raise TypeError(
                f"sora_prune: the gates of {path!r} are traced; the pruned rank is "
                "a static shape, so call sora_prune outside jit")
        if adapter.factored is None:
            raise TypeError(
                f"sora_prune: {adapter!r} on {path!r} has SoRAParams state but no "
                "factored form; was it built by adapters.sora?")
        gate = np.asarray(jax.device_get(t.gate))
        rank = gate.shape[-1]
        nonzero = gate != 0
        kept = int(nonzero.sum(axis=-1).max()) if gate.size else 0
        if kept == 0:
            continue  # every rank pruned: the leaf is its base weight
        # Non-zero gates first (stable, so the kept ranks stay in order); a
        # padded rank of a stacked slice has g = 0 and so a zero column.
        idx = np.argsort(~nonzero, axis=-1, kind="stable")[..., :kept]
        dtype = t.a.dtype
        a, b = _fold(t, jnp.asarray(idx), _scale_of(adapter, rank, dtype))
        new_assignment[path] = _lora.lora(
            kept, scaling=_lora.Scaling.NONE,
            dimension_numbers=adapter.factored.dimension_numbers,
            param_dtype=dtype, dropout=adapter.dropout)
        new_trainable[path] = _lora.LoRAParams(a=a, b=b)
        new_frozen[path] = None
    return new_assignment, _protocol.AdapterState(trainable=new_trainable, frozen=new_frozen)
