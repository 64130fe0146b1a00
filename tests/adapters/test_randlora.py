"""RandLoRA (adapters.randlora): PEFT's pairing of bases and diagonals, float64 formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_randlora(w, t, f, *, s):
    """``W + ΔWᵀ`` in float64, transcribing PEFT's ``get_scaled_bases``/``get_delta_weight``.

    ``f`` holds the whole shared bases; the matrix slices them as PEFT does.

    Torch layout: ``update_A[k·n + b, j] = λ[k, b]·A[k, j]·γ[b, j]`` (a
    ``(r, n, s)`` product flattened over its first two axes), ``update_B =
    B.reshape(L, n·r)``; when ``in`` is the small side the layer's delta is
    ``update_B @ update_A`` ``(out, in)``, else ``update_Aᵀ @ update_Bᵀ``.
    """
    w = h.f64(w)
    n_in, n_out = w.shape
    lam, gamma = h.f64(t.lam), h.f64(t.gamma)
    r, n = lam.shape
    a = h.f64(f.a)[:, :min(n_in, n_out)]  # PEFT's A[:, :n, :s] (its axis 1 has size 1)
    b = h.f64(f.b)[:max(n_in, n_out), :n, :]  # PEFT's B[:L, :n, :]
    upd_a = (lam[:, :, None] * a[:, None, :] * gamma[None]).reshape(r * n, -1)
    upd_b = b.reshape(b.shape[0], -1)
    if n_in <= n_out:
        delta_torch = upd_b @ upd_a  # (out, in)
    else:
        delta_torch = upd_a.T @ upd_b.T
    return w + s * delta_torch.T


def randlora_count(n_in, n_out, rank):
    """``n·(r + s)`` with ``s = min(in, out)``, ``n = ⌈s/r⌉``."""
    small = min(n_in, n_out)
    n = math.ceil(small / rank)
    return n * (rank + small)


# peft 0.21.2 (torch 2.13, CPU): RandLoraConfig(r=2, randlora_alpha=4) on
# Linear(3, 5) "up" and Linear(5, 3) "down" (shared A (2, 1, 5), B (5, 3, 2)),
# A = cos(arange), B = sin(arange + 1), λ = (arange + 1)/4, γ = arange·0.5 - 1;
# layer.get_delta_weight() of "up" (torch (out=5, in=3)). "down"'s was its
# transpose, (3, 5).
PEFT_UP_DELTA = [
    [-0.240809, -1.17731, -2.279267],
    [-0.163486, -0.895674, -1.847994],
    [-0.07314, -0.54269, -1.26951],
    [0.023032, -0.146475, -0.589898],
    [0.117369, 0.261408, 0.136705],
]


def _peft_like_parts():
    a_full = np.cos(np.arange(10.0)).reshape(2, 1, 5)
    b_full = np.sin(np.arange(30.0) + 1.0).reshape(5, 3, 2)
    lam = (np.arange(4.0) + 1.0).reshape(2, 2) / 4
    gamma = (np.arange(6.0) * 0.5 - 1.0).reshape(2, 3)
    f = adapters.RandLoRABasis(a=jnp.asarray(a_full[:, 0, :], jnp.float32),
                               b=jnp.asarray(b_full, jnp.float32))
    t = adapters.RandLoRAParams(lam=jnp.asarray(lam, jnp.float32),
                                gamma=jnp.asarray(gamma, jnp.float32))
    return t, f


@pytest.mark.parametrize("n_in,n_out", [(3, 5), (5, 3)])
def test_delta_matches_peft_numbers_both_orientations(n_in, n_out):
    ad = adapters.randlora(2, max_in=5, max_out=5, alpha=4.0)
    t, f = _peft_like_parts()
    w = jnp.zeros((n_in, n_out), jnp.float32)
    got = h.f64(ad.apply(w, t, f))
    want = np.asarray(PEFT_UP_DELTA)  # torch (5, 3)
    want = want.T if n_in == 3 else want  # Flax (in, out) = torch delta transposed
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref_randlora(w, t, f, s=2.0), **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, n_in)), jnp.float32)
    y = h.f64(ad.factored.terms(w, t, f).delta(x))
    np.testing.assert_allclose(y, h.f64(x) @ want, rtol=1e-5, atol=1e-5)


def test_init_is_peft_shared_once_and_counts(getkey):
    params = {"q": jnp.ones((6, 10)), "k": jnp.ones((12, 5)),
              "stack": jnp.ones((3, 6, 10))}
    ad = adapters.randlora(4, max_in=12, max_out=10, alpha=8.0, projection_seed=3)
    a = tree.assign(params, [tree.Rule(where="q|k", then=ad),
                             tree.Rule(where="stack", then=ad.with_dimension_numbers(
                                 tree.dims.stacked()))])
    state = adapters.init(a, getkey(), params)
    t = state.trainable["q"]  # s = 6, L = 10, n = 2
    assert t.lam.shape == (4, 2) and t.gamma.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(t.lam), 0.0)
    np.testing.assert_array_equal(np.asarray(t.gamma), np.float32(1 / 6))
    assert state.trainable["stack"].gamma.shape == (3, 2, 6)
    # One pair of bases for every leaf, PEFT's shapes: A (r, min_max), B (max_max, n_max, r).
    shared = state.frozen[adapters.SHARED]
    assert sorted(shared) == ["randlora_A", "randlora_B"]
    assert shared["randlora_A"].shape == (4, 10) and shared["randlora_B"].shape == (12, 3, 4)
    assert state.frozen["q"] == adapters.RandLoRABasis(adapters.Shared("randlora_A"),
                                                       adapters.Shared("randlora_B"))
    want = adapters.randlora_shared(4, 12, 10, projection_seed=3)
    for got, ref in zip((shared["randlora_A"], shared["randlora_B"]), want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        np.testing.assert_allclose(np.std(h.f64(ref), ddof=1), 1.0, rtol=1e-5)
    merged = adapters.materialize(a, params, *state)
    h.assert_tree_allclose(merged, params, **h.EXACT)  # λ = 0
    # PEFT counted 20 for Linear(6, 10) and 18 for Linear(12, 5) at r=4.
    assert ad.num_trainable(params["q"]) == randlora_count(6, 10, 4) == 20
    assert ad.num_trainable(params["k"]) == randlora_count(12, 5, 4) == 18
    assert adapters.num_trainable(state.trainable) == 20 + 18 + 3 * 20
    t2, _ = adapters.randlora(4, max_in=12, max_out=10, init_weights=False).init(
        getkey(), params["q"])
    assert float(jnp.abs(t2.lam).max()) > 0
    np.testing.assert_array_equal(np.asarray(t2.gamma), np.float32(1 / 10))


def test_sparse_bases():
    sparse = adapters.randlora_shared(8, 64, 64, bases=adapters.RandLoRABases.SPARSE)
    values = h.f64(sparse.b)
    assert len(np.unique(np.round(values, 5))) == 3
    np.testing.assert_allclose((values == 0).mean(), 2 / 3, atol=0.02)
    very = adapters.randlora_shared(8, 64, 64, bases=adapters.RandLoRABases.VERY_SPARSE)
    np.testing.assert_allclose((h.f64(very.b) != 0).mean(), 1 / 8, atol=0.02)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"randlora: matrix \(in=9, out=5\), dtype float32"):
        adapters.randlora(2, max_in=8, max_out=8).init(jax.random.key(0), jnp.ones((9, 5)))
    with pytest.raises(TypeError, match="bases must be a RandLoRABases"):
        adapters.randlora(2, max_in=8, max_out=8, bases="sparse")
    with pytest.raises(ValueError, match="max_out must be a positive int"):
        adapters.randlora(2, max_in=8, max_out=0)
    with pytest.raises(ValueError, match="rank"):
        adapters.randlora(0, max_in=8, max_out=8)


def test_factored_path_with_shared_bases_equals_materialize(getkey):
    """factored.transform on unrolled and stacked leaves reading the one shared pair."""
    from peftjax import factored

    rng = np.random.default_rng(5)
    params = {"up": jnp.asarray(rng.standard_normal((6, 9)) * 0.3, jnp.float32),
              "down": jnp.asarray(rng.standard_normal((2, 9, 9)) * 0.3, jnp.float32)}
    ad = adapters.randlora(4, max_in=9, max_out=9, alpha=8.0)
    a = tree.assign(params, [tree.Rule(where="up", then=ad),
                             tree.Rule(where="down", then=ad.with_dimension_numbers(
                                 tree.dims.stacked()))])
    state = adapters.init(a, getkey(), params)
    trainable = jax.tree.map(
        lambda v: jnp.asarray(rng.standard_normal(v.shape) * 0.1, v.dtype), state.trainable)
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)

    def model(p, x):
        hdn = jnp.tanh(x @ p["up"])
        hdn, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), hdn, p["down"])
        return hdn

    def loss_materialized(t):
        return jnp.sum(model(adapters.materialize(a, params, t, state.frozen), x))

    def loss_factored(t):
        return jnp.sum(factored.transform(model, a, t, state.frozen)(params, x))

    v1, g1 = jax.jit(jax.value_and_grad(loss_materialized))(trainable)
    v2, g2 = jax.jit(jax.value_and_grad(loss_factored))(trainable)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    h.assert_tree_allclose(g2, g1, rtol=1e-4, atol=1e-5)  # summed over many matmuls
