# SPDX-License-Identifier: Apache-2.0
"""LoRAM: train LoRA on a pruned model, recover the factors, infer on the full model.

Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language
Models. Zhang, Wang, Li, Shou, Chen, You, Xie, Gong & Zhou, ICLR 2025.
https://openreview.net/forum?id=s7DkcgpRxL (authors' code:
https://github.com/junzhang-zj/LoRAM)

LoRAM (§3) prunes the frozen base ``W0`` to ``W0_P = P(W0)``, trains LoRA
factors on the pruned model only (its memory is the pruned model's), then
recovers them to the full model's shapes, ``(A*, B*) = R(A_P, B_P)``, and
serves ``W0 + s·A*@B*`` on the *unpruned* ``W0``. The paper's variants:

* structured (LoRAM-Rand: random units; LoRAM-Stru: LLM-Pruner's first-order
  importance): whole units are removed, attention heads (a KV head with its
  query heads, the rows of the output projection they feed) and MLP neurons
  (a column of the gate and up kernels, a row of the down kernel). The
  pruned kernels are smaller; recovery scatters the trained rows of ``A``
  (for a cut input axis) and columns of ``B`` (for a cut output axis) back
  to the kept positions, zeros elsewhere (the authors' ``zeroA`` recovery;
  ``fill_a="normal"`` is their ``normA``: ``N(0, 1/r²)`` in ``A``'s removed
  rows). A unit removed from both sides of a product (a neuron, a head)
  thus contributes nothing to the recovered delta, as in training.
* unstructured and semi-structured (LoRAM-Unst / LoRAM-Semi, SparseGPT
  masks in the paper): ``W0_P = W0 ⊙ M`` keeps its shape, so the factors
  need no recovery (``R`` is the identity) and inference uses ``W0 + s·A@B``.
  ``loram_masks`` makes magnitude (or random) masks, unstructured or ``n:m``
  along the input axis; SparseGPT's Hessian-based choice and weight update
  need calibration data and are not reproduced (pass your own boolean masks).

The paper's optional alignment (continued pre-training of the pruned model)
and QLoRAM (4-bit quantised pruned base: ``peftjax.quant.quantize_params``
on ``loram_prune``'s output) are steps outside these functions.

Everything here is a pure function over a parameter tree (any nesting of
dicts; leaves addressed by canonical ``/``-joined paths as in
``peftjax.tree``) and an ``AdapterState``; kernels use the Flax layout ``(...,
in, out)`` with optional leading layer axes (stacked kernels prune each layer
by its own importance).

Recipe::

    groups = [loram_group([(f"layers_{i}/mlp/gate/kernel", -1, 1),
                           (f"layers_{i}/mlp/up/kernel", -1, 1),
                           (f"layers_{i}/mlp/down/kernel", -2, 1)]) for i in ...]
    plan = loram_plan(params, groups, ratio=0.65, importance="random", key=key)
    small = loram_prune(params, plan)
    a = tree.assign(small, rules)            # LoRA on the pruned model
    state = adapters.init(a, key, small)     # ... train on `small` ...
    full = loram_recover(state, plan)        # factors in the full shapes
    merged = adapters.fold(tree.assign(params, rules), params, *full)

Exports: ``LoRAMCut``, ``LoRAMGroup``, ``loram_group``, ``loram_plan``,
``loram_masks``, ``loram_prune``, ``loram_recover``.
"""

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.adapters import _protocol


class LoRAMCut(NamedTuple):
    """One structured cut of a leaf: the kept indices along one matrix axis.

    Attributes:
      axis: ``-2`` (input rows of a Flax kernel) or ``-1`` (output columns).
      kept: ``(k,)`` (or ``(layers..., k)`` for stacked kernels) sorted int32
        indices kept along ``axis``.
      size: the full (unpruned) size along ``axis``.
    """

    axis: int
    kept: jax.Array
    size: int


class LoRAMGroup(NamedTuple):
    """Leaves pruned together, unit by unit (a head, a neuron).

    Attributes:
      members: ``((path, axis, width), ...)``: the leaf at ``path`` loses
        entries ``[u·width, (u+1)·width)`` along ``axis`` (``-2`` or
        ``-1``) for each removed unit ``u``; every member has the same
        number of units (``size // width``).
    """

    members: tuple[tuple[str, int, int], ...]


def loram_group(members: Any) -> LoRAMGroup:
    """A ``LoRAMGroup`` from ``[(path, axis, width), ...]``, checked.

    For an MLP neuron: ``[(gate, -1, 1), (up, -1, 1), (down, -2, 1)]``; for
    a KV head with ``g`` query heads of size ``d`` (grouped-query
    attention): ``[(q, -1, g·d), (k, -1, d), (v, -1, d), (o, -2, g·d)]``
    (the authors' attention recovery).

    Args:
      members: an iterable of ``(path: str, axis: -2 | -1, width: int >= 1)``.

    Returns:
      The ``LoRAMGroup``.

    Raises:
      ValueError: empty, a bad axis or width, or a repeated ``(path, axis)``.

    Example:
      >>> g = loram_group([("up/kernel", -1, 1), ("down/kernel", -2, 1)])
      >>> g.members[1]
      ('down/kernel', -2, 1)
    """
    out = []
    for m in members:
        path, axis, width = m
        if not isinstance(path, str) or axis not in (-2, -1) or isinstance(width, bool) \
                or not isinstance(width, int) or width < 1:
            raise ValueError(f"loram_group: each member is (path: str, axis: -2 or -1, "
                             f"width: int >= 1), got {m!r}")
        out.append((path, axis, width))
    if not out:
        raise ValueError("loram_group: no members")
    if len({(p, a) for p, a, _ in out}) != len(out):
        raise ValueError(f"loram_group: a (path, axis) appears twice in {out!r}")
    return LoRAMGroup(tuple(out))


def _flat(params: Any) -> dict[str, Any]:
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(params, "")
    return flat


def _replace(params: Any, new: dict[str, Any], prefix: str = "") -> Any:
    if isinstance(params, dict):
        return {k: _replace(v, new, f"{prefix}/{k}" if prefix else str(k))
                for k, v in params.items()}
    return new.get(prefix, params)


def _leaf(flat: dict[str, Any], path: str, who: str) -> Any:
    if path not in flat:
        raise ValueError(f"{who}: no leaf at path {path!r}")
    w = flat[path]
    if np.ndim(w) < 2:
        raise ValueError(f"{who}: leaf {path!r} of shape {tuple(np.shape(w))} is not a "
                         "(..., in, out) kernel")
    return w


def _unit_scores(w, g, axis, width, importance):
    """Per-unit importance ``(..., n_units)`` of one member leaf."""
    x = jnp.swapaxes(jnp.asarray(w, jnp.float32), axis, -1)  # (..., other, n)
    n = x.shape[-1]
    if importance == "taylor":
        x = jnp.abs(x * jnp.swapaxes(jnp.asarray(g, jnp.float32), axis, -1))
    else:
        x = x * x
    x = jnp.sum(x, axis=-2)  # (..., n)
    return jnp.sum(x.reshape(x.shape[:-1] + (n // width, width)), axis=-1)


def _expand(units, width):
    steps = jnp.arange(width, dtype=units.dtype).reshape((1,) * units.ndim + (width,))
    idx = units[..., :, None] * width + steps
    return idx.reshape(units.shape[:-1] + (units.shape[-1] * width,))


def loram_plan(params: Any, groups: Any, ratio: float, *, importance: str = "random",
               key: jax.Array | None = None, grads: Any = None) -> dict[str, Any]:
    """Chooses the units each ``LoRAMGroup`` keeps (LoRAM's structured pruning).

    In each group ``int(n_units·ratio)`` units are removed (per layer for
    stacked kernels); the rest are kept, in order. Importance per unit:

    * ``"random"``: LoRAM-Rand (uniform scores from ``key``);
    * ``"taylor"``: LoRAM-Stru's LLM-Pruner first-order importance,
      ``Σ |w·∂L/∂w|`` over every entry of the unit in every member (``grads``:
      a tree like ``params`` with calibration gradients);
    * ``"magnitude"``: ``Σ w²`` over the unit's entries (data-free).

    Args:
      params: the full parameter tree.
      groups: ``LoRAMGroup``s (``loram_group``).
      ratio: the fraction of units removed, in ``[0, 1)``.
      importance: ``"random"`` (default), ``"taylor"`` or ``"magnitude"``.
      key: PRNG key (``"random"``).
      grads: gradients of a calibration loss w.r.t. ``params`` (``"taylor"``).

    Returns:
      ``{path: (LoRAMCut, ...)}`` for ``loram_prune`` and ``loram_recover``.

    Raises:
      ValueError: a bad ratio or importance, a missing key or grads, a
        missing path, member sizes that do not hold the same number of
        units, or a leaf cut twice along one axis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"up": jnp.ones((3, 4)), "down": jnp.ones((4, 3))}
      >>> g = loram_group([("up", -1, 1), ("down", -2, 1)])
      >>> plan = loram_plan(p, [g], 0.5, key=jax.random.key(0))
      >>> [c.kept.shape for c in plan["up"]], plan["down"][0].axis
      ([(2,)], -2)
    """
    who = "loram_plan"
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"{who}: ratio must be in [0, 1), got {ratio!r}")
    if importance not in ("random", "taylor", "magnitude"):
        raise ValueError(f"{who}: importance must be 'random', 'taylor' or 'magnitude', "
                         f"got {importance!r}")
    if importance == "random" and key is None:
        raise ValueError(f"{who}: importance='random' needs key")
    if importance == "taylor" and grads is None:
        raise ValueError(f"{who}: importance='taylor' needs grads")
    flat = _flat(params)
    gflat = _flat(grads) if grads is not None else {}
    plan: dict[str, list] = {}
    for gi, group in enumerate(groups):
        if not isinstance(group, LoRAMGroup):
            group = loram_group(group)
        units, batch = None, None
        for path, axis, width in group.members:
            w = _leaf(flat, path, who)
            size = np.shape(w)[axis]
            if size % width:
                raise ValueError(f"{who}: leaf {path!r} of shape {tuple(np.shape(w))} has "
                                 f"{size} entries along axis {axis}, not a multiple of "
                                 f"width {width}")
            if units is None:
                units, batch = size // width, tuple(np.shape(w)[:-2])
            elif size // width != units or tuple(np.shape(w)[:-2]) != batch:
                raise ValueError(f"{who}: leaf {path!r} of shape {tuple(np.shape(w))} holds "
                                 f"{size // width} units along axis {axis} (leading axes "
                                 f"{tuple(np.shape(w)[:-2])}); the group's first member "
                                 f"holds {units} (leading axes {batch})")
        n_keep = units - int(units * ratio)
        if importance == "random":
            scores = jax.random.uniform(jax.random.fold_in(key, gi), batch + (units,))
        else:
            scores = jnp.zeros(batch + (units,), jnp.float32)
            for path, axis, width in group.members:
                g = _leaf(gflat, path, who) if importance == "taylor" else None
                scores = scores + _unit_scores(flat[path], g, axis, width, importance)
        kept_units = jnp.sort(jax.lax.top_k(scores, n_keep)[1], axis=-1).astype(jnp.int32)
        for path, axis, width in group.members:
            cuts = plan.setdefault(path, [])
            if any(c.axis == axis for c in cuts):
                raise ValueError(f"{who}: leaf {path!r} is cut twice along axis {axis}")
            cuts.append(LoRAMCut(axis, _expand(kept_units, width), units * width))
    return {p: tuple(c) for p, c in plan.items()}


def loram_masks(params: Any, where: str, sparsity: float | None = None, *,
                n_m: tuple[int, int] | None = None, importance: str = "magnitude",
                key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Boolean keep-masks for LoRAM's unstructured or ``n:m`` semi-structured pruning.

    Unstructured (``sparsity``): per output column of each matched kernel,
    the ``int(in·sparsity)`` least important weights are removed.
    Semi-structured (``n_m=(n, m)``, e.g. ``(2, 4)``): of every ``m``
    consecutive inputs of a column, ``n`` are kept. Importance ``|w|``
    (``"magnitude"``) or uniform from ``key`` (``"random"``). The paper uses
    SparseGPT's masks; any boolean masks of the kernels' shapes work with
    ``loram_prune``.

    Args:
      params: the parameter tree.
      where: a regular expression matched (``re.fullmatch``) against the
        ``/``-joined paths of the kernels to prune.
      sparsity: the fraction removed, in ``[0, 1)`` (exclusive with ``n_m``).
      n_m: ``(n, m)`` with ``0 < n <= m`` (``m`` must divide ``in``).
      importance: ``"magnitude"`` (default) or ``"random"``.
      key: PRNG key (``"random"``).

    Returns:
      ``{path: bool mask}``; ``loram_prune`` multiplies, ``loram_recover``
      leaves those paths' factors as they are.

    Raises:
      ValueError: neither or both of ``sparsity`` and ``n_m``, bad values, no
        matched kernel, ``m`` not dividing ``in``, or ``"random"`` without key.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, -4.0], [-3.0, 2.0], [0.5, 1.0], [2.0, 0.1]])
      >>> loram_masks({"k": w}, "k", n_m=(2, 4))["k"].astype(int).T
      Array([[0, 1, 0, 1],
             [1, 1, 0, 0]], dtype=int32)
    """
    who = "loram_masks"
    if (sparsity is None) == (n_m is None):
        raise ValueError(f"{who}: give exactly one of sparsity and n_m")
    if sparsity is not None and not (isinstance(sparsity, (int, float))
                                     and 0 <= sparsity < 1):
        raise ValueError(f"{who}: sparsity must be in [0, 1), got {sparsity!r}")
    if n_m is not None and not (len(n_m) == 2 and 0 < n_m[0] <= n_m[1]):
        raise ValueError(f"{who}: n_m must be (n, m) with 0 < n <= m, got {n_m!r}")
    if importance not in ("magnitude", "random"):
        raise ValueError(f"{who}: importance must be 'magnitude' or 'random', "
                         f"got {importance!r}")
    if importance == "random" and key is None:
        raise ValueError(f"{who}: importance='random' needs key")
    flat = _flat(params)
    paths = [p for p in flat if re.fullmatch(where, p)]
    if not paths:
        raise ValueError(f"{who}: no leaf path matches {where!r}")
    masks = {}
    for i, path in enumerate(sorted(paths)):
        w = _leaf(flat, path, who)
        shape = tuple(np.shape(w))
        score = (jnp.abs(jnp.asarray(w, jnp.float32)) if importance == "magnitude"
                 else jax.random.uniform(jax.random.fold_in(key, i), shape))
        n_in = shape[-2]
        if n_m is not None:
            n, m = n_m
            if n_in % m:
                raise ValueError(f"{who}: m={m} does not divide in={n_in} of {path!r} "
                                 f"(shape {shape})")
            blocks = score.reshape(shape[:-2] + (n_in // m, m, shape[-1]))
        else:
            n, m = n_in - int(n_in * sparsity), n_in
            blocks = score[..., None, :, :]
        # rank within each block along the input axis (0 = most important)
        order = jnp.argsort(-blocks, axis=-2, stable=True)
        rank = jnp.argsort(order, axis=-2, stable=True)
        masks[path] = (rank < n).reshape(shape)
    return masks


def _gather(x, idx, axis):
    """``x`` restricted to ``idx (..., k)`` along ``axis`` (-2 or -1)."""
    ix = idx[..., :, None] if axis == -2 else idx[..., None, :]
    shape = list(x.shape)
    shape[axis] = idx.shape[-1]
    lead = x.ndim - idx.ndim - 1
    ix = ix.reshape((1,) * lead + ix.shape)
    return jnp.take_along_axis(x, jnp.broadcast_to(ix, shape), axis=axis)


@functools.partial(jax.jit, static_argnames=("axis", "size"))
def _scatter(x, kept, fill, *, axis, size):
    """``x`` placed at ``kept`` along ``axis`` in the full ``size``, ``fill`` elsewhere."""
    k = kept.shape[-1]
    # inverse map: position j of the full axis reads x's entry inv[j] (k: the fill)
    inv = jnp.full(kept.shape[:-1] + (size,), k, jnp.int32)
    inv = jnp.put_along_axis(inv, kept, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32),
                                                         kept.shape), axis=-1, inplace=False)
    pad_shape = list(x.shape)
    pad_shape[axis] = 1
    padded = jnp.concatenate([x, jnp.zeros(pad_shape, x.dtype)], axis=axis)
    out = _gather(padded, inv, axis)
    if fill is not None:
        hit = inv < k
        hit = hit[..., :, None] if axis == -2 else hit[..., None, :]
        lead = out.ndim - hit.ndim
        out = jnp.where(hit.reshape((1,) * lead + hit.shape), out, fill.astype(x.dtype))
    return out


def loram_prune(params: Any, plan: dict[str, Any]) -> Any:
    """The pruned base ``P(W0)``: structured cuts gather, masks multiply.

    Args:
      params: the full parameter tree (nested dicts of arrays).
      plan: ``{path: (LoRAMCut, ...)}`` from ``loram_plan`` and/or ``{path:
        bool mask}`` from ``loram_masks`` (merge the dicts to use both).

    Returns:
      A tree like ``params`` with the planned leaves pruned (structured:
      smaller; masked: same shape, zeros where the mask is False).

    Raises:
      ValueError: a path missing from ``params``, a mask of another shape, or
        a cut whose size does not match the leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"up": jnp.arange(6.0).reshape(2, 3)}
      >>> cut = LoRAMCut(-1, jnp.array([0, 2]), 3)
      >>> loram_prune(p, {"up": (cut,)})["up"]
      Array([[0., 2.],
             [3., 5.]], dtype=float32)
    """
    who = "loram_prune"
    flat = _flat(params)
    new = {}
    for path, entry in plan.items():
        w = _leaf(flat, path, who)
        if isinstance(entry, tuple):
            for cut in entry:
                if np.shape(w)[cut.axis] != cut.size:
                    raise ValueError(f"{who}: leaf {path!r} of shape {tuple(np.shape(w))} "
                                     f"has {np.shape(w)[cut.axis]} entries along axis "
                                     f"{cut.axis}, the plan {cut.size}")
                w = _gather(jnp.asarray(w), cut.kept, cut.axis)
        else:
            if tuple(np.shape(entry)) != tuple(np.shape(w)):
                raise ValueError(f"{who}: mask of shape {tuple(np.shape(entry))} for leaf "
                                 f"{path!r} of shape {tuple(np.shape(w))}")
            w = jnp.where(entry, w, jnp.zeros((), w.dtype))
        new[path] = w
    return _replace(params, new)


def loram_recover(state: _protocol.AdapterState, plan: dict[str, Any], *,
                  fill_a: str = "zeros", key: jax.Array | None = None
                  ) -> _protocol.AdapterState:
    """``R``: LoRA factors trained on the pruned model, in the full model's shapes.

    For each cut path: a cut input axis (``-2``) scatters the rows of ``a
    (..., in_P, r)`` back to ``(..., in, r)``; a cut output axis (``-1``)
    the columns of ``b (..., r, out_P)`` to ``(..., r, out)``; removed
    positions are zero (``fill_a="normal"``: ``A``'s removed rows drawn
    from ``N(0, 1/r²)``, the authors' ``normA``). Masked paths and paths not
    in the plan are returned as they are; cut paths without an adapter are
    skipped (a pruned leaf that was not adapted).

    Args:
      state: the ``AdapterState`` trained on ``loram_prune(params, plan)``;
        every cut path's trainable part has fields ``a (…, in, r)`` and ``b
        (…, r, out)`` (``adapters.lora``'s ``LoRAParams`` or alike).
      plan: the plan the base was pruned with.
      fill_a: ``"zeros"`` (default; the authors' ``zeroA``) or ``"normal"``.
      key: PRNG key (``fill_a="normal"``).

    Returns:
      The ``AdapterState`` for ``tree.assign`` on the full ``params``.

    Raises:
      ValueError: a cut path whose adapter has no ``a`` and ``b``, factors
        whose size does not match the cut, a bad ``fill_a``.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import adapters
      >>> t = adapters.LoRAParams(a=jnp.ones((2, 1)), b=jnp.ones((1, 2)))
      >>> s = adapters.AdapterState({"up": t}, {"up": None})
      >>> plan = {"up": (LoRAMCut(-1, jnp.array([0, 2]), 3),)}
      >>> loram_recover(s, plan).trainable["up"].b
      Array([[1., 0., 1.]], dtype=float32)
    """
    who = "loram_recover"
    if fill_a not in ("zeros", "normal"):
        raise ValueError(f"{who}: fill_a must be 'zeros' or 'normal', got {fill_a!r}")
    if fill_a == "normal" and key is None:
        raise ValueError(f"{who}: fill_a='normal' needs key")
    trainable = dict(state.trainable)
    for i, (path, entry) in enumerate(sorted(plan.items())):
        if not isinstance(entry, tuple):
            continue  # a mask: the factors keep their shapes (R is the identity)
        if path not in trainable:
            continue  # a pruned leaf without an adapter: nothing to recover
        t = trainable[path]
        if not (hasattr(t, "a") and hasattr(t, "b") and hasattr(t, "_replace")):
            raise ValueError(f"{who}: the adapter at {path!r} ({type(t).__name__}) has no "
                             "LoRA factors a, b")
        a, b = t.a, t.b
        for cut in entry:
            x = a if cut.axis == -2 else b
            if x.shape[cut.axis] != cut.kept.shape[-1]:
                raise ValueError(f"{who}: factor of shape {tuple(x.shape)} at {path!r} "
                                 f"does not hold the {cut.kept.shape[-1]} kept entries "
                                 f"along axis {cut.axis}")
            if cut.axis == -2:
                fill = None
                if fill_a == "normal":
                    shape = a.shape[:-2] + (cut.size, a.shape[-1])
                    fill = jax.random.normal(jax.random.fold_in(key, i), shape,
                                             jnp.float32) / a.shape[-1]
                a = _scatter(a, cut.kept, fill, axis=-2, size=cut.size)
            else:
                b = _scatter(b, cut.kept, None, axis=-1, size=cut.size)
        trainable[path] = t._replace(a=a, b=b)
    return _protocol.AdapterState(trainable, dict(state.frozen))
