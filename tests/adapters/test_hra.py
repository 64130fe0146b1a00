"""HRA (peftjax.adapters.hra): PEFT's get_delta_weight in torch layout (plain and
Gram-Schmidt), the paired init, exact unfold, the factored form, orthogonality after
training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from tests import helpers as h


def _peft_rotation(u, apply_gs):
    """float64 PEFT ``get_delta_weight`` (torch layout: ``W' = W @ R``)."""
    n, r = u.shape
    if apply_gs:
        cols = []
        for i in range(r):
            v = u[:, i].copy()
            for q in cols:
                v = v - (q @ v) * q
            cols.append(v / np.linalg.norm(v))
        q = np.stack(cols, axis=1)
        return np.eye(n) - 2 * q @ q.T
    un = u / np.linalg.norm(u, axis=0)
    rot = np.eye(n)
    for i in range(r):
        rot = rot - 2 * rot @ un[:, i:i + 1] @ un[:, i:i + 1].T
    return rot


def ref_hra(w, t, f, apply_gs=False):
    """float64 ``W' = R_peftᵀ W0`` (Flax layout of PEFT's ``W0 @ R``)."""
    return _peft_rotation(h.f64(t.u), apply_gs).T @ h.f64(w)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_hra_is_peft_delta_weight_in_float64(apply_gs):
    rng = np.random.default_rng(0)
    n_in, n_out, r = 7, 5, 3
    w_t = rng.standard_normal((n_out, n_in))
    u = rng.standard_normal((n_in, r))
    x = rng.standard_normal((4, n_in))
    want = w_t @ _peft_rotation(u, apply_gs)  # PEFT's merged weight, (out, in)
    with jax.enable_x64(True):
        ad = adapters.hra(r, apply_GS=apply_gs, param_dtype=jnp.float64)
        t = adapters.HRAParams(jnp.asarray(u))
        got = ad.apply(jnp.asarray(w_t.T), t, None)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want.T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ad.unapply(got, t, None, None)), w_t.T,
                                   rtol=1e-12, atol=1e-12)
        terms = ad.factored.terms(jnp.asarray(w_t.T), t, None)
        assert terms.in_scale is None and terms.out_scale is None and terms.delta is None
        y = np.asarray(terms.in_map(jnp.asarray(x))) @ w_t.T  # x H_r...H_1, then W0
        np.testing.assert_allclose(y, x @ want.T, rtol=1e-12, atol=1e-12)
        rot = np.asarray(adapters.hra_rotation(jnp.asarray(u), apply_GS=apply_gs))
        np.testing.assert_allclose(rot, _peft_rotation(u, apply_gs).T, atol=1e-12)
    # W' keeps W0's singular values (Eq. 3: an orthogonal input map).
    np.testing.assert_allclose(np.linalg.svd(want, compute_uv=False),
                               np.linalg.svd(w_t, compute_uv=False), rtol=1e-10)


def test_hra_init_is_peft_default(getkey):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 48)), jnp.float32)
    # Even r: kaiming-uniform half (torch fan-in r/2), each column twice: identity.
    t, _ = adapters.hra(4).init(getkey(), w)
    u = h.f64(t.u)
    np.testing.assert_array_equal(u[:, 0::2], u[:, 1::2])
    assert 0.8 / np.sqrt(2) < np.abs(u).max() <= 1 / np.sqrt(2)
    np.testing.assert_allclose(h.f64(adapters.hra(4).apply(w, t, None)), h.f64(w),
                               **h.MATMUL_F32)
    # Odd r (PEFT warns) and init_weights=False: kaiming-uniform (in, r), fan-in r.
    for ad in (adapters.hra(3), adapters.hra(4, init_weights=False)):
        u = h.f64(ad.init(getkey(), w)[0].u)
        r = u.shape[1]
        assert 0.8 / np.sqrt(r) < np.abs(u).max() <= 1 / np.sqrt(r)
        assert not np.allclose(u[:, 0], u[:, 1])


def test_hra_rotation_stays_orthogonal_after_training():
    # 50 Adam steps on a tiny regression: RᵀR = I within float32 rounding.
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    opt = optax.adam(0.05)
    for apply_gs in (False, True):
        ad = adapters.hra(4, apply_GS=apply_gs)

        def loss(tt, ad=ad):
            return jnp.mean((x @ ad.apply(w, tt, None) - y) ** 2)

        @jax.jit
        def train(t, loss=loss):
            def step(_, carry):
                tt, state = carry
                upd, state = opt.update(jax.grad(loss)(tt), state)
                return optax.apply_updates(tt, upd), state

            with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
                return jax.lax.fori_loop(0, 50, step, (t, opt.init(t)))[0]

        t, _ = ad.init(jax.random.key(0), w)
        t_end = train(t)
        assert loss(t_end) < loss(t)
        rot = adapters.hra_rotation(t_end.u, apply_GS=apply_gs)
        np.testing.assert_allclose(h.f64(rot.T @ rot), np.eye(6), atol=1e-5)
        assert float(jnp.abs(rot - jnp.eye(6)).max()) > 1e-2  # it moved


def test_hra_errors():
    with pytest.raises(ValueError, match="hra"):
        adapters.hra(0)
    with pytest.raises(TypeError, match="apply_GS"):
        adapters.hra(2, apply_GS=1)
    with pytest.raises(TypeError, match="init_weights"):
        adapters.hra(2, init_weights="yes")
    with pytest.raises(ValueError, match=r"rank <= in.*\(3, 5\)"):
        adapters.hra(4, apply_GS=True).init(jax.random.key(0), jnp.ones((3, 5)))


def test_hra_orthogonality_is_the_papers_regulariser():
    # float64 reference: sum over matrices (and stacked layers) of
    # ||I - Û^T Û||_F^2 with Û = U / column norms; minimising it alone
    # makes the reflection vectors orthogonal; other leaves are ignored.
    rng = np.random.default_rng(5)
    u1 = rng.standard_normal((2, 6, 3))  # stacked (L, in, r)
    u2 = rng.standard_normal((5, 2))

    def ref(u):
        un = u / np.linalg.norm(u, axis=-2, keepdims=True)
        g = np.swapaxes(un, -1, -2) @ un
        return float(np.sum((g - np.eye(u.shape[-1])) ** 2))

    t = {"a": adapters.HRAParams(jnp.asarray(u1, jnp.float32)),
         "b": adapters.HRAParams(jnp.asarray(u2, jnp.float32)),
         "c": jnp.ones((3, 3))}
    got = float(adapters.hra_orthogonality(t))
    np.testing.assert_allclose(got, ref(u1) + ref(u2), rtol=1e-5)
    assert got > 0.1
    loss = jax.jit(jax.value_and_grad(adapters.hra_orthogonality))
    for _ in range(200):
        v, g = loss(t)
        t = jax.tree.map(lambda p, d: p - 0.05 * d, t, g)
    assert float(adapters.hra_orthogonality(t)) < 1e-4 * got
