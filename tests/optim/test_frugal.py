"""FRUGAL: docs/methods.md#frugal invariants and goldens from the authors' code."""

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

GOLDEN = pathlib.Path(__file__).parent / "golden" / "frugal_ref.npz"
# float32 SVDs from two LAPACK builds agree to about eps/(singular gap).
SVD_F32_REL = 3e-4


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


def _grads(shape, steps, seed):
    rng = np.random.default_rng(seed)
    return [{"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
            for _ in range(steps)]


# ---------------------------------------------------------------- goldens


def _cases(family):
    data = np.load(GOLDEN)
    return sorted(k[len("grads/"):] for k in data.files
                  if k.startswith(f"grads/{family}"))


def _replay_projector(indices):
    """Coordinates whose re-selections replay the reference's recorded draws."""
    coords = optim.coordinates()
    table = iter(np.asarray(indices, np.int32))

    def refresh(g, basis, spec, key):
        del g, key
        shape = jax.ShapeDtypeStruct((spec.rank,), jnp.int32)
        return jax.pure_callback(lambda: next(table), shape)

    return optim.Projector(coords.init, refresh, coords.down, coords.up, "floor")


def _alias(cfg, **kw):
    return optim.frugal(
        cfg["lr"], weight_decay=cfg["weight_decay"], update_gap=cfg["update_gap"],
        scale=cfg["proj_params_lr_scale"], free_scale=cfg["inactive_lr_scale"],
        inner=optax.scale_by_adam(*cfg["betas"], eps=cfg["eps"]), **kw)


def _check(tx, w0, grads, deltas):
    """Runs on Flax kernels (transposed) and compares every step's change."""
    params = {"w": jnp.asarray(np.swapaxes(w0, -1, -2))}
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        update = jax.jit(tx.update)
        for k in range(grads.shape[-3]):
            g = {"w": jnp.asarray(np.swapaxes(grads[..., k, :, :], -1, -2))}
            u, state = update(g, state, params)
            params = optax.apply_updates(params, u)
            np.testing.assert_allclose(
                np.swapaxes(f64(u["w"]), -1, -2), deltas[..., k, :, :], rtol=0,
                atol=SVD_F32_REL * np.abs(deltas[..., k, :, :]).max())


@pytest.mark.parametrize("case", _cases("svd_"))
def test_svd_family_matches_reference(case):
    data = np.load(GOLDEN)
    cfg = json.loads(str(data["config"]))
    free = optax.scale_by_sign() if case.endswith("sign_sgd") else optax.identity()
    tx = _alias(cfg, density=0.5, projector=optim.svd(), proj_type="std", free=free)
    _check(tx, data[f"w0/{case}"], data[f"grads/{case}"], data[f"deltas/{case}"])


@pytest.mark.parametrize("case", _cases("columns_"))
def test_column_family_matches_reference(case):
    data = np.load(GOLDEN)
    cfg = json.loads(str(data["config"]))
    # The reference's columns of W (out, in) are the input axis: `right`.
    tx = _alias(cfg, density=0.5, projector=_replay_projector(data[f"indices/{case}"]),
                proj_type="right", reset_statistics=case.endswith("reset1"))
    _check(tx, data[f"w0/{case}"], data[f"grads/{case}"], data[f"deltas/{case}"])


@pytest.mark.parametrize("case", _cases("blocks_"))
def test_block_family_matches_reference(case):
    data = np.load(GOLDEN)
    cfg = json.loads(str(data["config"]))
    tx = _alias(cfg, density=0.25, projector=optim.blocks(case.split("_")[1]))
    w0, grads, deltas = data[f"w0/{case}"], data[f"grads/{case}"], data[f"deltas/{case}"]
    names = [f"b{i}" for i in range(w0.shape[0])]  # sorted = reference order
    params = {n: jnp.asarray(w0[i].T) for i, n in enumerate(names)}
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        update = jax.jit(tx.update)
        for k in range(grads.shape[1]):
            g = {n: jnp.asarray(grads[i, k].T) for i, n in enumerate(names)}
            u, state = update(g, state, params)
            params = optax.apply_updates(params, u)
            for i, n in enumerate(names):
                np.testing.assert_allclose(f64(u[n]).T, deltas[i, k], **MATMUL_F32)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("projector, proj_type", [
    (optim.svd(), "std"), (optim.coordinates(), "right"), (optim.coordinates(), "full"),
    (optim.random_orthogonal(), "left")])
def test_split_identity(projector, proj_type, getkey):
    g = _grads((6, 8), 1, seed=1)[0]["w"]
    spec = _projectors.LeafSpec(
        optim._leaves.side_for(proj_type, 6, 8), 3, 6, 8)
    basis = projector.refresh(g, projector.init(spec, g.dtype), spec, getkey())
    back = projector.up(projector.down(g, basis, spec), basis, spec)
    free = g - back
    # exact for coordinates; one rounding of `g - back` for dense bases
    tol = EXACT if projector.rounding == "floor" else MATMUL_F32
    np.testing.assert_allclose(f64(back + free), f64(g), **tol)
    if projector.rounding == "round" and spec.side == "in":
        np.testing.assert_allclose(f64(basis).T @ f64(free), 0.0, atol=1e-5)


def test_state_free_part_is_plus_minus_lr_free():
    grads = _grads((6, 8), 3, seed=2)
    tx = optim.frugal(0.1, density=0.5, scale=1.0, free_scale=0.5,
                      inner=optax.set_to_zero(), update_gap=2)
    outs, _ = _run(tx, grads, jax.tree.map(jnp.zeros_like, grads[0]))
    for u in outs:
        vals = set(np.round(np.unique(f64(u["w"])), 8))
        assert vals <= {-0.05, 0.0, 0.05}


def test_columns_density_one_equals_adamw_until_reselection():
    grads = _grads((5, 6), 6, seed=3)
    params = {"w": jnp.full((5, 6), 0.5)}
    ours = optim.frugal(1e-2, density=1.0, update_gap=4, weight_decay=0.1,
                        projector=optim.coordinates(), proj_type="right")
    ref = optax.adamw(1e-2, weight_decay=0.1)
    a, _ = _run(ours, grads, params)
    b, _ = _run(ref, grads, params)
    for k in range(4):
        assert_tree_allclose(a[k], b[k], **MATMUL_F32)
    # reset_statistics zeroes the moments at k = T: equality breaks there.
    assert np.abs(f64(a[4]["w"]) - f64(b[4]["w"])).max() > 1e-4


def test_density_zero_is_sign_sgd():
    grads = _grads((5, 6), 3, seed=4)
    params = {"w": jnp.full((5, 6), 0.5)}
    tx = optim.frugal(0.1, density=0.0, weight_decay=0.2, scale=0.5, free_scale=0.3)
    outs, state = _run(tx, grads, params)
    assert state[0].inner_state.mu["w"].shape == (0, 6)
    for g, u in zip(grads, outs, strict=True):
        expect = -0.1 * 0.2 * 0.5 - 0.1 * 0.5 * 0.3 * np.sign(f64(g["w"]))
        np.testing.assert_allclose(f64(u["w"]), expect, **MATMUL_F32)


def test_no_free_rule_without_reset_equals_galore():
    grads = _grads((6, 8), 5, seed=5)
    params = jax.tree.map(jnp.zeros_like, grads[0])
    fr = optim.scale_by_frugal(0.5, 2, free=optax.set_to_zero(), scale=0.25,
                               reset_statistics=False)
    gal = optim.scale_by_galore(rank=3, update_proj_gap=2, scale=0.25)
    a, _ = _run(fr, grads, params)
    b, _ = _run(gal, grads, params)
    assert_tree_allclose(a, b, **MATMUL_F32)


def test_reset_makes_the_step_after_reselection_sign_like():
    grads = _grads((6, 8), 3, seed=6)
    tx = optim.scale_by_frugal(0.5, 2, free=optax.set_to_zero(),
                               inner=optim.scale_by_adam_hf(eps=0.0))
    outs, state = _run(tx, grads, jax.tree.map(jnp.zeros_like, grads[0]))
    p = f64(state.projector["w"][0])  # std on (6, 8): right, (6, 3)
    expect = p @ np.sign(p.T @ f64(grads[2]["w"]))
    np.testing.assert_allclose(f64(outs[2]["w"]), expect, **MATMUL_F32)
    assert int(state.inner_state.count) == 1


@pytest.mark.parametrize("order, expected", [
    ("descending", [{7, 6}, {5, 4}, {3, 2}, {1, 0}, {7, 6}]),
    ("ascending", [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 1}]),
    ("mirror", [{0, 7}, {1, 6}, {2, 5}, {3, 4}, {0, 7}]),
])
def test_block_schedule(order, expected):
    rng = np.random.default_rng(7)
    names = [f"b{i}" for i in range(8)]
    tx = optim.scale_by_frugal(0.25, 1, projector=optim.blocks(order),
                               inner=optax.identity(), free=optax.set_to_zero())
    g = {n: jnp.asarray(rng.standard_normal((2, 3)), jnp.float32) for n in names}
    outs, _ = _run(tx, [g] * 5, g)
    for u, active in zip(outs, expected, strict=True):
        assert {i for i, n in enumerate(names) if np.any(f64(u[n]) != 0)} == active


def test_stacked_and_errors():
    g = {"w": jnp.ones((2, 4, 6))}
    with pytest.raises(ValueError, match=r"'w'.*\(2, 4, 6\).*no default matrix view"):
        optim.scale_by_frugal(0.5).init(g)  # not guessed to be stacked layers
    state = optim.scale_by_frugal(0.5, dimension_numbers=tree.stacked("layers")).init(
        {"layers": g})
    assert state.inner_state.mu["layers"]["w"].shape == (2, 2, 6)
    state = optim.scale_by_frugal(0.5, dimension_numbers=tree.dims.stacked()).init(g)
    assert state.inner_state.mu["w"].shape == (2, 2, 6)
    with pytest.raises(ValueError, match="density"):
        optim.scale_by_frugal(1.5)
    with pytest.raises(TypeError, match="stateless"):
        optim.scale_by_frugal(0.5, free=optax.scale_by_adam(),
                              dimension_numbers=tree.dims.stacked()).init(g)
    with pytest.raises(ValueError, match="even"):
        optim.scale_by_frugal(0.375, projector=optim.blocks("mirror")).init(
            {f"b{i}": jnp.ones(2) for i in range(8)})
    with pytest.raises(ValueError, match=r"'x'.*\(2, 2, 2, 2\)"):
        optim.scale_by_frugal(0.5).init({"x": jnp.zeros((2, 2, 2, 2))})
