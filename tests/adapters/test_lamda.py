"""LaMDA (peftjax.adapters.lamda): ten AdamW steps against the authors' code with
their gradual freezing of PMB (golden), the spectral init, exact freezing after the
optimizer, LaMDA++ rank allocation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from tests import helpers as h

GOLDEN = np.load("tests/adapters/golden/lamda/lamda.npz")
T, ETA, LR, WD = 10, 0.3, 1e-2, 0.1  # as scripts/golden/lamda_make.py


def ref_lamda(w, t, f, s):
    """float64 ``W + s·A S B`` (Flax layout)."""
    return h.f64(w) + s * h.f64(f.a) @ h.f64(t.core) @ h.f64(t.b)


def test_lamda_trains_like_authors_code():
    """Forward, gradients and the gradual PMB freezing of ``gradual_freeze_B``."""
    g = GOLDEN
    for t in range(1, T + 1):  # the columns their trainer masked at update t
        np.testing.assert_array_equal(
            np.asarray(adapters.lamda_frozen_rows(t, 4, T, ETA)), g["frozen"][t - 1])
    with jax.enable_x64(True):
        ad = adapters.lamda(4, alpha=8.0, init="lora", param_dtype=jnp.float64)
        w, x, y = (jnp.asarray(g[k]) for k in ("w", "x", "y"))
        w = w.T
        tr = adapters.LaMDAParams(core=jnp.asarray(g["s0"].T), b=jnp.asarray(g["b0"].T))
        fr = adapters.LaMDABasis(a=jnp.asarray(g["a0"].T))
        # Before the optimizer: their gradient masking (AdamW's moments still move).
        tx = optax.chain(adapters.lamda_freeze(T, ETA),
                         optax.adamw(LR, eps=1e-8, weight_decay=WD))

        def loss(p):
            return jnp.mean((x @ ad.apply(w, p, fr) - y) ** 2)

        @jax.jit
        def step(p, st):
            u, st = tx.update(jax.grad(loss)(p), st, p)
            return optax.apply_updates(p, u), st

        st = tx.init(tr)
        with jax.numpy_dtype_promotion("standard"):  # optax's AdamW mixes int and float
            for _ in range(T):
                tr, st = step(tr, st)
        np.testing.assert_allclose(np.asarray(tr.core), g["s"].T, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(tr.b), g["b"].T, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(g["a"], g["a0"])  # PMA never trained


def test_lamda_svd_init_and_exact_freeze_after_optimizer(getkey):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
    ad = adapters.lamda(3, alpha=6.0)
    t, f = ad.init(getkey(), w)
    u, _, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(h.f64(f.a).T @ u[:, :3]), np.eye(3), atol=1e-5)
    np.testing.assert_allclose(np.abs(h.f64(t.b) @ vt[:3].T), np.eye(3), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(t.core), 0)
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    assert ad.num_trainable(w) == 3 * 3 + 3 * 5  # r² + r·out; PMA frozen
    # SmolLM2 q,k,v,o at the authors' default rank 64 (r² + r·out per matrix).
    assert 30 * sum(adapters.lamda().num_trainable(jnp.zeros(s)) for s in
                    [(576, 576), (576, 192), (576, 192), (576, 576)]) == 3440640
    # After the optimizer: the frozen rows of b stay exactly put.
    tx = optax.chain(optax.adam(0.1), adapters.lamda_freeze(total_steps=4, eta=0.5))
    tr = {"q": t._replace(core=jnp.ones((3, 3)))}
    st = tx.init(tr)
    grads = {"q": adapters.LaMDAParams(jnp.ones((3, 3)), jnp.ones((3, 5)))}
    @jax.jit
    def step(tr, st):
        u, st = tx.update(grads, st, tr)
        return optax.apply_updates(tr, u), st

    seen = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
        for _ in range(4):  # update 1 moves every row; 2, 3 freeze row 0; 4 rows 0, 1
            tr, st = step(tr, st)
            seen.append(np.asarray(tr["q"].b))
    np.testing.assert_array_equal(seen[3][0], seen[0][0])
    np.testing.assert_array_equal(seen[3][1], seen[2][1])
    assert not np.allclose(seen[3][2], seen[2][2])


def test_lamda_plus_ranks():
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((16, 12))
    peaked = np.outer(rng.standard_normal(16), rng.standard_normal(12)) * 10 + 0.01 * flat
    ks = {"peaked": peaked, "flat": flat, "flat2": flat.T[:, :10]}
    ranks = adapters.lamda_plus_ranks(ks, 4)
    assert sum(ranks.values()) == 12  # the uniform budget r·L
    assert ranks["flat"] > ranks["peaked"] == 1
    assert adapters.lamda_plus_ranks(ks, 4, max_rank=5)["flat"] <= 5
    with pytest.raises(ValueError, match=r"bad must be a 2-D .* shape \(2, 3, 4\)"):
        adapters.lamda_plus_ranks({"bad": np.zeros((2, 3, 4))}, 2)


def test_lamda_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        adapters.lamda(4, init="pissa")
    with pytest.raises(ValueError, match="total_steps and eta must be > 0"):
        adapters.lamda_freeze(0)
    with pytest.raises(ValueError, match=r"rank=8 exceeds min\(in, out\)=5"):
        adapters.lamda(8).init(jax.random.key(0), jnp.ones((6, 5)))
