"""VB-LoRA (adapters.vblora): PEFT's formula in float64, top-k files, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def _admix64(logits, bank, k):
    """PEFT's ``_get_low_rank_matrix`` in float64: top-k softmax over bank rows."""
    logits, bank = h.f64(logits), h.f64(bank)
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logits, idx, axis=-1)
    wts = np.exp(top - top.max(-1, keepdims=True))
    wts = wts / wts.sum(-1, keepdims=True)
    return (wts[..., None] * bank[idx]).sum(-2)


def ref_vblora(w, t, f, *, topk=2):
    """``W + (B @ A)ᵀ`` from PEFT-layout logits (torch ``A (r, in)``, ``B (out, r)``)."""
    del f
    r = t.logits_a.shape[0]
    a_t = _admix64(t.logits_a, t.bank, topk).reshape(r, -1)                    # (r, in)
    b_t = _admix64(t.logits_b, t.bank, topk).transpose(0, 2, 1).reshape(-1, r)  # (out, r)
    return h.f64(w) + (b_t @ a_t).T


def vblora_count(n_in, n_out, *, rank, num_vectors, vector_length):
    """Logits of one matrix plus its (private, ``unshare``) bank."""
    return (rank * (n_in + n_out) // vector_length * num_vectors
            + num_vectors * vector_length)


def test_weight_space_and_factored_match_peft_formula(getkey):
    ad = adapters.unshare(adapters.vblora(3, num_vectors=7, vector_length=4, topk=3))
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 12)) * 0.5, jnp.float32)
    t, f = ad.init(getkey(), w)
    # PEFT's init: bank U(+-0.02), logits N(0, 0.1^2); not the identity.
    assert t.logits_a.shape == (3, 2, 7) and t.logits_b.shape == (3, 3, 7)
    assert float(jnp.abs(t.bank).max()) <= 0.02
    assert 0.05 < float(jnp.std(jnp.concatenate([t.logits_a.ravel(), t.logits_b.ravel()]))) < 0.2
    t = t._replace(bank=jnp.asarray(np.random.default_rng(1).standard_normal((7, 4)),
                                    jnp.float32))
    want = ref_vblora(w, t, f, topk=3)
    assert np.abs(want - h.f64(w)).max() > 1e-2
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 8)), jnp.float32)
    got = h.f64(x @ w) + h.f64(ad.factored.terms(w, t, f).delta(x))
    np.testing.assert_allclose(got, h.f64(x) @ want, **h.MATMUL_F32)


def test_topk_only_logits_as_peft_loads_them(getkey):
    """save_only_topk_weights files give -inf logits outside the top k: same delta."""
    ad = adapters.unshare(adapters.vblora(2, num_vectors=6, vector_length=2))
    w = jnp.zeros((4, 2), jnp.float32)
    t, f = ad.init(getkey(), w)
    top, idx = jax.lax.top_k(t.logits_a, 2)
    sparse = jnp.full_like(t.logits_a, -jnp.inf)
    sparse = jnp.put_along_axis(sparse, idx, top, axis=-1, inplace=False)
    np.testing.assert_allclose(h.f64(ad.apply(w, t._replace(logits_a=sparse), f)),
                               h.f64(ad.apply(w, t, f)), **h.MATMUL_F32)


def test_peft_trainable_count_on_two_matrices():
    """PEFT counts logits of every module plus the bank once."""
    params = {"q": jnp.zeros((8, 8)), "v": jnp.zeros((8, 4))}
    ad = adapters.vblora(2, num_vectors=5, vector_length=4)
    a = tree.assign(params, [tree.Rule(where="q|v", then=ad)])
    s = adapters.init(a, jax.random.key(0), params)
    assert adapters.num_trainable(s.trainable) == 2 * (8 + 8) // 4 * 5 + 2 * (
        8 + 4) // 4 * 5 + 5 * 4
    assert ad.num_trainable(params["q"]) == 2 * (8 + 8) // 4 * 5  # the leaf's own


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="topk=3 exceeds num_vectors=2"):
        adapters.vblora(2, num_vectors=2, topk=3)
    with pytest.raises(ValueError, match="vector_length must be a positive int"):
        adapters.vblora(2, vector_length=0)
    with pytest.raises(ValueError, match="bank must be a non-empty name"):
        adapters.vblora(2, bank="@shared")
    params = {"w": jnp.zeros((6, 4))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.vblora(2, vector_length=4))])
    with pytest.raises(ValueError, match=r"'w' \(shape \(6, 4\).*input size 6 .*"
                                         r"multiple of vector_length=4"):
        adapters.init(a, jax.random.key(0), params)
