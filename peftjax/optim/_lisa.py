# SPDX-License-Identifier: Apache-2.0
"""LISA: layerwise importance sampling as an optax transform.

Pan, Liu, Diao, Pi, Zhang & Zhang, "LISA: Layerwise Importance Sampling for
Memory-Efficient Large Language Model Fine-Tuning", 2024,
https://arxiv.org/abs/2403.17919.

Paper ↔ code (Algorithm 1; LMFlow ``lisa_trainer.py``): every ``K``
(``interval``) steps, freeze all transformer layers and unfreeze ``γ``
(``n_active``) sampled uniformly without replacement ↔ the active index set
drawn at ``count % interval == 0`` from the state's key; embeddings and head
(every leaf that is not a layer leaf) are always trained ↔ their updates pass
through ``inner`` unmasked.

Layer leaves are found by path: ``layers`` is a regex whose first group is
the layer index (unrolled ``layers/(\\d+)/.*``), ``stacked`` a regex for
scanned leaves whose axis 0 is the layer axis. Shapes are static; the active
set is data.

State policies (docs/methods.md#lisa):

* ``keep`` (LMFlow parity): inactive layers get no update and their moments
  are untouched, resumed on re-activation. Memory equals the inner's full
  state. The inner's step count is shared (LMFlow's per-parameter Adam steps
  are not), so bias correction of a re-activated layer differs slightly.
* ``reset``: the inner state is re-initialised at each re-selection. Stacked
  leaves hold moments only for the ``γ`` active layers, ``(γ, ...)``,
  gathered and scattered by index; unrolled layer leaves keep full-shape
  state that stays zero while inactive.

Exports: ``LISAState``, ``scale_by_lisa``, ``lisa``.
"""

import numbers
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _leaves

_WHAT = "scale_by_lisa"
STATE_POLICIES = ("keep", "reset")


class LISAState(NamedTuple):
    """State of ``scale_by_lisa``.

    Attributes:
      count: steps taken. # shape=(), dtype=jnp.int32
      inner_state: the inner state (``reset``: stacked leaves ``(γ, ...)``).
      active: indices of the trained layers. # shape=(γ,), dtype=jnp.int32
      key: raw ``uint32`` PRNG key data. # shape=(2,), dtype=jnp.uint32
    """

    count: jax.Array
    inner_state: optax.OptState
    active: jax.Array
    key: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "inner_state": tree.StateRole.LIKE_PARAMS,
                   "active": tree.StateRole.REPLICATED,
                   "key": tree.StateRole.REPLICATED}


def _kinds(params, layers, stacked, n_layers):
    """Per leaf: ``("layer", i)``, ``("stacked", None)`` or ``("always", None)``."""
    out = []
    for path, leaf in tree.flatten(params):
        if stacked is not None and re.fullmatch(stacked, path):
            if not leaf.shape or leaf.shape[0] != n_layers:
                raise ValueError(
                    f"{_WHAT}: stacked leaf {path!r} (shape {tuple(leaf.shape)}, "
                    f"dtype {leaf.dtype}) needs a leading layer axis of n_layers="
                    f"{n_layers}"
                )
            out.append(("stacked", None))
            continue
        m = re.fullmatch(layers, path) if layers is not None else None
        if m is None:
            out.append(("always", None))
            continue
        i = int(m.group(1))
        if not 0 <= i < n_layers:
            raise ValueError(
                f"{_WHAT}: leaf {path!r} (shape {tuple(leaf.shape)}) has layer index "
                f"{i} outside [0, n_layers={n_layers})"
            )
        out.append(("layer", i))
    return out


def scale_by_lisa(
    n_layers: int,
    n_active: int = 2,
    interval: int = 20,
    *,
    layers: str | None = r"layers/(\d+)/.*",
    stacked: str | None = None,
    state_policy: str = "keep",
    inner: optax.GradientTransformation | None = None,
    weight_decay: jax.typing.ArrayLike | None = None,
    key: jax.Array | int | None = None,
) -> optax.GradientTransformation:
    """Trains ``n_active`` sampled layers per period plus all non-layer leaves.

    Args:
      n_layers: number of transformer layers ``L`` (static).
      n_active: ``γ`` layers trained per period (static; LMFlow default 2).
      interval: ``K`` steps between re-samplings (static; LMFlow default 20).
      layers: regex (``re.fullmatch`` on canonical paths) whose first group is
        the layer index of unrolled leaves, or None (static).
      stacked: regex of scanned leaves with a leading layer axis, or None
        (static).
      state_policy: ``keep`` or ``reset`` (static; see the module docstring).
      inner: the optimizer of trained leaves (default
        ``optax.scale_by_adam()``; must not need params) (static).
      weight_decay: None (no decay) or decoupled decay ``wd·p`` added to the
        updates of trained leaves only, so frozen layers are not decayed (as
        LMFlow's AdamW skips parameters without gradients); needs ``params``
        (injectable).
      key: seed or ``jax.random.key`` (static).

    Returns:
      An ``optax.GradientTransformation`` with ``LISAState``. Inactive layers
      get exactly zero updates. Static arguments: ``n_layers, n_active,
      interval, layers, stacked, state_policy, inner, key`` (``weight_decay``
      is injectable once given).

    Raises:
      ValueError: bad counts or policy, no layer leaf, a stacked leaf whose
        axis 0 is not ``n_layers``, a layer index out of range.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"embed": jnp.ones(3), "layers": {str(i): {"w": jnp.ones(2)}
      ...      for i in range(4)}}
      >>> tx = scale_by_lisa(4, n_active=1, interval=5, inner=optax.identity())
      >>> u, s = tx.update(p, tx.init(p))
      >>> sum(int(u["layers"][str(i)]["w"][0]) for i in range(4))
      1

    References:
      Pan et al., 2024, https://arxiv.org/abs/2403.17919.
    """
    if inner is None:
        inner = optax.scale_by_adam()
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not (is_int(n_layers) and is_int(n_active) and 0 < n_active <= n_layers):
        raise ValueError(
            f"{_WHAT}: need ints 0 < n_active <= n_layers, got {n_active}, {n_layers}")
    if not is_int(interval) or interval <= 0:
        raise ValueError(f"{_WHAT}: interval must be a positive int, got {interval!r}")
    n_layers, n_active, interval = int(n_layers), int(n_active), int(interval)
    if state_policy not in STATE_POLICIES:
        raise ValueError(
            f"{_WHAT}: state_policy must be one of {STATE_POLICIES}, got "
            f"{state_policy!r}")
    raw_key = _leaves.key_data(key)
    reset = state_policy == "reset"

    def sample(count, raw):
        k = jax.random.fold_in(jax.random.wrap_key_data(raw), count // interval)
        return jnp.sort(jax.random.permutation(k, n_layers)[:n_active]).astype(jnp.int32)

    def inner_view(tree, kinds, active):
        """The tree the inner sees: stacked leaves gathered under ``reset``."""
        treedef = jax.tree.structure(tree)
        leaves = treedef.flatten_up_to(tree)
        out = [x[active] if reset and k == "stacked" else x
               for x, (k, _) in zip(leaves, kinds, strict=True)]
        return jax.tree.unflatten(treedef, out)

    def init_fn(params):
        kinds = _kinds(params, layers, stacked, n_layers)
        if kinds and all(k == "always" for k, _ in kinds):
            raise ValueError(
                f"{_WHAT}: no leaf matches layers={layers!r} or stacked={stacked!r}; "
                f"paths: {tree.paths(params)[:8]}")
        active = sample(jnp.zeros([], jnp.int32), raw_key)
        zeros = jax.tree.map(jnp.zeros_like, inner_view(params, kinds, active))
        return LISAState(jnp.zeros([], jnp.int32), inner.init(zeros), active, raw_key)

    def masks(kinds, active, tree):
        on = jnp.zeros((n_layers,), bool).at[active].set(True)
        treedef = jax.tree.structure(tree)
        out = []
        for x, (k, i) in zip(treedef.flatten_up_to(tree), kinds, strict=True):
            if k == "always":
                out.append(jnp.ones((), bool))
            elif k == "layer":
                out.append(on[i])
            else:
                out.append(on.reshape((n_layers,) + (1,) * (x.ndim - 1)))
        return jax.tree.unflatten(treedef, out)

    def update_fn(updates, state, params=None):
        if weight_decay is not None and params is None:
            raise ValueError(optax._src.base.NO_PARAMS_MSG)  # noqa: SLF001
        kinds = _kinds(updates, layers, stacked, n_layers)
        count = state.count
        new_period = count % interval == 0
        active = jnp.where(new_period, sample(count, state.key), state.active)
        treedef = jax.tree.structure(updates)
        mask_tree = masks(kinds, active, updates)
        inner_state = state.inner_state
        if reset:
            zeros = jax.tree.map(jnp.zeros_like, inner_view(updates, kinds, active))
            fresh = inner.init(zeros)
            inner_state = jax.lax.cond(new_period, lambda: fresh, lambda: inner_state)
        g = jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), updates,
                         mask_tree)
        view = inner_view(g, kinds, active)
        u, new_inner = inner.update(view, inner_state, None)
        if not reset:  # keep: inactive layers' moments are untouched
            view_masks = jax.tree.map(lambda x, m: jnp.broadcast_to(m, x.shape),
                                      view, mask_tree)
            tags = optax.tree.map_params(
                inner, lambda _, m: m, new_inner, view_masks,
                transform_non_params=lambda x: jnp.ones((), bool))
            new_inner = jax.tree.map(
                lambda n, o, m: jnp.where(m, n, o), new_inner, inner_state, tags)
        out = []
        ps = (treedef.flatten_up_to(params) if weight_decay is not None
              else [None] * len(kinds))
        for x, uu, (k, _), m, p in zip(
            treedef.flatten_up_to(updates), treedef.flatten_up_to(u), kinds,
            treedef.flatten_up_to(mask_tree), ps, strict=True,
        ):
            if reset and k == "stacked":
                uu = jnp.zeros(x.shape, uu.dtype).at[active].set(uu)
            if p is not None:
                uu = uu + jnp.asarray(weight_decay).astype(uu.dtype) * p.astype(uu.dtype)
            out.append(jnp.where(m, uu, jnp.zeros_like(uu)).astype(x.dtype))
        return jax.tree.unflatten(treedef, out), LISAState(
            optax.safe_int32_increment(count), new_inner, active, state.key)

    return optax.GradientTransformation(init_fn, update_fn)


def lisa(
    learning_rate: optax.ScalarOrSchedule,
    n_layers: int,
    n_active: int = 2,
    interval: int = 20,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    layers: str | None = r"layers/(\d+)/.*",
    stacked: str | None = None,
    state_policy: str = "keep",
    inner: optax.GradientTransformation | None = None,
    key: jax.Array | int | None = None,
) -> optax.GradientTransformation:
    """LISA optimizer: ``scale_by_lisa`` (decay on trained leaves only), lr.

    ``Δp = -lr·(inner(g) + wd·p)`` on trained leaves, 0 on frozen layers
    (LMFlow's AdamW skips parameters without gradients, decay included).

    Args:
      learning_rate: float or schedule (injectable).
      n_layers: see ``scale_by_lisa`` (static).
      n_active: see ``scale_by_lisa`` (static).
      interval: see ``scale_by_lisa`` (static).
      weight_decay: decoupled weight decay of trained leaves (injectable).
      layers: see ``scale_by_lisa`` (static).
      stacked: see ``scale_by_lisa`` (static).
      state_policy: see ``scale_by_lisa`` (static).
      inner: see ``scale_by_lisa`` (static).
      key: see ``scale_by_lisa`` (static).

    Returns:
      An ``optax.GradientTransformation`` (chain; first state ``LISAState``).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"layers": {str(i): {"w": jnp.ones(2)} for i in range(3)}}
      >>> tx = lisa(0.1, 3, n_active=1, inner=optax.identity())
      >>> u, _ = tx.update(p, tx.init(p), p)
      >>> [bool(u["layers"][str(i)]["w"][0] != 0) for i in range(3)].count(True)
      1

    References:
      Pan et al., 2024, https://arxiv.org/abs/2403.17919.
    """
    return optax.chain(
        scale_by_lisa(n_layers, n_active, interval, layers=layers, stacked=stacked,
                      state_policy=state_policy, inner=inner,
                      weight_decay=weight_decay, key=key),
        optax.scale_by_learning_rate(learning_rate),
    )
