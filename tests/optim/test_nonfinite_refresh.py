"""GaLore and FRUGAL keep the previous projector when the refresh gradient is not finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import optim, tree
from tests import helpers as h

GAP = 2
# Explicit views: a stacked (layers, in, out) leaf and a plain (in, out) one.
DIMS = {"stack": tree.DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0),
        "w": tree.DimensionNumbers(reduction_axis=0, output_axis=1)}

PROJECTORS = {
    "svd": optim.svd,
    "randomized_svd": lambda: optim.randomized_svd(oversample=1, power_iters=1),
    "random_orthogonal": optim.random_orthogonal,
    "coordinates": optim.coordinates,
}


def _grads(scale):
    rng = np.random.default_rng(7)
    return {
        "stack": jnp.asarray(rng.standard_normal((3, 6, 8)) * scale, jnp.float32),
        "w": jnp.asarray(rng.standard_normal((6, 8)) * scale, jnp.float32),
    }


def _tx(method, projector, **options):
    if method == "galore":
        tx = optim.scale_by_galore(rank=2, update_proj_gap=GAP, projector=projector,
                                     dimension_numbers=DIMS, key=0, **options)
    else:
        tx = optim.scale_by_frugal(density=0.25, update_gap=GAP, projector=projector,
                                 dimension_numbers=DIMS, key=0, **options)
    update = jax.jit(tx.update)

    def strict_clean_update(g, s):
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
            return update(g, s)

    return tx._replace(update=strict_clean_update)


def _state_before_refresh(tx):
    """The state after GAP steps: the next update refreshes every projector."""
    s = tx.init(_grads(1.0))
    for i in range(GAP):
        _, s = tx.update(_grads(1.0 + i), s)
    return s


def _poison(g, value):
    return {"stack": g["stack"].at[1, 2, 3].set(value), "w": g["w"].at[0, 0].set(value)}


@pytest.mark.parametrize("method", ["galore", "frugal"])
@pytest.mark.parametrize("name", list(PROJECTORS))
def test_a_nonfinite_refresh_keeps_the_previous_projector(method, name):
    tx = _tx(method, PROJECTORS[name]())
    s = _state_before_refresh(tx)
    good = _grads(3.0)
    _, s_good = tx.update(good, s)
    for value in (jnp.nan, jnp.inf):
        _, s_bad = tx.update(_poison(good, value), s)
        old, new, ref = s.projector, s_bad.projector, s_good.projector
        # The fully non-finite 2-D leaf and the poisoned slice keep their basis...
        h.assert_tree_allclose(new["w"], old["w"], **h.EXACT)
        h.assert_tree_allclose(jax.tree.map(lambda b: b[1], new["stack"]),
                               jax.tree.map(lambda b: b[1], old["stack"]), **h.EXACT)
        # ...the finite slices refresh as they would on a clean gradient.
        for i in (0, 2):
            h.assert_tree_allclose(jax.tree.map(lambda b, i=i: b[i], new["stack"]),
                                   jax.tree.map(lambda b, i=i: b[i], ref["stack"]),
                                   **h.MATMUL_F32)
        for leaf in jax.tree.leaves(new):
            assert np.all(np.isfinite(h.f64(leaf)))
        assert int(s_bad.count) == int(s.count) + 1  # the cadence is unchanged


@pytest.mark.parametrize("options", [dict(refresh_batch_size=1), dict(stagger=True)],
                         ids=["refresh_batch_size", "stagger"])
def test_other_refresh_placements_keep_the_previous_projector(options):
    tx = _tx("galore", optim.random_orthogonal(), **options)
    s = _state_before_refresh(tx)
    if options.get("stagger"):  # step 0 refreshes every slice; later, one phase each
        s = tx.init(_grads(1.0))
    _, s_bad = tx.update(_poison(_grads(3.0), jnp.nan), s)
    h.assert_tree_allclose(s_bad.projector["w"], s.projector["w"], **h.EXACT)
    h.assert_tree_allclose(s_bad.projector["stack"][1], s.projector["stack"][1],
                           **h.EXACT)
    assert not np.array_equal(s_bad.projector["stack"][0], s.projector["stack"][0])
