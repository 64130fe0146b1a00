"""Riemannian-preconditioned LoRA: PEFT trajectories (AdamW, SGD), formulas, stacks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim
from tests.helpers import MATMUL_F32
from tests.optim import golden_lora_net as net

# PEFT create_riemannian_optimizer(reg=1e-2), LoRA r=4, lora_alpha=8, 8 steps, float32.
CASES = {
    # torch.optim.AdamW(lr=1e-2, weight_decay=0.01): eps 1e-8 after the bias correction.
    "riemannian_adamw": lambda: optim.riemannian(1e-2, reg=1e-2, weight_decay=0.01),
    # torch.optim.SGD(lr=5e-2, momentum=0.9).
    "riemannian_sgd": lambda: optim.riemannian(5e-2, reg=1e-2, inner=optax.trace(0.9)),
}


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax.scale_by_adam's bias correction needs standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def golden():
    return net.load()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_trajectory(golden, case):
    traj, losses, _ = net.trajectory(CASES[case](), golden, 2.0, 8)
    net.assert_matches(golden, case, traj, losses, **MATMUL_F32)


def test_preconditioners_scanned_stack_and_bf16():
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    p = {"k": {"a": n(3, 5, 2), "b": n(3, 2, 4)}, "bias": n(4),
         "h": {"a": n(6, 2).astype(jnp.bfloat16), "b": n(2, 3).astype(jnp.bfloat16)}}
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), p)
    g["h"] = p["h"]
    tx = optim.scale_by_riemannian(reg=0.1)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    a, b = np.asarray(p["k"]["a"][2], np.float64), np.asarray(p["k"]["b"][2], np.float64)
    eye = np.eye(2)
    ga = np.asarray(g["k"]["a"][2]) @ np.linalg.inv(b @ b.T + 0.1 * eye)
    gb = np.linalg.inv(a.T @ a + 0.1 * eye) @ np.asarray(g["k"]["b"][2])
    np.testing.assert_allclose(u["k"]["a"][2], ga, **MATMUL_F32)
    np.testing.assert_allclose(u["k"]["b"][2], gb, **MATMUL_F32)
    np.testing.assert_array_equal(u["bias"], g["bias"])  # not a pair: unchanged
    # bfloat16 factors: preconditioned in float32, returned in bfloat16
    assert u["h"]["a"].dtype == u["h"]["b"].dtype == jnp.bfloat16
    a, b = (np.asarray(p["h"][k], np.float64) for k in "ab")
    ref_b = np.linalg.inv(a.T @ a + 0.1 * eye) @ b
    np.testing.assert_allclose(np.asarray(u["h"]["b"], np.float64), ref_b, rtol=1e-2, atol=1e-2)


def test_errors_name_the_paths():
    with pytest.raises(ValueError, match=r"no LoRA factor pair.*w \(2,\)"):
        optim.riemannian(1e-2).init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"'layers/q' has shapes a \(2, 3, 2\) and b \(3, 2, 4\)"):
        optim.scale_by_riemannian().init(
            {"layers/q": {"a": jnp.ones((2, 3, 2)), "b": jnp.ones((3, 2, 4))}})
    p = {"q": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 4))}}
    tx = optim.scale_by_riemannian()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))
