# SPDX-License-Identifier: Apache-2.0
"""LT-SFT: lottery-ticket sparse fine-tuning masks from a short dense phase.

Composable Sparse Fine-Tuning for Cross-Lingual Transfer. Ansell, Ponti,
Korhonen, Vulić, ACL 2022. https://arxiv.org/abs/2110.07560

Algorithm map (paper §3, reference ``LotteryTicketSparseFineTuner``): step 1
(full fine-tuning from ``θ0``) is the user's ordinary loop; step 2 (the ``K``
entries of largest ``|θ − θ0|`` over all maskable parameters jointly, one
global threshold, ties included) ↔ ``lt_sft_mask``; steps 3–4 (reset to
``θ0``, new optimizer, sparse training) ↔ ``lt_sft`` wrapping any optax
optimizer; export of ``Δ = θ − θ0`` with ``|Δ| > 1e-7`` ↔ ``lt_sft_export``;
composition (adding several SFTs onto ``θ0``) is ``peftjax.adapters.fold``
of the loaded deltas.

[DIFF] The reference multiplies *gradients* by the mask; with weight decay
masked entries would still drift. ``lt_sft`` masks the *update* after the
optimizer, so entries outside the mask stay bit-equal to ``θ0``.

Exports: ``lt_sft_mask``, ``lt_sft``, ``lt_sft_export``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import tree

PyTree = Any


def _maskable(params: PyTree, maskable: PyTree | None) -> PyTree:
    if maskable is None:
        return jax.tree.map(lambda x: bool(jnp.issubdtype(x.dtype, jnp.floating)), params)
    return maskable


def lt_sft_mask(
    params: PyTree,
    params0: PyTree,
    *,
    k: int | None = None,
    proportion: float | None = None,
    maskable: PyTree | None = None,
) -> PyTree:
    """Selects the ``K`` entries of largest ``|θ − θ0|`` with one global threshold.

    Args:
      params: ``θ`` after the dense phase.
      params0: ``θ0`` (same structure).
      k: ``K`` (``ft_params_num``), exclusive with ``proportion``.
      proportion: ``K = int(proportion · #maskable)`` (reference default 0.01).
      maskable: a tree of bools (e.g. ``peftjax.tree.mask``) saying which
        leaves take part; default all floating leaves. Other leaves get an
        all-False mask.

    Returns:
      A tree of bool arrays shaped like ``params``; the count is ``>= K``
      (equal without ties at the threshold).

    Raises:
      ValueError: neither or both of ``k``/``proportion``, ``K`` outside
        ``[1, #maskable]``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = lt_sft_mask({"w": jnp.array([1.0, 5.0, 2.0])},
      ...                 {"w": jnp.zeros(3)}, k=2)
      >>> m["w"].tolist()
      [False, True, True]
    """
    if (k is None) == (proportion is None):
        raise ValueError(
            f"lt_sft_mask: give exactly one of k and proportion, got k={k!r}, "
            f"proportion={proportion!r}"
        )
    maskable = _maskable(params, maskable)
    flags = jax.tree.leaves(maskable)
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(params0), flags, strict=True)
    deltas = [jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).reshape(-1)
              for a, b, m in pairs if m]
    total = sum(int(d.shape[0]) for d in deltas)
    if proportion is not None:
        if not 0.0 < proportion <= 1.0:
            raise ValueError(f"lt_sft_mask: proportion must be in (0, 1], got {proportion}")
        k = int(proportion * total)
    if not 1 <= k <= total:
        raise ValueError(f"lt_sft_mask: K={k} must be in [1, {total}] (maskable entries)")
    threshold = jax.lax.top_k(jnp.concatenate(deltas), k)[0][-1]

    def one(a, b, m):
        if not m:
            return jnp.zeros(jnp.shape(a), bool)
        return jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)) >= threshold

    return jax.tree.map(one, params, params0, maskable)


def lt_sft(inner: optax.GradientTransformation, mask: PyTree
           ) -> optax.GradientTransformation:
    """Masks the updates of ``inner`` after it ran (LT-SFT's sparse phase).

    ``u' = where(mask, u, 0)``, so entries outside the mask receive exactly
    zero updates whatever ``inner`` does (weight decay included) and stay
    bit-equal to ``θ0``. Optimizer state is ``inner``'s (dense-shaped; for a
    ``k``-sized state use ``peftjax.adapters.sparse_delta``).

    Args:
      inner: any optax transform (e.g. ``optax.adamw``), created fresh for
        the sparse phase as in the reference.
      mask: tree of bools shaped like the params (from ``lt_sft_mask``).

    Returns:
      An ``optax.GradientTransformation`` with ``inner``'s state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"w": jnp.ones(3)}
      >>> tx = lt_sft(optax.adamw(0.1, weight_decay=1.0),
      ...             {"w": jnp.array([True, False, True])})
      >>> u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p)
      >>> (u["w"] != 0).tolist()
      [True, False, True]
    """

    def init_fn(params):
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra):
        updates, state = inner.update(updates, state, params, **extra)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)),
                               updates, mask)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lt_sft_export(params: PyTree, params0: PyTree, mask: PyTree, *,
                  threshold: float = 1e-7) -> dict[str, np.ndarray]:
    """Exports ``Δ = θ − θ0`` on the mask, ``|Δ| > threshold``, as indices + values.

    The format is ``peftjax.adapters.sparse_to_compact``'s with no batch axes
    (flat row-major positions over the whole leaf); load it with
    ``peftjax.adapters.sparse_from_compact`` and compose by merging.

    Args:
      params: ``θ`` after the sparse phase.
      params0: ``θ0``.
      mask: the LT-SFT mask.
      threshold: entries with ``|Δ| <= threshold`` are dropped (reference 1e-7).

    Returns:
      ``{"<path>/indices": int32 (n,), "<path>/values": (n,)}`` for leaves
      with at least one entry.

    Example:
      >>> import jax.numpy as jnp
      >>> c = lt_sft_export({"w": jnp.array([[1.0, 0.5]])}, {"w": jnp.zeros((1, 2))},
      ...                   {"w": jnp.array([[True, False]])})
      >>> c["w/indices"].tolist(), c["w/values"].tolist()
      ([0], [1.0])
    """
    flat, flat0, fmask = (tree.leaves_by_path(t) for t in (params, params0, mask))
    out: dict[str, np.ndarray] = {}
    for path, a in flat.items():
        m = np.asarray(fmask[path]).reshape(-1)
        if not m.any():
            continue
        d = (np.asarray(a, np.float32) - np.asarray(flat0[path], np.float32)).reshape(-1)
        keep = m & (np.abs(d) > threshold)
        if not keep.any():
            continue
        idx = np.nonzero(keep)[0].astype(np.int32)
        out[f"{path}/indices"] = idx
        out[f"{path}/values"] = (np.asarray(a).reshape(-1)[idx].astype(np.float32)
                                 - np.asarray(flat0[path]).reshape(-1)[idx].astype(np.float32))
    return out
