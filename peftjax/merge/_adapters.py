# SPDX-License-Identifier: Apache-2.0
"""Arithmetic over LoRA-family adapter states.

Combines several LoRA adapters trained on the same base (Hugging Face PEFT's
``add_weighted_adapter`` covers the same ground). Adapters are
``{path: NamedTuple(a (..., in, r), b (..., r, out))}`` dicts (``LoRAParams``);
the merge layer finds the ``a``/``b`` fields by name and never imports
``peftjax.adapters``. Each adapter's scaling ``s_i`` is passed explicitly
(``peftjax.adapters.scaling_value``), and every result is meant for an
adapter built with ``Scaling.NONE`` (the scalings and weights are folded in).

* ``concatenate``: ``A = [A_1 … A_n]``, ``B = [w_1 s_1 B_1; …; w_n s_n B_n]``,
  rank ``Σ r_i``; exact: ``A·B = Σ w_i s_i A_i B_i``.
* ``svd_refactor``: the dense ``ΔW = Σ w_i s_i A_i B_i`` re-factorised by SVD
  to ``rank``: ``A = U_r √Σ_r``, ``B = √Σ_r V_rᵀ``; exact when
  ``rank >= rank(ΔW)``.
* ``linear``: PEFT's ``"linear"`` combination for equal ranks,
  ``A = Σ √w_i s_i A_i``, ``B = Σ √w_i B_i``; exact for one adapter, an
  approximation with cross terms otherwise.
* ``combine_deltas``: any task-vector merge (TIES, DARE, ...) applied to the
  dense deltas, then ``svd_refactor``-ed to ``rank``.

Exports: ``lora_deltas``, ``concatenate``, ``svd_refactor``, ``linear``,
``combine_deltas``.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peftjax.merge import _common

Trainable = dict[str, Any]


def _check(trainables: Sequence[Trainable], scalings: Sequence[float], fn: str
           ) -> None:
    if isinstance(trainables, dict) or not isinstance(trainables, Sequence):
        raise TypeError(f"{fn}: pass a list of adapter trainable dicts")
    if not trainables:
        raise ValueError(f"{fn}: no adapters given")
    if len(scalings) != len(trainables):
        raise ValueError(f"{fn}: got {len(scalings)} scalings for "
                         f"{len(trainables)} adapters")
    paths = list(trainables[0])
    for i, t in enumerate(trainables):
        if list(t) != paths:
            raise ValueError(f"{fn}: adapter {i} targets {sorted(t)[:10]}, adapter 0 "
                             f"targets {sorted(paths)[:10]}")
        for p, v in t.items():
            if not (hasattr(v, "_fields") and {"a", "b"} <= set(v._fields)):
                raise TypeError(f"{fn}: adapter {i} at {p!r} is "
                                f"{type(v).__name__}, not a LoRA-family (a, b) state")
            shape0 = trainables[0][p]
            if v.a.shape[:-1] != shape0.a.shape[:-1] or \
                    v.b.shape[:-2] + v.b.shape[-1:] != shape0.b.shape[:-2] + \
                    shape0.b.shape[-1:]:
                raise ValueError(
                    f"{fn}: adapter {i} at {p!r} has a {v.a.shape} and b "
                    f"{v.b.shape}, incompatible with adapter 0's a "
                    f"{shape0.a.shape} and b {shape0.b.shape}"
                )


def _new(like: Any, a: jax.Array, b: jax.Array) -> Any:
    return type(like)(a=a, b=b)


def lora_deltas(trainables: Sequence[Trainable], *, scalings: Sequence[float],
                weights: Sequence[Any] | None = None) -> list[dict[str, jax.Array]]:
    """Returns each adapter's dense ``w_i s_i A_i B_i`` per path (float32).

    Args:
      trainables: adapter trainable dicts with ``a``/``b`` fields.
      scalings: each adapter's scaling ``s_i``.
      weights: per-adapter weights (default 1).

    Returns:
      One ``{path: (..., in, out)}`` dict per adapter.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.adapters import LoRAParams
      >>> t = {"w": LoRAParams(jnp.ones((3, 1)), jnp.ones((1, 2)))}
      >>> lora_deltas([t], scalings=[2.0])[0]["w"]
      Array([[2., 2.],
             [2., 2.],
             [2., 2.]], dtype=float32)
    """
    _check(trainables, scalings, "lora_deltas")
    w = _common.check_weights(weights, len(trainables), "lora_deltas")
    out = []
    for t, s, wi in zip(trainables, scalings, w, strict=True):
        out.append({
            p: (v.a.astype(jnp.float32) @ v.b.astype(jnp.float32))
            * jnp.asarray(wi * s, jnp.float32)
            for p, v in t.items()
        })
    return out


def concatenate(trainables: Sequence[Trainable], *, scalings: Sequence[float],
                weights: Sequence[Any] | None = None) -> Trainable:
    """Stacks the ranks: an exact merge of rank ``Σ r_i`` (use ``Scaling.NONE``).

    Args:
      trainables: adapter trainable dicts.
      scalings: each adapter's scaling.
      weights: per-adapter weights.

    Returns:
      ``{path: LoRAParams(a (..., in, Σr), b (..., Σr, out))}``.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.adapters import LoRAParams
      >>> t = {"w": LoRAParams(jnp.ones((3, 1)), jnp.ones((1, 2)))}
      >>> concatenate([t, t], scalings=[1.0, 1.0])["w"].a.shape
      (3, 2)
    """
    _check(trainables, scalings, "concatenate")
    w = _common.check_weights(weights, len(trainables), "concatenate")
    out = {}
    for p in trainables[0]:
        parts = [t[p] for t in trainables]
        a = jnp.concatenate([v.a for v in parts], axis=-1)
        b = jnp.concatenate(
            [v.b * jnp.asarray(wi * s, v.b.dtype)
             for v, wi, s in zip(parts, w, scalings, strict=True)], axis=-2)
        out[p] = _new(parts[0], a, b)
    return out


def _refactor(delta: jax.Array, rank: int, like: Any, dtype: Any) -> Any:
    n_in, n_out = delta.shape[-2:]
    if not 0 < rank <= min(n_in, n_out):
        raise ValueError(f"svd_refactor: rank={rank} must be in [1, min(in, out)="
                         f"{min(n_in, n_out)}] for a delta of shape {delta.shape}")
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    a = u[..., :, :rank] * root[..., None, :]
    b = root[..., :, None] * vt[..., :rank, :]
    return _new(like, a.astype(dtype), b.astype(dtype))


def svd_refactor(trainables: Sequence[Trainable], *, rank: int,
                 scalings: Sequence[float],
                 weights: Sequence[Any] | None = None) -> Trainable:
    """Re-factorises ``Σ w_i s_i A_i B_i`` to ``rank`` by SVD (use ``Scaling.NONE``).

    Args:
      trainables: adapter trainable dicts.
      rank: the target rank (static); exact when >= the delta's rank.
      scalings: each adapter's scaling.
      weights: per-adapter weights.

    Returns:
      ``{path: LoRAParams(a (..., in, rank), b (..., rank, out))}``.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.adapters import LoRAParams
      >>> t = {"w": LoRAParams(jnp.ones((3, 2)), jnp.ones((2, 4)))}
      >>> r = svd_refactor([t], rank=1, scalings=[1.0])["w"]
      >>> bool(jnp.allclose(r.a @ r.b, 2.0))
      True
    """
    deltas = lora_deltas(trainables, scalings=scalings, weights=weights)
    return {
        p: _refactor(sum(d[p] for d in deltas), rank, trainables[0][p],
                     trainables[0][p].a.dtype)
        for p in trainables[0]
    }


def linear(trainables: Sequence[Trainable], *, scalings: Sequence[float],
           weights: Sequence[Any] | None = None) -> Trainable:
    """PEFT's ``"linear"`` combination of equal-rank adapters (approximate).

    Args:
      trainables: adapter trainable dicts of equal rank.
      scalings: each adapter's scaling.
      weights: per-adapter weights (non-negative).

    Returns:
      ``{path: LoRAParams}`` with ``A = Σ √w_i s_i A_i``, ``B = Σ √w_i B_i``.

    Raises:
      ValueError: different ranks or a negative weight.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.adapters import LoRAParams
      >>> t = {"w": LoRAParams(jnp.ones((3, 1)), jnp.ones((1, 2)))}
      >>> float((linear([t], scalings=[2.0], weights=[4.0])["w"].a).sum())
      12.0
    """
    _check(trainables, scalings, "linear")
    w = _common.check_weights(weights, len(trainables), "linear")
    ranks = {t[p].a.shape[-1] for t in trainables for p in t}
    if len(ranks) != 1:
        raise ValueError(f"linear: adapters have ranks {sorted(ranks)}; use "
                         "concatenate or svd_refactor for different ranks")
    if any(float(x) < 0 for x in w):
        raise ValueError(f"linear: weights must be >= 0 (square roots), got {w}")
    out = {}
    for p in trainables[0]:
        parts = [t[p] for t in trainables]
        a = sum(v.a * jnp.asarray(math.sqrt(float(wi)) * s, v.a.dtype)
                for v, wi, s in zip(parts, w, scalings, strict=True))
        b = sum(v.b * jnp.asarray(math.sqrt(float(wi)), v.b.dtype)
                for v, wi in zip(parts, w, strict=True))
        out[p] = _new(parts[0], a, b)
    return out


def combine_deltas(trainables: Sequence[Trainable], *, rank: int,
                   scalings: Sequence[float],
                   combine: Callable[[list[dict[str, jax.Array]]], dict[str, Any]],
                   weights: Sequence[Any] | None = None) -> Trainable:
    """Applies a task-vector merge to the adapters' dense deltas, then SVD.

    Args:
      trainables: adapter trainable dicts.
      rank: the target rank of the result (static).
      scalings: each adapter's scaling.
      combine: a function of a list of ``{path: delta}`` dicts returning one,
        e.g. ``functools.partial(peftjax.merge.combine_ties, density=0.5)``.
      weights: per-adapter weights applied before ``combine``.

    Returns:
      ``{path: LoRAParams}`` of rank ``rank``.

    Example:
      >>> import functools, jax.numpy as jnp
      >>> from peftjax.adapters import LoRAParams
      >>> from peftjax.merge import combine_ties
      >>> t = {"w": LoRAParams(jnp.ones((3, 1)), jnp.ones((1, 2)))}
      >>> r = combine_deltas([t, t], rank=1, scalings=[1.0, 1.0],
      ...                    combine=functools.partial(combine_ties, density=1.0))
      >>> bool(jnp.allclose(r["w"].a @ r["w"].b, 1.0))
      True
    """
    deltas = lora_deltas(trainables, scalings=scalings, weights=weights)
    merged = combine(deltas)
    return {p: _refactor(merged[p], rank, trainables[0][p], trainables[0][p].a.dtype)
            for p in trainables[0]}
