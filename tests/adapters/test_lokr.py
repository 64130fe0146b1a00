"""LoKr (peftjax.adapters.lokr): PEFT's factorisation, the Kronecker formula in
float64 from the torch-layout tensors, the factored (Kronecker-trick) form, inits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_lokr(w, t, f, *, s):
    """float64 ``W + s·kron(W1, W2)ᵀ`` built in torch layout from PEFT's tensors.

    Each peftjax factor is its PEFT tensor transposed: ``lokr_w1 = w1ᵀ``,
    ``lokr_w1_a = w1_aᵀ``, ``lokr_w1_b = w1_bᵀ`` (same for ``w2``), and PEFT
    forms ``ΔW_torch = s·kron(w1_t, w2_t)`` with ``w1_t = lokr_w1_a @ lokr_w1_b``.
    """
    def torch_factor(full, a, b):
        if full is not None:
            return h.f64(full).T
        return h.f64(a).T @ h.f64(b).T  # (out, r) @ (r, in)
    w1_t = torch_factor(t.w1, t.w1_a, t.w1_b)
    w2_t = torch_factor(t.w2, t.w2_a, t.w2_b)
    return h.f64(w) + s * np.kron(w1_t, w2_t).T


def lokr_count(n_in, n_out, r, decompose_both=False, factor=-1):
    """PEFT's LoKr trainable count for a Linear(n_in, n_out) (its update_layer rules)."""
    in_m, in_n = adapters.lokr_factorization(n_in, factor)
    out_l, out_k = adapters.lokr_factorization(n_out, factor)
    c1 = (r * (in_m + out_l) if decompose_both and r < max(out_l, in_m) / 2
          else in_m * out_l)
    c2 = r * (in_n + out_k) if r < max(out_k, in_n) / 2 else in_n * out_k
    return c1 + c2


def _w(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.5,
                       jnp.float32)


def _perturb(t, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.3, x.dtype), t)


# Values printed by PEFT 0.21.2's peft.tuners.lokr.layer.factorization.
@pytest.mark.parametrize("dim,factor,want", [
    (128, 64, (64, 2)), (96, -1, (8, 12)), (576, -1, (24, 24)), (12, 5, (3, 4)),
    (192, 8, (8, 24)), (1536, 16, (16, 96)), (7, -1, (1, 7)), (128, -1, (8, 16)),
])
def test_factorization_matches_peft(dim, factor, want):
    assert adapters.lokr_factorization(dim, factor) == want


# (n_in, n_out, kwargs, which factors are full): every structure PEFT builds.
CASES = [
    (12, 8, dict(rank=4), {"w1", "w2"}),
    (12, 8, dict(rank=1), {"w1", "w2_a", "w2_b"}),
    (64, 48, dict(rank=2, decompose_both=True, decompose_factor=16),
     {"w1_a", "w1_b", "w2"}),
    (64, 48, dict(rank=1, decompose_both=True), {"w1_a", "w1_b", "w2_a", "w2_b"}),
]


@pytest.mark.parametrize("n_in,n_out,kw,fields", CASES)
def test_structure_count_formula_and_factored_form(n_in, n_out, kw, fields, getkey):
    ad = adapters.lokr(alpha=3.0, **kw)
    w = _w((n_in, n_out))
    t, f = ad.init(getkey(), w)
    assert {k for k, v in t._asdict().items() if v is not None} == fields
    n = sum(x.size for x in jax.tree.leaves(t))
    assert n == ad.num_trainable(w) == lokr_count(
        n_in, n_out, kw["rank"], kw.get("decompose_both", False),
        kw.get("decompose_factor", -1))
    # identity at init (PEFT's default zeroes W1)
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    t = _perturb(t)
    want = ref_lokr(w, t, f, s=3.0 / kw["rank"])
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    # exact unfold of the additive delta
    np.testing.assert_allclose(h.f64(ad.unapply(ad.apply(w, t, f), t, f, None)),
                               h.f64(w), atol=1e-5)
    # factored (Kronecker trick) == weight space, with two batch axes on x
    x = _w((2, 3, n_in), seed=5)
    y = h.f64(x @ w) + h.f64(ad.factored.terms(w, t, f).delta(x))
    np.testing.assert_allclose(y, h.f64(x) @ want, rtol=1e-5, atol=1e-5)


def test_float64_formula_and_factored_form_in_float64(getkey):
    with jax.enable_x64(True):
        ad = adapters.lokr(rank=1, alpha=2.0, decompose_both=True,
                           param_dtype=jnp.float64)
        w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)))
        t, f = ad.init(getkey(), w)
        t = _perturb(t)
        want = ref_lokr(w, t, f, s=2.0)
        np.testing.assert_allclose(np.asarray(ad.apply(w, t, f)), want, rtol=1e-12,
                                   atol=1e-12)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)))
        y = np.asarray(x @ w + ad.factored.terms(w, t, f).delta(x))
        np.testing.assert_allclose(y, np.asarray(x) @ want, rtol=1e-12, atol=1e-12)


def test_lycoris_init_zeroes_w2_and_kaiming_bounds(getkey):
    w = _w((12, 8))
    t, f = adapters.lokr(rank=1, init=adapters.LoKrInit.LYCORIS).init(getkey(), w)
    assert not np.any(np.asarray(t.w2_b)) and np.any(np.asarray(t.w2_a))
    # PEFT default: w1 = 0, w2_b ~ U(±1/sqrt(in_n)) (torch fan-in of lokr_w2_b (r, in_n))
    t, _ = adapters.lokr(rank=1).init(getkey(), w)
    assert not np.any(np.asarray(t.w1))
    in_n = t.w2_b.shape[0]
    assert float(jnp.abs(t.w2_b).max()) <= 1 / np.sqrt(in_n)


def test_stacked_layers_are_independent(getkey):
    ad = adapters.lokr(rank=1, dimension_numbers=tree.dims.stacked())
    w = _w((3, 12, 8))
    t, f = ad.init(getkey(), w)
    assert t.w2_a.shape[0] == 3 and ad.num_trainable(w) == 3 * lokr_count(12, 8, 1)
    t = _perturb(t)
    got = ad.apply(w, t, f)
    for i in range(3):
        ti = jax.tree.map(lambda x, i=i: x[i], t)
        np.testing.assert_allclose(h.f64(got[i]), ref_lokr(w[i], ti, None, s=8.0),
                                   **h.MATMUL_F32)


@pytest.mark.parametrize("kw,match", [
    (dict(rank_dropout=0.1), "rank_dropout=0.1 is not supported"),
    (dict(module_dropout=0.2), "module_dropout=0.2 is not supported"),
    (dict(decompose_factor=0), "decompose_factor must be -1 or a positive int"),
    (dict(rank=0), "rank must be > 0"),
])
def test_rejects_unsupported_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        adapters.lokr(**kw)
