# SPDX-License-Identifier: Apache-2.0
"""FRUGAL: full-rank updates with gradient splitting, as an optax transform.

Zmushko, Beznosikov, Takáč & Horváth, "FRUGAL: Memory-Efficient Optimization
by Reducing State Overhead for Scalable Training", 2024 (ICML 2025),
https://arxiv.org/abs/2411.07837.

Paper ↔ code (FRUGAL(Adam, signSGD)):
``θ ← θ − η·[s·P⁻¹(Adam(P g)) + s·s_free·sign(g − P⁻¹P g)]``:

* ``P`` every ``update_gap`` steps ↔ ``Projector.refresh`` under ``lax.cond``
  (or the ``blocks`` schedule), the state-full optimizer reset at each
  re-selection when ``reset_statistics`` (always for blocks);
* ``Adam(P g)`` ↔ ``inner`` on ``Projector.down(g)``;
* ``sign(g − P⁻¹P g)`` ↔ ``free`` on the residual (``optax.scale_by_sign()``,
  ``optax.identity()`` for SGD, ``optax.set_to_zero()`` for none). The sign is
  applied to the residual as is, not re-projected (as the reference does);
* ``s`` ↔ ``scale`` (the reference's ``proj_params_lr_scale``) and ``s_free``
  ↔ ``free_scale`` (``inactive_lr_scale``).

The reference's decoupled weight decay ``p ← p(1 − lr·wd)`` before the update
is exactly ``optax.add_decayed_weights`` in the ``frugal`` alias.

A refresh on a gradient slice that is not finite (NaN or infinity) keeps that
slice's previous projector, as in GaLore.

Exports: ``FrugalState``, ``BlockSelector``, ``blocks``, ``scale_by_frugal``,
``frugal``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _leaves, _projectors

_WHAT = "scale_by_frugal"
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


class FrugalState(NamedTuple):
    """State of ``scale_by_frugal``.

    Attributes:
      count: steps taken; re-selection when ``count % update_gap == 0``.
        # shape=(), dtype=jnp.int32
      inner_state: the state-full transform's state over the projected tree
        (projected leaf ``(batch..., r, out)``/``(batch..., in, r)``/
        ``(batch..., r, r)``; with ``blocks``, every leaf full-size).
      projector: bases as in ``GaLoreState.projector`` (``MaskedNode`` for
        leaves that are not projected and for ``blocks``).
      free_state: the state-free transform's state (no arrays).
      key: raw ``uint32`` PRNG key data. # shape=(2,), dtype=jnp.uint32
    """

    count: jax.Array
    inner_state: optax.OptState
    projector: Any
    free_state: optax.OptState
    key: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "inner_state": tree.StateRole.LIKE_PARAMS,
                   "projector": tree.StateRole.PROJECTOR,
                   "free_state": tree.StateRole.LIKE_PARAMS,
                   "key": tree.StateRole.REPLICATED}


class BlockSelector(NamedTuple):
    """BAdam-like block selection: whole leaves are state-full or state-free.

    Attributes:
      order: ``random``, ``ascending``, ``descending`` or ``mirror``.
    """

    order: str


def blocks(order: str = "random") -> BlockSelector:
    """Returns the block selector (FRUGAL's ``BlockOptimizer``).

    Each leaf given to ``scale_by_frugal`` is one block, in canonical-path
    order. ``round(n_leaves·density)`` blocks are active per period: ``random``
    draws a subset, ``ascending``/``descending`` move a cyclic window forward
    from the first / backward from the last leaf, ``mirror`` takes pairs
    ``(i, n-1-i)`` moving inward (needs an even count).

    Memory: static shapes mean the state-full state is allocated for every
    block (inactive blocks hold zeros), i.e. no saving over AdamW; the
    reference frees inactive state. Use a projector selector for savings.

    Args:
      order: the block order (static).

    Returns:
      A ``BlockSelector`` for ``scale_by_frugal(projector=...)``.

    Example:
      >>> blocks("descending")
      BlockSelector(order='descending')
    """
    if order not in BLOCK_ORDERS:
        raise ValueError(f"blocks: order must be one of {BLOCK_ORDERS}, got {order!r}")
    return BlockSelector(order)


def _rank_fn(density: float, rounding: str):
    def fn(path, leaf, n_in, n_out, side):
        dim = _leaves.side_dim(side, n_in, n_out)
        return int(dim * density) if rounding == "floor" else round(dim * density)

    return fn


def _active_blocks(order: str, epoch, n: int, n_act: int, raw_key) -> jax.Array:
    """Bool ``(n,)``: which blocks are state-full in period ``epoch``."""
    j = jnp.arange(n_act, dtype=jnp.int32)
    if order == "random":
        key = jax.random.fold_in(jax.random.wrap_key_data(raw_key), epoch)
        idx = jax.random.permutation(key, n)[:n_act]
    elif order == "ascending":
        idx = (epoch * n_act + j) % n
    elif order == "descending":
        idx = (n - 1 - epoch * n_act - j) % n
    else:
        half = n // 2
        first = (epoch * (n_act // 2) + jnp.arange(n_act // 2, dtype=jnp.int32)) % half
        idx = jnp.concatenate([first, n - 1 - first])
    return jnp.zeros((n,), bool).at[idx].set(True)


def _check_stateless(free, tree):
    state = free.init(tree)
    if jax.tree.leaves(state):
        raise TypeError(
            f"{_WHAT}: free must be a stateless transform (scale_by_sign, "
            "identity, set_to_zero), but its state has arrays "
            f"{jax.tree.map(jnp.shape, state)}"
        )
    return state


def scale_by_frugal(
    density: float = 0.25,
    update_gap: int = 200,
    *,
    projector: "_projectors.Projector | BlockSelector | None" = None,
    proj_type: str = "std",
    inner: optax.GradientTransformation | None = None,
    free: optax.GradientTransformation | None = None,
    scale: jax.typing.ArrayLike = 1.0,
    free_scale: jax.typing.ArrayLike = 1.0,
    reset_statistics: bool = True,
    dimension_numbers: _leaves.DimsSpec = None,
    key: jax.Array | int | None = None,
    refresh_batch_size: int | None = None,
    refresh_sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformation:
    """Splits each gradient into a state-full subspace and a state-free rest.

    Per projected leaf (matrix view ``G: (in, out)``, batch axes per slice):
    ``R = down(G)``, ``u = scale·(up(inner(R)) + free_scale·free(G − up(R)))``.
    Leaves that are not projected (biases, norms, embeddings by default; see
    ``dimension_numbers`` of ``scale_by_galore``) get ``inner`` on the whole
    gradient, unscaled (the reference's regular group). Route leaves with
    ``optax.partition``: labels from ``peftjax.tree.labels`` decide
    state-full (``optax.adamw``; keep the logits/head there, as the reference
    does), FRUGAL, state-free
    (``optax.chain(optax.scale_by_sign(), ...)``) or frozen
    (``optax.set_to_zero()``).

    Memory per projected slice: the basis plus ``inner`` state on the
    projected shape (Adam, side ``right``: ``2·r·out`` with
    ``r = round(density·in)``; about ``2·density·in·out``).

    Args:
      density: ``ρ``, the state-full fraction (static: it sets shapes). The
        rank of a leaf is ``round(ρ·dim)`` for dense projectors and
        ``floor(ρ·dim)`` for ``coordinates()``, ``dim`` the projected axis
        (the smaller one for ``full``); with ``blocks`` it is the fraction of
        leaves.
      update_gap: re-selection period ``T`` (static).
      projector: ``svd()`` (default), ``randomized_svd``,
        ``random_orthogonal``, ``coordinates()`` (the reference's Coord
        ``columns`` is ``proj_type='right'``, ``rows`` is ``left``) or
        ``blocks(order)`` (static).
      proj_type: side rule as in GaLore (static); ignored by ``blocks``.
      inner: state-full transform (default ``optax.scale_by_adam()``; must not
        need params).
      free: stateless transform for the rest (default
        ``optax.scale_by_sign()``).
      scale: ``proj_params_lr_scale`` (injectable).
      free_scale: ``inactive_lr_scale`` (injectable).
      reset_statistics: re-initialise ``inner`` (count included, so bias
        correction restarts) at every re-selection (static).
      dimension_numbers: as in ``scale_by_galore`` (static).
      key: seed or ``jax.random.key`` (static).
      refresh_batch_size: as in ``scale_by_galore``: refresh ``b`` slices of
        a stacked leaf at a time (static; not for ``blocks``).
      refresh_sharding: as in ``scale_by_galore``: spread the slices' refreshes
        over the devices of this slice-axis sharding (static; not for
        ``blocks``).

    Returns:
      An ``optax.GradientTransformation`` with ``FrugalState``. Static
      arguments: ``density, update_gap, projector, proj_type, inner, free,
      reset_statistics, dimension_numbers, key, refresh_batch_size,
      refresh_sharding``.

    Raises:
      ValueError: density outside [0, 1], a bad gap, a matrix view that cannot
        be resolved, ``mirror`` with an odd block count.
      TypeError: a stateful ``free`` or an ``inner`` that needs params.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.optim import scale_by_adam_hf
      >>> tx = scale_by_frugal(density=0.5, update_gap=10, inner=scale_by_adam_hf())
      >>> g = {"w": jnp.ones((4, 6))}
      >>> state = tx.init(g)
      >>> state.inner_state.mu["w"].shape
      (2, 6)
      >>> u, state = tx.update(g, state)
      >>> u["w"].shape
      (4, 6)

    References:
      Zmushko et al., 2024, https://arxiv.org/abs/2411.07837.
    """
    if inner is None:
        inner = optax.scale_by_adam()
    if free is None:
        free = optax.scale_by_sign()
    if projector is None:
        projector = _projectors.svd()
    if not isinstance(projector, BlockSelector):
        _projectors.validate_projector(projector, _WHAT)
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"{_WHAT}: density must be in [0, 1], got {density!r}")
    if (not isinstance(update_gap, numbers.Integral) or isinstance(update_gap, bool)
            or update_gap <= 0):
        raise ValueError(f"{_WHAT}: update_gap must be a positive int, got {update_gap!r}")
    update_gap = int(update_gap)
    if proj_type not in _projectors.PROJ_TYPES:
        raise ValueError(
            f"{_WHAT}: proj_type must be one of {_projectors.PROJ_TYPES}, got "
            f"{proj_type!r}"
        )
    _leaves.check_refresh_options(refresh_batch_size, refresh_sharding, False, _WHAT)
    raw_key = _leaves.key_data(key)
    if isinstance(projector, BlockSelector):
        if refresh_batch_size is not None or refresh_sharding is not None:
            raise ValueError(
                f"{_WHAT}: blocks() selects whole leaves and runs no SVD; drop "
                "refresh_batch_size / refresh_sharding"
            )
        return _scale_by_blocks(density, update_gap, projector.order, inner, free,
                                scale, free_scale, raw_key)

    def plan(tree):
        return _leaves.plan_leaves(
            tree, dimension_numbers, _rank_fn(density, projector.rounding),
            proj_type, _WHAT,
        )

    def low_zeros(flat, plans, treedef):
        out = []
        for (_, p), pl in zip(flat, plans, strict=True):
            if pl is None:
                out.append(jnp.zeros(p.shape, p.dtype))
            else:
                shape = pl.resolved.batch_shape + pl.spec.low_shape
                out.append(jnp.zeros(shape, p.dtype))
        return jax.tree.unflatten(treedef, out)

    def init_fn(params):
        treedef = jax.tree.structure(params)
        flat, plans = plan(params)
        if not flat:
            return FrugalState(jnp.zeros([], jnp.int32), inner.init(params), params,
                               free.init(params), jnp.array(raw_key))
        _leaves.check_dims_keys(dimension_numbers, params)
        bases = []
        for (_, p), pl in zip(flat, plans, strict=True):
            if pl is None:
                bases.append(optax.MaskedNode())
                continue
            one = projector.init(pl.spec, p.dtype)
            bases.append(jax.tree.map(
                lambda b, n=pl.n_slices: jnp.broadcast_to(b, (n,) + b.shape), one))
        return FrugalState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(low_zeros(flat, plans, treedef)),
            projector=jax.tree.unflatten(treedef, bases),
            free_state=_check_stateless(free, params),
            key=jnp.array(raw_key),  # a fresh buffer: a donated state owns its leaves
        )

    def update_fn(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        flat, plans = plan(updates)
        count = state.count
        bases = treedef.flatten_up_to(state.projector) if flat else []
        low, resid, new_bases = [], [], []
        for i, ((_, g), pl, basis) in enumerate(zip(flat, plans, bases, strict=True)):
            if pl is None:
                low.append(g)
                resid.append(jnp.zeros_like(g))
                new_bases.append(basis)
                continue
            gs = _leaves.to_slices(g, pl)
            keys = _leaves.leaf_keys(state.key, i, count, pl.n_slices)
            basis = _leaves.refresh_bases(
                projector, pl.spec, gs, basis, keys, count, update_gap, None,
                refresh_batch_size, refresh_sharding)
            r = jax.vmap(lambda gi, bi, s=pl.spec: projector.down(gi, bi, s))(gs, basis)
            back = jax.vmap(lambda ri, bi, s=pl.spec: projector.up(ri, bi, s))(r, basis)
            low.append(r.reshape(pl.resolved.batch_shape + pl.spec.low_shape))
            resid.append(_leaves.from_slices(gs - back, pl))
            new_bases.append(basis)
        inner_state = state.inner_state
        if reset_statistics and flat:
            fresh = inner.init(low_zeros(flat, plans, treedef))
            inner_state = jax.lax.cond(
                count % update_gap == 0, lambda: fresh, lambda: state.inner_state)
        try:
            inner_u, inner_state = inner.update(
                jax.tree.unflatten(treedef, low), inner_state, None)
        except ValueError as e:
            raise _leaves.no_params_error(e) from e
        free_u, free_state = free.update(
            jax.tree.unflatten(treedef, resid), state.free_state, None)
        out = []
        for (_, g), pl, u, fu, basis in zip(
            flat, plans, treedef.flatten_up_to(inner_u),
            treedef.flatten_up_to(free_u), new_bases, strict=True,
        ):
            if pl is None:
                out.append(u.astype(g.dtype))
                continue
            us = u.reshape((pl.n_slices,) + pl.spec.low_shape)
            full = jax.vmap(lambda ui, bi, s=pl.spec: projector.up(ui, bi, s))(us, basis)
            full = _leaves.from_slices(full, pl)
            s = jnp.asarray(scale).astype(full.dtype)
            fs = jnp.asarray(free_scale).astype(full.dtype)
            out.append((s * (full + fs * fu.astype(full.dtype))).astype(g.dtype))
        new_state = FrugalState(
            count=optax.safe_int32_increment(count),
            inner_state=inner_state,
            projector=jax.tree.unflatten(treedef, new_bases) if flat else state.projector,
            free_state=free_state,
            key=state.key,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_blocks(density, update_gap, order, inner, free, scale, free_scale,
                     raw_key):
    def n_active(n):
        k = round(n * density)
        if order == "mirror" and k % 2:
            raise ValueError(
                f"{_WHAT}: blocks('mirror') needs an even number of active blocks, "
                f"got round({n}·{density}) = {k}"
            )
        return k

    def init_fn(params):
        flat = tree.flatten(params)
        if flat:
            n_active(len(flat))
        return FrugalState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(jax.tree.map(jnp.zeros_like, params)),
            projector=jax.tree.map(lambda _: optax.MaskedNode(), params),
            free_state=_check_stateless(free, params),
            key=jnp.array(raw_key),  # a fresh buffer: a donated state owns its leaves
        )

    def update_fn(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        leaves = treedef.flatten_up_to(updates)
        count = state.count
        n = len(leaves)
        if n == 0:
            return updates, state._replace(count=optax.safe_int32_increment(count))
        active = _active_blocks(order, count // update_gap, n, n_active(n), state.key)
        fresh = inner.init(jax.tree.map(jnp.zeros_like, updates))
        inner_state = jax.lax.cond(
            count % update_gap == 0, lambda: fresh, lambda: state.inner_state)
        masked = [jnp.where(active[i], g, jnp.zeros_like(g)) for i, g in enumerate(leaves)]
        try:
            inner_u, inner_state = inner.update(
                jax.tree.unflatten(treedef, masked), inner_state, None)
        except ValueError as e:
            raise _leaves.no_params_error(e) from e
        free_u, free_state = free.update(updates, state.free_state, None)
        out = []
        for i, (g, u, fu) in enumerate(zip(
                leaves, treedef.flatten_up_to(inner_u), treedef.flatten_up_to(free_u),
                strict=True)):
            s = jnp.asarray(scale).astype(g.dtype)
            fs = jnp.asarray(free_scale).astype(g.dtype)
            val = jnp.where(active[i], u.astype(g.dtype), fs * fu.astype(g.dtype))
            out.append((s * val).astype(g.dtype))
        return jax.tree.unflatten(treedef, out), FrugalState(
            optax.safe_int32_increment(count), inner_state, state.projector,
            free_state, state.key)

    return optax.GradientTransformation(init_fn, update_fn)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    update_gap: int = 200,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    *,
    projector: "_projectors.Projector | BlockSelector | None" = None,
    proj_type: str = "std",
    inner: optax.GradientTransformation | None = None,
    free: optax.GradientTransformation | None = None,
    scale: jax.typing.ArrayLike = 1.0,
    free_scale: jax.typing.ArrayLike = 1.0,
    reset_statistics: bool = True,
    dimension_numbers: _leaves.DimsSpec = None,
    key: jax.Array | int | None = None,
    refresh_batch_size: int | None = None,
    refresh_sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformation:
    """FRUGAL optimizer: ``scale_by_frugal``, decoupled decay, learning rate.

    ``Δw = -lr·(u + wd·w)`` with ``u`` from ``scale_by_frugal``: the
    reference's ``p ← p(1 − lr·wd)`` before the update, on every coordinate,
    without ``scale``.

    Args:
      learning_rate: float or schedule (injectable).
      density: see ``scale_by_frugal`` (static).
      update_gap: see ``scale_by_frugal`` (static).
      weight_decay: decoupled weight decay (injectable).
      mask: weight-decay mask, as in ``optax.add_decayed_weights``.
      projector: see ``scale_by_frugal`` (static).
      proj_type: see ``scale_by_frugal`` (static).
      inner: see ``scale_by_frugal`` (static).
      free: see ``scale_by_frugal`` (static).
      scale: see ``scale_by_frugal`` (injectable).
      free_scale: see ``scale_by_frugal`` (injectable).
      reset_statistics: see ``scale_by_frugal`` (static).
      dimension_numbers: see ``scale_by_frugal`` (static).
      key: see ``scale_by_frugal`` (static).
      refresh_batch_size: see ``scale_by_frugal`` (static).
      refresh_sharding: see ``scale_by_frugal`` (static).

    Returns:
      An ``optax.GradientTransformation`` (a chain whose first state is
      ``FrugalState``). Static arguments: as ``scale_by_frugal``.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax.optim import coordinates, scale_by_adam_hf
      >>> tx = frugal(1e-3, density=0.5, projector=coordinates(),
      ...             proj_type="right", inner=scale_by_adam_hf())
      >>> w = {"w": jnp.ones((4, 6))}
      >>> u, _ = tx.update(w, tx.init(w), w)
      >>> u["w"].shape
      (4, 6)

    References:
      Zmushko et al., 2024, https://arxiv.org/abs/2411.07837.
    """
    return optax.chain(
        scale_by_frugal(
            density, update_gap, projector=projector, proj_type=proj_type,
            inner=inner, free=free, scale=scale, free_scale=free_scale,
            reset_statistics=reset_statistics,
            dimension_numbers=dimension_numbers, key=key,
            refresh_batch_size=refresh_batch_size, refresh_sharding=refresh_sharding,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
