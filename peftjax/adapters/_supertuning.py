# SPDX-License-Identifier: Apache-2.0
"""Super-Tuning: trainable entries of W at its largest magnitudes (+ optional LoRA).

Super-Tuning. arXiv:2607.09287 (2026).
https://arxiv.org/abs/2607.09287

Super-Tuning freezes ``W`` and trains ``k`` of its own entries, chosen once
from the weight alone by magnitude (no calibration data): ``W' = W + S`` with
``S`` zero outside the support. "Supra" adds a LoRA on top,
``W' = W + S + (α/r)·B·A``. Hugging Face PEFT (``tuners/supertuning``), which
this module follows for its files, keeps ``k = int(out·in·(1 - sparsity))``
entries: ``torch.topk`` of ``|W|`` flattened over the torch weight
``(out, in)`` (the largest with ``select_top``, else the smallest), stored as
flat int32 positions ``supertuning_indices (k,)`` (``row·in + col``) in
topk's order, with the trainable ``supertuning_values (k,)`` float32 at zero
(the identity); Supra's ``supertuning_lora_A (r, in)`` is kaiming-uniform and
``supertuning_lora_B (out, r)`` zero, scaled by ``lora_alpha / r``
(``lora_alpha`` defaults to ``2r``).

On a Flax kernel ``W (in, out)`` the flat torch position ``p`` is
``W[p % in, p // in]``; LoRA's ``a (in, r)``, ``b (r, out)`` are PEFT's
``A.T``, ``B.T``.

Equation map: ``W + S`` (Super) and ``W + S + (α/r)·A·B`` (Supra) ↔
``apply`` (scatter-add plus the low-rank product; ``unapply`` subtracts both);
the support ↔ ``supertuning_support``.

Exports: ``SuperTuningParams``, ``SuperTuningIndices``, ``supertuning``,
``supertuning_support``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class SuperTuningParams(NamedTuple):
    """Trainable parameters of one matrix.

    Attributes:
      values: ``(k,)`` the update at the support (PEFT's ``supertuning_values``).
      a: ``(in, r)`` Supra's LoRA ``A.T``, or None (Super).
      b: ``(r, out)`` Supra's LoRA ``B.T``, or None (Super).
    """

    values: jax.Array
    a: jax.Array | None = None
    b: jax.Array | None = None


class SuperTuningIndices(NamedTuple):
    """Frozen support (PEFT's ``supertuning_indices``).

    Attributes:
      indices: ``(k,)`` int32 flat positions ``row·in + col`` in the torch
        weight ``(out, in)``.
    """

    indices: jax.Array


def supertuning_count(n_in: int, n_out: int, sparsity: float) -> int:
    """``k = int(in·out·(1 - sparsity))``, PEFT's count (at least 1).

    Args:
      n_in: input features.
      n_out: output features.
      sparsity: the fraction of entries left frozen.

    Returns:
      The number of trainable entries.

    Example:
      >>> supertuning_count(6, 4, 0.75)
      6
    """
    k = int(n_in * n_out * (1 - sparsity))
    if k < 1:
        raise ValueError(f"supertuning: sparsity={sparsity} leaves no trainable entry of a "
                         f"matrix with {n_in * n_out} entries (in={n_in}, out={n_out}); "
                         "lower the sparsity")
    return k


def supertuning_support(w: jax.Array, k: int, *, select_top: bool = True) -> jax.Array:
    """PEFT's support: ``torch.topk(|W_torch|.flatten(), k)`` positions.

    Args:
      w: a Flax kernel ``(in, out)``.
      k: the number of entries.
      select_top: the largest magnitudes (True) or the smallest.

    Returns:
      ``(k,)`` int32 flat positions ``row·in + col`` of the torch weight
      ``(out, in)``, largest first (smallest first when not ``select_top``).

    Example:
      >>> import jax.numpy as jnp
      >>> supertuning_support(jnp.array([[1.0, -5.0], [3.0, 0.5]]), 2).tolist()
      [2, 1]
    """
    scores = jnp.abs(w.astype(_lowrank.compute_dtype(w.dtype, jnp.float32))).T.reshape(-1)
    _, idx = jax.lax.top_k(scores if select_top else -scores, k)
    return idx.astype(jnp.int32)


def supertuning(
    sparsity: float = 0.99,
    *,
    select_top: bool = True,
    r: int | None = None,
    lora_alpha: float | None = None,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """Super-Tuning: ``W' = W + S`` on a magnitude support (Supra: ``+ (α/r)·A·B``).

    ``k = int(in·out·(1 - sparsity))`` entries per matrix are trainable,
    chosen at init by ``|W|`` (the paper's data-free magnitude scoring);
    with ``r`` also a rank-``r`` LoRA. Trainable parameters per matrix:
    ``k`` (Super) or ``k + r·(in + out)`` (Supra), PEFT's count.

    The factored path (``peftjax.factored``) never forms ``W'``: the ``k``
    entries add ``x[..., col]·value`` to output ``row`` (a gather and a
    segment-sum), and Supra adds ``(α/r)·(x @ a) @ b``.

    Args:
      sparsity: the frozen fraction in ``[0, 1)`` (PEFT's default 0.99).
      select_top: keep the largest magnitudes (PEFT's default) or the
        smallest (the paper's "-bottom" variants).
      r: Supra's LoRA rank, or None (Super, PEFT's default).
      lora_alpha: Supra's ``α`` (None: ``2r``, PEFT's default); only with
        ``r``.
      init_weights: True (PEFT's default): values and ``b`` zero (the
        identity); False: values ``N(0, 1)`` and ``b`` kaiming-uniform
        (PEFT's test-only init), drawn from the leaf's key.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the trainable arrays (PEFT: float32).

    Returns:
      An ``Adapter`` with trainable ``SuperTuningParams(values, a, b)`` and
      frozen ``SuperTuningIndices(indices)``.

    Static arguments: all.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``, ``r`` not positive,
        ``lora_alpha`` without ``r``, or no entry left (at init, naming the
        leaf).
      TypeError: ``select_top``/``init_weights`` not bools, or a non-float
        ``param_dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = supertuning(0.75, r=1)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 4)))
      >>> t.values.shape, t.a.shape, t.b.shape, f.indices.shape
      ((6,), (6, 1), (1, 4), (6,))

    References:
      Super-Tuning, arXiv:2607.09287
    """
    if (isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real)
            or not 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"supertuning: sparsity must be in [0, 1), got {sparsity!r}")
    sparsity = float(sparsity)
    for name, v in (("select_top", select_top), ("init_weights", init_weights)):
        if not isinstance(v, bool):
            raise TypeError(f"supertuning: {name} must be a bool, got {v!r}")
    if r is not None:
        r = _lora.check_rank(r, "supertuning")
        if lora_alpha is None:
            lora_alpha = 2 * r
        if (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real)):
            raise ValueError(f"supertuning: lora_alpha must be a number, got {lora_alpha!r}")
        lora_alpha = float(lora_alpha)
    elif lora_alpha is not None:
        raise ValueError(f"supertuning: lora_alpha={lora_alpha!r} needs r (Supra mode)")
    param_dtype = jnp.dtype(param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"supertuning: param_dtype must be floating, got {param_dtype}")
    scale = None if r is None else lora_alpha / r

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("supertuning takes no stats")
        n_in, n_out = w.shape
        k = supertuning_count(n_in, n_out, sparsity)
        kv, ka, kb = jax.random.split(key, 3)
        idx = supertuning_support(w, k, select_top=select_top)
        if init_weights:
            vals = jnp.zeros((k,), param_dtype)
        else:
            vals = jax.random.normal(kv, (k,), jnp.float32).astype(param_dtype)
        if r is None:
            return SuperTuningParams(vals), SuperTuningIndices(idx)
        a = _lora.kaiming_uniform_a(ka, n_in, r, param_dtype)
        if init_weights:
            b = jnp.zeros((r, n_out), param_dtype)
        else:
            bound = 1.0 / r ** 0.5
            b = jax.random.uniform(kb, (r, n_out), param_dtype, -bound, bound)
        return SuperTuningParams(vals, a, b), SuperTuningIndices(idx)

    def update(w, t, f, sign):
        ct = _lowrank.compute_dtype(w.dtype, t.values.dtype)
        n_in = w.shape[0]
        vals = t.values.astype(ct)
        out = w.astype(ct).at[f.indices % n_in, f.indices // n_in].add(sign * vals)
        if r is not None:
            out = out + sign * scale * (t.a.astype(ct) @ t.b.astype(ct))
        return out

    def apply_matrix(w, t, f):
        return update(w, t, f, 1)

    def unapply_matrix(w, t, f, aux):
        return update(w, t, f, -1)

    def factored_matrix(w, t, f):
        n_in, n_out = w.shape
        rows, cols = f.indices // n_in, f.indices % n_in

        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, t.values.dtype)
            vals = t.values.astype(ct).reshape((1,) * (x.ndim - 1) + (-1,))
            y = jnp.zeros(x.shape[:-1] + (n_out,), ct).at[..., rows].add(
                x[..., cols].astype(ct) * vals)
            if r is not None:
                y = y + _lowrank.low_rank(x, t.a, t.b, scale)
            return y

        return _protocol.FactoredTerms(delta=delta)

    label = f"supertuning(sparsity={sparsity}, select_top={select_top}"
    label += ")" if r is None else f", r={r}, lora_alpha={lora_alpha})"
    return _lift.lift_matrix(
        name=label,
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("sparsity", sparsity), ("select_top", select_top), ("r", r),
                         ("lora_alpha", lora_alpha), ("init_weights", init_weights)),
    )
