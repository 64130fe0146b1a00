# SPDX-License-Identifier: Apache-2.0
"""GaLore: gradient low-rank projection as an optax transform.

Zhao, Zhang, Chen, Wang, Anandkumar & Tian, "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection", 2024, https://arxiv.org/abs/2403.03507.

Paper ↔ code (Algorithm 2, written for ``m <= n`` in torch layout):

* ``P_t = U[:, :r]`` from ``SVD(G_t)`` every ``T`` steps ↔ ``Projector.refresh``
  under ``lax.cond`` (``update_proj_gap = T``; refreshes at k = 0, T, 2T, ...);
* ``R_t = P_tᵀ G_t`` ↔ ``Projector.down``;
* ``N_t = ρ_t(R_t)`` (Adam on the projected gradient) ↔ ``inner``;
* ``G̃_t = α P_t N_t`` ↔ ``Projector.up`` times ``scale``.

Moments are neither reset nor rotated at a refresh (GaLore's defining
behaviour). A refresh on a gradient slice that is not finite (NaN or
infinity) keeps that slice's previous projector; the step builders skip the
whole update on such a step (see ``docs/nonfinite.md``).

Full rank with ``scale=1`` is **not** Adam (Adam is not rotation
invariant, docs/galore.md#full-rank-is-not-adam); full rank with SGD is SGD.

Relation to ``optax.contrib.galore``: optax projects the larger axis (its rule
is peftjax's ``reverse_std`` on non-square kernels; on square ones it projects
the input axis, which is ``right`` here), uses optax-style eps and has no batch
axes. peftjax adds the reference ``std`` rule, all five side rules, batch axes
(stacked ``(L, in, out)`` and head-split kernels through ``DimensionNumbers``),
projectors as values and staggered refresh.

Stacked kernels. A ``cond`` under ``vmap`` becomes a ``select`` and would run
every SVD on every step. Here the refresh predicate is always unbatched: the
synchronous refresh vmaps the SVD *inside* the taken branch, and the staggered
refresh scans over slices with one ``cond`` each.

Sharded refreshes (``peftjax.shard``). The SVD is a LAPACK/cuSOLVER call that
XLA cannot split inside a matrix: a gradient sharded over its in/out axes is
gathered for it. With the default batched refresh every layer of a stacked
leaf is gathered at once on every device (on SmolLM2, up to 106 MB for one
MLP kernel's 30 layers; 425 MB for all seven kernels) and every device runs
every SVD. ``refresh_batch_size=1`` refreshes one layer at a time (one
layer's gradient gathered at a time, every device repeating the SVDs);
``refresh_sharding`` moves the stacked slices onto a sharding of the slice
axis (padded to a multiple of its device count), so each device runs the SVDs
of its own layers only, and the bases go back to the state's layout. The
numbers are unchanged: each slice's SVD is the same call on the same matrix.
Measured on SmolLM2, FSDP over 8 devices, batch 8 x 128
(``benchmarks/sharded_step.py``): a step with the batched refresh holds
535 MiB per device, with either option 515 MiB (the step's peak is in the
backward pass, not in the refresh); the spread refresh runs 4 SVDs per
device per stacked leaf instead of 30.
On CPU with several devices in one process (``--xla_force_host_platform_
device_count``) the batched refresh can deadlock: jaxlib's batched LAPACK SVD
parallelises its batch on the thread pool that the device programs occupy;
both options call the SVD one matrix at a time and do not.

Exports: ``GaLoreState``, ``scale_by_galore``, ``galore``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _leaves, _projectors

_WHAT = "scale_by_galore"


class GaLoreState(NamedTuple):
    """State of ``scale_by_galore``.

    Attributes:
      count: steps taken; refreshes happen when ``count % update_proj_gap == 0``.
        # shape=(), dtype=jnp.int32
      inner_state: the inner transform's state over the projected tree: a
        projected leaf ``(batch..., in, out)`` appears as ``(batch..., r, out)``
        (side ``right``), ``(batch..., in, r)`` (``left``) or ``(batch..., r, r)``
        (``full``); other leaves keep their shape.
      projector: a tree like the params; projected leaves hold their basis with
        the leaf's batch axes flattened in front, ``(S, in, r)`` / ``(S, out, r)``
        (or a pair for ``full``, ``int32`` indices for ``coordinates()``),
        other leaves ``optax.MaskedNode()``.
      key: raw ``uint32`` PRNG key data for random projectors.
        # shape=(2,), dtype=jnp.uint32
    """

    count: jax.Array
    inner_state: optax.OptState
    projector: Any
    key: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "inner_state": tree.StateRole.LIKE_PARAMS,
                   "projector": tree.StateRole.PROJECTOR,
                   "key": tree.StateRole.REPLICATED}


def _rank_fn(rank: int):
    def fn(path, leaf, n_in, n_out, side):
        if rank > min(n_in, n_out):
            raise ValueError(
                f"{_WHAT}: rank={rank} exceeds min(in, out)={min(n_in, n_out)} of "
                f"leaf {path!r} (shape {tuple(leaf.shape)}, dtype {leaf.dtype}, "
                f"matrix view ({n_in}, {n_out})); lower rank or exclude the leaf "
                "with dimension_numbers={path: None} or a partition rule"
            )
        return rank

    return fn


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    inner: optax.GradientTransformation | None = None,
    *,
    projector: _projectors.Projector | None = None,
    dimension_numbers: _leaves.DimsSpec = None,
    stagger: bool = False,
    key: jax.Array | int | None = None,
    refresh_batch_size: int | None = None,
    refresh_sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformation:
    """Projects matrix gradients to rank ``r``, runs ``inner`` there, maps back.

    For a projected leaf with matrix view ``G: (in, out)`` (batch axes are
    handled slice by slice): at refresh steps ``P = projector.refresh(G)``;
    every step ``R = down(G, P)``, ``N = inner(R)``, ``u = scale · up(N, P)``.
    Leaves that are not projected (biases, norms, embeddings by default) go
    through ``inner`` unprojected.

    ``proj_type`` keeps galore-torch's meaning for the same linear layer (the
    Flax kernel is the transpose of the torch weight, so the reference's
    ``right`` is the Flax input axis). On the matrix view ``g: (n_in, n_out)``
    (ties of ``std`` project the input axis):

    | ``proj_type`` | projected axis | ``down(g)``, basis | projected shape |
    |---|---|---|---|
    | ``right`` | input | ``Pᵀ g``, ``P: (n_in, r)`` | ``(r, n_out)`` |
    | ``left`` | output | ``g P``, ``P: (n_out, r)`` | ``(n_in, r)`` |
    | ``full`` | both | ``P_inᵀ g P_out`` | ``(r, r)`` |
    | ``std`` | ``right`` if ``n_out >= n_in``, else ``left`` | | smaller axis goes |
    | ``reverse_std`` | ``left`` if ``n_out >= n_in``, else ``right`` | | larger axis goes |

    The side is fixed per leaf from its static shape (never re-derived from
    low-rank shapes). The same table serves ``frugal``; see
    docs/galore.md#the-side-table-proj_type.

    Memory per projected ``(in, out)`` slice, side ``std`` with ``in <= out``:
    basis ``in·r`` plus inner state on ``(r, out)`` (Adam: ``2·r·out``).

    Warning:
      ``inner`` receives projected shapes, so transforms that need params
      (``adamw``, ``add_decayed_weights``) are unsupported: a ``TypeError``
      says so. Put weight decay on the ``galore`` alias. The SVD sees whatever
      gradient arrives, i.e. after any clipping earlier in the chain.

    Args:
      rank: projected rank ``r`` (static); must be ``<= min(in, out)`` of every
        projected leaf.
      update_proj_gap: refresh period ``T`` (static).
      scale: ``α`` multiplying the back-projected update (injectable).
      proj_type: ``std``, ``reverse_std``, ``left``, ``right`` or ``full``
        (static).
      inner: the transform run in the subspace (default
        ``optax.scale_by_adam()``; ``scale_by_adam_hf`` for galore-torch
        parity).
      projector: a ``Projector`` value (default ``svd()``; also
        ``randomized_svd``, ``random_orthogonal``, ``coordinates``) (static).
      dimension_numbers: ``None``: project what is a matrix under the tree's
        layout (2-D ``(in, out)``, stacked ``layers/...`` ``(L, in, out)``),
        never biases or embedding tables; another leaf of rank >= 3 raises,
        naming its likely views. A ``peftjax.tree.Layout`` (``tree.stacked``,
        ``tree.dims.multi_head_attention()``): the same with that layout
        declared. One ``DimensionNumbers`` for every leaf of rank >= 2, a
        ``{path: DimensionNumbers | None}`` mapping (``None`` = not projected;
        unknown paths raise; other paths as for ``None``), or a callable
        ``(path, leaf) -> DimensionNumbers | None`` (static).
      stagger: refresh slices at evenly spread phases of ``T`` (after a joint
        refresh at step 0) so no single step pays every SVD (static).
      key: seed or ``jax.random.key`` for random projectors (static).
      refresh_batch_size: None (default) refreshes all slices of a stacked
        leaf with one batched SVD; an int ``b`` refreshes ``b`` slices at a
        time (``jax.lax.map(..., batch_size=b)``), so a gradient sharded over
        its matrix axes is gathered ``b`` layers at a time (static).
      refresh_sharding: a ``NamedSharding`` of the slice axis (e.g.
        ``peftjax.shard.refresh_sharding(mesh)``): each device runs the SVDs
        of its own slices (padded to a multiple of its device count);
        exclusive with ``refresh_batch_size`` and ``stagger`` (static).

    Returns:
      An ``optax.GradientTransformation`` with ``GaLoreState``.
      Static arguments: ``rank, update_proj_gap, proj_type, inner, projector,
      dimension_numbers, stagger, key, refresh_batch_size, refresh_sharding``.

    Raises:
      ValueError: bad rank, gap or proj_type; a leaf whose matrix view is
        unknown or smaller than ``rank`` (message names path, shape, dtype).
      TypeError: an inner transform that needs params.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4, 6)), "b": jnp.zeros(6)}
      >>> from peftjax.optim import scale_by_adam_hf
      >>> tx = scale_by_galore(rank=2, update_proj_gap=10, inner=scale_by_adam_hf())
      >>> state = tx.init(params)
      >>> jax.tree.map(jnp.shape, state.inner_state.mu)
      {'b': (6,), 'w': (2, 6)}
      >>> u, state = tx.update(params, state)
      >>> u["w"].shape
      (4, 6)

    References:
      Zhao et al., 2024, https://arxiv.org/abs/2403.03507.
    """
    if inner is None:
        inner = optax.scale_by_adam()
    if projector is None:
        projector = _projectors.svd()
    _projectors.validate_projector(projector, _WHAT)
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool):
        raise TypeError(f"{_WHAT}: rank must be an int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"{_WHAT}: rank must be positive, got {rank}")
    if (not isinstance(update_proj_gap, numbers.Integral) or isinstance(update_proj_gap, bool)
            or update_proj_gap <= 0):
        raise ValueError(
            f"{_WHAT}: update_proj_gap must be a positive int, got {update_proj_gap!r}"
        )
    rank, update_proj_gap = int(rank), int(update_proj_gap)
    if proj_type not in _projectors.PROJ_TYPES:
        raise ValueError(
            f"{_WHAT}: proj_type must be one of {_projectors.PROJ_TYPES}, got "
            f"{proj_type!r}"
        )
    _leaves.check_refresh_options(refresh_batch_size, refresh_sharding, stagger, _WHAT)
    raw_key = _leaves.key_data(key)

    def plan(tree):
        return _leaves.plan_leaves(
            tree, dimension_numbers, _rank_fn(rank), proj_type, _WHAT
        )

    def init_fn(params):
        treedef = jax.tree.structure(params)
        flat, plans = plan(params)
        if not flat:
            return GaLoreState(
                jnp.zeros([], jnp.int32), inner.init(params), params, jnp.array(raw_key)
            )
        _leaves.check_dims_keys(dimension_numbers, params)
        low, bases = [], []
        for (_, p), pl in zip(flat, plans, strict=True):
            if pl is None:
                low.append(p)
                bases.append(optax.MaskedNode())
                continue
            shape = pl.resolved.batch_shape + pl.spec.low_shape
            low.append(jnp.zeros(shape, p.dtype))
            one = projector.init(pl.spec, p.dtype)
            bases.append(
                jax.tree.map(
                    lambda b, n=pl.n_slices: jnp.broadcast_to(b, (n,) + b.shape), one
                )
            )
        return GaLoreState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(jax.tree.unflatten(treedef, low)),
            projector=jax.tree.unflatten(treedef, bases),
            key=jnp.array(raw_key),  # a fresh buffer: a donated state owns its leaves
        )

    def update_fn(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        flat, plans = plan(updates)
        count = state.count
        bases = treedef.flatten_up_to(state.projector) if flat else []
        offsets = (
            _leaves.stagger_offsets(plans, update_proj_gap)
            if stagger
            else [None] * len(plans)
        )
        low, new_bases = [], []
        for i, ((_, g), pl, basis, off) in enumerate(zip(flat, plans, bases, offsets, strict=True)):
            if pl is None:
                low.append(g)
                new_bases.append(basis)
                continue
            gs = _leaves.to_slices(g, pl)
            keys = _leaves.leaf_keys(state.key, i, count, pl.n_slices)
            basis = _leaves.refresh_bases(
                projector, pl.spec, gs, basis, keys, count, update_proj_gap, off,
                refresh_batch_size, refresh_sharding,
            )
            r = jax.vmap(lambda gi, bi, s=pl.spec: projector.down(gi, bi, s))(gs, basis)
            low.append(r.reshape(pl.resolved.batch_shape + pl.spec.low_shape))
            new_bases.append(basis)
        try:
            inner_u, inner_state = inner.update(
                jax.tree.unflatten(treedef, low), state.inner_state, None
            )
        except ValueError as e:
            raise _leaves.no_params_error(e) from e
        inner_flat = treedef.flatten_up_to(inner_u)
        out = []
        for (_, g), pl, u, basis in zip(flat, plans, inner_flat, new_bases, strict=True):
            if pl is None:
                out.append(u)
                continue
            us = u.reshape((pl.n_slices,) + pl.spec.low_shape)
            full = jax.vmap(lambda ui, bi, s=pl.spec: projector.up(ui, bi, s))(us, basis)
            full = _leaves.from_slices(full, pl)
            out.append((full * jnp.asarray(scale).astype(full.dtype)).astype(g.dtype))
        new_state = GaLoreState(
            count=optax.safe_int32_increment(count),
            inner_state=inner_state,
            projector=jax.tree.unflatten(treedef, new_bases) if flat else state.projector,
            key=state.key,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: jax.typing.ArrayLike = 1.0,
    proj_type: str = "std",
    inner: optax.GradientTransformation | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
    *,
    projector: _projectors.Projector | None = None,
    dimension_numbers: _leaves.DimsSpec = None,
    stagger: bool = False,
    key: jax.Array | int | None = None,
    refresh_batch_size: int | None = None,
    refresh_sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformation:
    """GaLore optimizer: ``scale_by_galore``, decoupled decay, learning rate.

    ``Δw = -lr · (α · up(inner(down(g))) + wd · w)``. Weight decay follows
    optax's ``add_decayed_weights`` on the *old* weights; galore-torch decays
    the *updated* weights (``w ← (w + Δ)(1 - lr·wd)``), which differs by the
    second-order term ``lr·wd·Δ`` (docs/galore.md#weight-decay).

    Relation to galore-torch: with ``inner=scale_by_adam_hf(eps=1e-6)``,
    ``weight_decay=0`` and the ``svd()`` projector this is galore-torch's
    ``GaLoreAdamW`` on the transposed weights *up to the sign convention of
    the singular vectors*. ``svd()`` flips each singular pair so that the
    largest-magnitude entry of its output-axis vector is positive;
    galore-torch keeps the signs LAPACK returns, which depend on the LAPACK
    build and machine. Within one refresh period signs cannot matter (a flip
    changes the projected gradient, the moments and the back-projection
    together). Moments are kept across refreshes, though, so when a kept pair
    comes back with a different relative sign in the two libraries the old
    first moment is added with the opposite sign in that direction: the
    trajectories are equal for the first ``update_proj_gap`` steps and part
    from the second refresh (step ``update_proj_gap``) on. The canonical sign
    is the default because it makes the basis a function of the gradient
    alone (the same trajectory on any machine or backend, up to rounding),
    and keeps the moments pointing the same way across refreshes where the
    subspace barely moved; the galore-torch goldens apply the same convention
    to the reference (docs/galore.md#relation-to-galore-torch).

    Args:
      learning_rate: float or schedule (injectable).
      rank: see ``scale_by_galore`` (static).
      update_proj_gap: see ``scale_by_galore`` (static).
      scale: ``α`` (injectable); the reference scripts use 0.25.
      proj_type: see ``scale_by_galore`` (static).
      inner: see ``scale_by_galore`` (static).
      weight_decay: decoupled weight decay (injectable).
      mask: weight-decay mask, as in ``optax.add_decayed_weights``.
      projector: see ``scale_by_galore`` (static).
      dimension_numbers: see ``scale_by_galore`` (static).
      stagger: see ``scale_by_galore`` (static).
      key: see ``scale_by_galore`` (static).
      refresh_batch_size: see ``scale_by_galore`` (static).
      refresh_sharding: see ``scale_by_galore`` (static).

    Returns:
      An ``optax.GradientTransformation`` (a chain whose first state is
      ``GaLoreState``). Static arguments: as ``scale_by_galore``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4, 6))}
      >>> from peftjax.optim import scale_by_adam_hf
      >>> tx = galore(1e-2, rank=2, update_proj_gap=10, inner=scale_by_adam_hf())
      >>> u, _ = tx.update(params, tx.init(params), params)
      >>> u["w"].shape
      (4, 6)

    References:
      Zhao et al., 2024, https://arxiv.org/abs/2403.03507.
    """
    return optax.chain(
        scale_by_galore(
            rank,
            update_proj_gap,
            scale,
            proj_type,
            inner,
            projector=projector,
            dimension_numbers=dimension_numbers,
            stagger=stagger,
            key=key,
            refresh_batch_size=refresh_batch_size,
            refresh_sharding=refresh_sharding,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
