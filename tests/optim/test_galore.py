"""GaLore: invariants (docs/galore.md), galore-torch goldens, optax parity."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim, tree
from peftjax.optim import _projectors
from tests.helpers import EXACT, MATMUL_F32, assert_tree_allclose, f64

GOLDEN = pathlib.Path(__file__).parent / "golden" / "galore_torch.npz"
# float32 SVDs from two LAPACK builds agree to about eps/(singular gap) on the
# singular vectors; relative to the largest update entry.
SVD_F32_REL = 3e-4


def _rng_grads(shape, steps, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
            for _ in range(steps)]


def _run(tx, grads, params):
    # optax.scale_by_adam's bias correction needs standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        update = jax.jit(tx.update)
        outs = []
        for g in grads:
            u, state = update(g, state, params)
            outs.append(u)
    return outs, state


def _step(tx, g):
    return _run(tx, [g], g)


# ---------------------------------------------------------------- goldens


def _golden_cases():
    data = np.load(GOLDEN)
    return sorted(k[len("grads/"):] for k in data.files if k.startswith("grads/"))


@pytest.mark.parametrize("case", _golden_cases())
def test_matches_galore_torch(case):
    data = np.load(GOLDEN)
    cfg = json.loads(str(data["config"]))
    proj_type = case.split("_", 1)[1]
    grads = data[f"grads/{case}"]  # torch layout (steps, out, in)
    deltas = data[f"deltas/{case}"]
    tx = optim.galore(
        cfg["lr"], rank=cfg["rank"], update_proj_gap=cfg["update_proj_gap"],
        scale=cfg["scale"], proj_type=proj_type,
        inner=optim.scale_by_adam_hf(*cfg["betas"], eps=cfg["eps"]),
        weight_decay=cfg["weight_decay"],
    )
    # Flax kernel K = Wᵀ: (in, out); transpose gradients in and updates out.
    params = {"k": jnp.zeros(grads.shape[:0:-1], jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    assert grads.shape[0] >= 7  # refreshes at 0, 2, 4, 6
    for k in range(grads.shape[0]):
        u, state = update({"k": jnp.asarray(grads[k].T)}, state, params)
        np.testing.assert_allclose(
            f64(u["k"]).T, deltas[k], rtol=0,
            atol=SVD_F32_REL * np.abs(deltas[k]).max(),
        )


# ---------------------------------------------------------------- optax parity


@pytest.mark.parametrize(
    "shape, proj_type",
    [((8, 4), "reverse_std"), ((4, 8), "reverse_std"), ((6, 6), "right")],
)
def test_matches_optax_contrib_galore(shape, proj_type):
    # optax projects the larger axis: reverse_std off the diagonal; on square
    # kernels it projects the input axis, which is `right` here. One refresh
    # window: optax's SVD signs are not canonical (docs/galore.md#singular-vector-signs).
    grads = [{"w": g, "b": g[0]} for g in _rng_grads(shape, 5, seed=1)]
    params = jax.tree.map(jnp.zeros_like, grads[0])
    ours = optim.galore(0.1, rank=2, update_proj_gap=100, scale=0.5,
                        proj_type=proj_type, weight_decay=0.01)
    ref = optax.contrib.galore(0.1, rank=2, update_proj_gap=100, scale=0.5,
                               weight_decay=0.01)
    with jax.numpy_dtype_promotion("standard"):
        a, sa = _run(ours, grads, params)
        b, sb = _run(ref, grads, params)
    assert_tree_allclose(a, b, **MATMUL_F32)
    assert sa[0].inner_state.mu["w"].shape == sb[0].base_optimizer_state.mu["w"].shape


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    "shape, proj_type, state_shape",
    [  # Flax (in, out); torch (8,4)->right, (4,8)->left, (6,6)->right.
        ((4, 8), "std", (2, 8)),
        ((8, 4), "std", (8, 2)),
        ((6, 6), "std", (2, 6)),
        ((4, 8), "reverse_std", (4, 2)),
        ((8, 4), "reverse_std", (2, 4)),
        ((6, 6), "reverse_std", (6, 2)),
        ((6, 6), "left", (6, 2)),
        ((6, 6), "right", (2, 6)),
        ((6, 5), "full", (2, 2)),
    ],
)
def test_side_rule_state_shapes(shape, proj_type, state_shape):
    tx = optim.scale_by_galore(rank=2, proj_type=proj_type)
    state = tx.init({"w": jnp.zeros(shape)})
    assert state.inner_state.mu["w"].shape == state_shape


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_projector_orthonormal_and_top_subspace(proj_type):
    (g,) = _rng_grads((7, 5), 1, seed=2)
    tx = optim.scale_by_galore(rank=3, proj_type=proj_type)
    _, state = _step(tx, {"w": g})
    basis = state.projector["w"]
    u, _, vt = np.linalg.svd(f64(g))
    expect = {"right": [u[:, :3]], "left": [vt[:3].T], "full": [u[:, :3], vt[:3].T]}
    for b, ref in zip(jax.tree.leaves(basis), expect[proj_type], strict=True):
        b = f64(b[0])
        np.testing.assert_allclose(b.T @ b, np.eye(3), **MATMUL_F32)
        np.testing.assert_allclose(b @ b.T, ref @ ref.T, **MATMUL_F32)


def test_updates_stay_in_subspace_between_refreshes():
    grads = _rng_grads((5, 9), 4, seed=3)
    tx = optim.scale_by_galore(rank=2, update_proj_gap=10,  # std: right (in)
                               inner=optim.scale_by_adam_hf())
    state = tx.init({"w": grads[0]})
    for g in grads:
        u, state = tx.update({"w": g}, state)
        p = f64(state.projector["w"][0])
        resid = (np.eye(5) - p @ p.T) @ f64(u["w"])
        np.testing.assert_allclose(resid, 0.0, atol=MATMUL_F32["atol"])


def test_first_step_is_sign_like():
    (g,) = _rng_grads((6, 4), 1, seed=4)
    tx = optim.scale_by_galore(rank=2, scale=0.25, inner=optim.scale_by_adam_hf(eps=0))
    u, state = tx.update({"w": g}, tx.init({"w": g}))
    p = f64(state.projector["w"][0])  # std on (6, 4): left (out axis), (4, 2)
    expect = 0.25 * np.sign(f64(g) @ p) @ p.T
    np.testing.assert_allclose(f64(u["w"]), expect, **MATMUL_F32)


@pytest.mark.parametrize(  # square bases only
    "shape, proj_type", [((5, 4), "std"), ((5, 4), "left"), ((4, 4), "full")])
@pytest.mark.parametrize("momentum, gap", [(None, 2), (0.9, 100)])
def test_full_rank_with_sgd_equals_sgd(shape, proj_type, momentum, gap):
    # Plain SGD equals SGD across refreshes; momentum only while the basis is
    # fixed (GaLore reuses old-basis moments in the new basis).
    grads = [{"w": g} for g in _rng_grads(shape, 6, seed=5)]
    inner = optax.identity() if momentum is None else optax.trace(momentum)
    gal = optim.scale_by_galore(rank=4, update_proj_gap=gap, proj_type=proj_type,
                                inner=inner)
    params = {"w": jnp.zeros(shape)}
    a, _ = _run(optax.sgd(0.1, momentum=momentum), grads, params)
    b, _ = _run(optax.chain(gal, optax.scale(-0.1)), grads, params)
    assert_tree_allclose(a, b, **MATMUL_F32)


def _identity_projector():
    svd = optim.svd()
    return optim.Projector(svd.init, lambda g, b, s, k: b, svd.down, svd.up)


def test_identity_projector_full_rank_equals_adam():
    # docs/galore.md#full-rank-is-not-adam: the SVD basis would rotate Adam; identity
    # does not.
    grads = [{"w": g} for g in _rng_grads((4, 6), 5, seed=6)]
    params = {"w": jnp.zeros((4, 6))}
    gal = optim.scale_by_galore(rank=4, update_proj_gap=2, projector=_identity_projector())
    a, _ = _run(gal, grads, params)
    b, _ = _run(optax.scale_by_adam(), grads, params)
    assert_tree_allclose(a, b, **MATMUL_F32)


def test_full_rank_svd_is_not_adam():
    grads = [{"w": g} for g in _rng_grads((4, 6), 1, seed=6)]
    params = {"w": jnp.zeros((4, 6))}
    a, _ = _run(optim.scale_by_galore(rank=4), grads, params)
    b, _ = _run(optax.scale_by_adam(), grads, params)
    assert np.abs(f64(a[0]["w"]) - f64(b[0]["w"])).max() > 0.1


def test_refresh_schedule_keeps_moments():
    grads = _rng_grads((6, 4), 5, seed=7)
    tx = optim.scale_by_galore(rank=2, update_proj_gap=2, inner=optim.scale_by_adam_hf())
    state = tx.init({"w": grads[0]})
    bases = []
    for g in grads:
        prev = state
        _, state = tx.update({"w": g}, state)
        bases.append(f64(state.projector["w"][0]))
        r = f64(g) @ bases[-1]  # std on (6, 4): left, low (6, 2)
        mu = 0.9 * f64(prev.inner_state.mu["w"]) + 0.1 * r
        np.testing.assert_allclose(f64(state.inner_state.mu["w"]), mu, **MATMUL_F32)
    changed = [not np.allclose(bases[k], bases[k - 1]) for k in range(1, 5)]
    assert changed == [False, True, False, True]  # refreshes at k = 0, 2, 4


def test_weight_decay_placement_is_optax_style():
    g = {"w": jnp.zeros((4, 6))}
    w = {"w": jnp.full((4, 6), 2.0)}
    tx = optim.galore(0.1, rank=2, weight_decay=0.5)
    (u,), _ = _run(tx, [g], w)
    # decays the old weights: -lr * wd * w, no update term for a zero gradient
    np.testing.assert_allclose(f64(u["w"]), -0.1 * 0.5 * 2.0, **MATMUL_F32)


# ---------------------------------------------------------------- layouts


def test_stacked_kernel_is_per_layer():
    grads = _rng_grads((3, 5, 7), 4, seed=8)
    tx = optim.scale_by_galore(rank=2, update_proj_gap=2,
                               dimension_numbers={"w": tree.dims.stacked()})
    a, _ = _run(tx, [{"w": g} for g in grads], {"w": grads[0]})
    tx2 = optim.scale_by_galore(rank=2, update_proj_gap=2)
    for layer in range(3):
        b, _ = _run(tx2, [{"w": g[layer]} for g in grads], {"w": grads[0][layer]})
        for ua, ub in zip(a, b, strict=True):
            np.testing.assert_allclose(f64(ua["w"][layer]), f64(ub["w"]), **MATMUL_F32)


def test_head_split_kernel_with_dimension_numbers():
    grads = _rng_grads((6, 2, 4), 3, seed=9)
    dims = {"attn": tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))}
    tx = optim.scale_by_galore(rank=2, dimension_numbers=dims)
    a, state = _run(tx, [{"attn": g} for g in grads], {"attn": grads[0]})
    assert state.inner_state.mu["attn"].shape == (2, 8)
    b, _ = _run(optim.scale_by_galore(rank=2),
                [{"attn": g.reshape(6, 8)} for g in grads], {"attn": grads[0].reshape(6, 8)})
    for ua, ub in zip(a, b, strict=True):
        np.testing.assert_allclose(f64(ua["attn"]).reshape(6, 8), f64(ub["attn"]),
                                   **MATMUL_F32)


def _counting_svd(counter):
    svd = optim.svd()

    def refresh(g, b, s, k):
        # under vmap the callback may see the whole batch at once
        jax.debug.callback(lambda x: counter.append(1 if x.ndim == 2 else x.shape[0]), g)
        return svd.refresh(g, b, s, k)

    return optim.Projector(svd.init, refresh, svd.down, svd.up)


@pytest.mark.parametrize("stagger, expected", [(False, [4, 0, 0, 0, 4, 0]),
                                               (True, [4, 1, 1, 1, 1, 1])])
def test_staggered_refresh_counts_svds(stagger, expected):
    calls = []
    tx = optim.scale_by_galore(rank=2, update_proj_gap=4, stagger=stagger,
                               projector=_counting_svd(calls),
                               inner=optim.scale_by_adam_hf(),
                               dimension_numbers=tree.stacked("w"))
    grads = _rng_grads((4, 5, 6), 6, seed=10)
    state = tx.init({"w": grads[0]})
    step = jax.jit(tx.update)
    per_step = []
    for g in grads:
        n = len(calls)
        _, state = step({"w": g}, state)
        jax.effects_barrier()
        per_step.append(len(calls) - n)
    assert per_step == expected


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("projector", [optim.svd(), optim.randomized_svd(1, 2)])
def test_zero_and_ill_conditioned_gradients_give_no_nan(projector):
    zero = jnp.zeros((6, 8))
    ill = jnp.outer(jnp.arange(6.0), jnp.ones(8)) * 1e-30
    tx = optim.scale_by_galore(rank=3, update_proj_gap=1, projector=projector)
    (u0, u1), state = _run(tx, [{"w": zero}, {"w": ill}], {"w": zero})
    for x in jax.tree.leaves((u0, u1, state)):
        assert np.all(np.isfinite(np.asarray(x, np.float64) if x.dtype != jnp.uint32 else 0))


def test_randomized_svd_finds_the_dominant_subspace(getkey):
    rng = np.random.default_rng(11)
    low = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 16))
    g = jnp.asarray(low + 1e-3 * rng.standard_normal((20, 16)), jnp.float32)
    spec = _projectors.LeafSpec("in", 3, 20, 16)
    proj = optim.randomized_svd(oversample=2, power_iters=2)
    p = f64(proj.refresh(g, proj.init(spec, jnp.float32), spec, getkey()))
    u = np.linalg.svd(f64(g))[0][:, :3]
    np.testing.assert_allclose(p @ p.T, u @ u.T, atol=1e-4)  # noise 1e-3 / gap O(1)


def test_bf16_state_is_stable():
    g = {"w": jnp.ones((4, 6), jnp.bfloat16)}
    gal = optim.scale_by_galore(rank=2, update_proj_gap=1, inner=optim.scale_by_adam_hf())
    tx = jax.jit(gal.update)
    state = gal.init(g)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    u, state = tx(g, state)
    assert u["w"].dtype == jnp.bfloat16
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before


# ---------------------------------------------------------------- errors


def test_errors_name_path_and_shape():
    with pytest.raises(ValueError, match=r"rank=5 .*'w'.*\(4, 6\)"):
        optim.scale_by_galore(rank=5).init({"w": jnp.zeros((4, 6))})
    with pytest.raises(ValueError, match="rank must be positive"):
        optim.scale_by_galore(rank=0)
    with pytest.raises(ValueError, match="proj_type"):
        optim.scale_by_galore(rank=1, proj_type="svd")
    with pytest.raises(ValueError, match=r"'x'.*\(2, 2, 2, 2\)"):
        optim.scale_by_galore(rank=1).init({"x": jnp.zeros((2, 2, 2, 2))})
    with pytest.raises(ValueError, match="not in the tree"):
        optim.scale_by_galore(rank=1, dimension_numbers={"nope": None}).init(
            {"w": jnp.zeros((2, 2))})
    tx = optim.scale_by_galore(rank=1, inner=optax.adamw(1e-3))
    w = {"w": jnp.ones((2, 3))}
    with pytest.raises(TypeError, match="needs params"):
        _step(tx, w)


def test_vector_leaves_pass_through_inner_unprojected():
    g = {"b": jnp.asarray([1.0, -2.0])}
    a, _ = _run(optim.scale_by_galore(rank=1), [g], g)
    b, _ = _run(optax.scale_by_adam(), [g], g)
    assert_tree_allclose(a, b, **EXACT)
