"""optim.osf (Sculpting Subspaces on full parameters): the projection and a two-task sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim
from tests import helpers as h


def test_osf_projects_off_the_top_singular_subspace_in_float64():
    rng = np.random.default_rng(0)
    w, g = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    left, _, right_t = np.linalg.svd(w)
    pl, pr = left[:, :2] @ left[:, :2].T, right_t[:2].T @ right_t[:2]
    want = (np.eye(7) - pl) @ g @ (np.eye(5) - pr)
    with jax.enable_x64(True):
        tx = optim.scale_by_osf(2, inner=optax.identity())
        params = {"w": jnp.asarray(w), "b": jnp.asarray(w[0])}
        u, state = tx.update({"w": jnp.asarray(g), "b": jnp.asarray(g[0])}, tx.init(params))
    np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(u["b"]), g[0], rtol=0, atol=0)  # not a matrix
    assert state.bases["w"][0].shape == (1, 7, 2) and state.bases["w"][1].shape == (1, 5, 2)


def test_osf_task_sequence_keeps_task_one_subspace():
    rng = np.random.default_rng(1)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    params = {"w": n(8, 6), "layers": {"stack": n(2, 6, 4)}}

    def train(p, target, tx, steps=30):
        loss = lambda q: sum(jnp.sum((a - b) ** 2) for a, b in  # noqa: E731
                             zip(jax.tree.leaves(q), jax.tree.leaves(target), strict=True))
        state = tx.init(p)  # bases from the weights at the start of the task

        @jax.jit
        def step(q, s):
            u, s = tx.update(jax.grad(loss)(q), s, q)
            return optax.apply_updates(q, u), s

        for _ in range(steps):
            p, state = step(p, state)
        return p, state

    task1 = jax.tree.map(lambda x: x + 0.5, params)
    w1, _ = train(params, task1, optim.osf(0.05, effective_rank=1))
    task2 = jax.tree.map(lambda x: -x, params)
    w2, state2 = train(w1, task2, optim.osf(0.05, effective_rank=2, weight_decay=0.1))
    for path, (a, b) in {"w": (w1["w"][None], w2["w"][None]),
                         "stack": (w1["layers"]["stack"], w2["layers"]["stack"])}.items():
        bases = state2[0].bases["w"] if path == "w" else state2[0].bases["layers"]["stack"]
        left, right = h.f64(bases[0]), h.f64(bases[1])
        a, b = h.f64(a), h.f64(b)
        assert np.abs(b - a).max() > 0.1  # task 2 trained the weight
        # the task-1 subspace component (top-2 singular directions of W after task 1)
        np.testing.assert_allclose(np.einsum("sik,sio->sko", left, b),
                                   np.einsum("sik,sio->sko", left, a), atol=2e-5)
        np.testing.assert_allclose(b @ right, a @ right, atol=2e-5)
        s_high = np.linalg.svd(a, compute_uv=False)[:, :2]
        np.testing.assert_allclose(np.linalg.svd(b, compute_uv=False)[:, :2].min(axis=1) > 0,
                                   True)
        np.testing.assert_allclose(np.abs(np.einsum("sik,sio,sol->skl", left, b, right)),
                                   np.stack([np.diag(x) for x in s_high]), atol=2e-5)


def test_osf_errors():
    with pytest.raises(ValueError, match="effective_rank must be positive"):
        optim.scale_by_osf(0)
    with pytest.raises(TypeError, match="effective_rank"):
        optim.osf(0.1, effective_rank="2")
    with pytest.raises(ValueError, match=r"cannot view leaf 'x'.*\(2, 3, 4\)"):
        optim.scale_by_osf(1).init({"x": jnp.ones((2, 3, 4))})
