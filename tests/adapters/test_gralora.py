"""GraLoRA (adapters.gralora): PEFT's numbers, a float64 block reference, the
factored form, init, stacked layers and shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def ref_gralora(w, t, f, *, s):
    """float64 ``W + s·ΔW`` assembled block by block in torch layout.

    Torch block (output ``j``, input ``n``) is ``B[j]ᵀ[:, n-th rank slice] @
    A[n]ᵀ[j-th rank slice, :]`` (PEFT's ``gralora_A (k, in/k, r)``,
    ``gralora_B (k, r, out/k)``); the hybrid pair adds ``(a_h @ b_h)ᵀ``.
    """
    a, b = h.f64(t.a), h.f64(t.b)
    k, in_k, r = a.shape
    out_k, rs = b.shape[-1], r // k
    delta = np.zeros((k * out_k, k * in_k))  # torch (out, in)
    for j in range(k):
        for n in range(k):
            bt = b[j, n * rs:(n + 1) * rs, :].T  # (out/k, r/k)
            at = a[n, :, j * rs:(j + 1) * rs].T  # (r/k, in/k)
            delta[j * out_k:(j + 1) * out_k, n * in_k:(n + 1) * in_k] = bt @ at
    if t.a_hybrid is not None:
        delta += (h.f64(t.a_hybrid) @ h.f64(t.b_hybrid)).T
    return h.f64(w) + s * delta.T


def _det(shape, phase):
    """The deterministic tensors of the PEFT run below (torch shapes)."""
    n = int(np.prod(shape))
    return np.sin(np.arange(n) * 0.7 + phase).reshape(shape) * 0.5


# PEFT 0.21.2 GraloraLayer(nn.Linear(4, 6)), r=2, alpha=6, gralora_k=2, hybrid_r=1,
# float64: gralora_A = _det((2, 2, 2), 1), gralora_B = _det((2, 2, 3), 2),
# gralora_A_general.weight = _det((1, 4), 3), gralora_B_general.weight = _det((6, 1), 4);
# get_delta_weight() (out, in) and forward(x = _det((1, 3, 4), 5)) with W = _det((6, 4), .3).
PEFT_DELTA = [
    [0.329173713498, 0.507589122767, 0.610422065721, 0.711784792609],
    [0.10925929527, 0.409237426599, 0.780520111111, 0.902904947297],
    [-0.162041476747, 0.118414974191, 0.583527352282, 0.669374796992],
    [-0.054051805483, 0.046530682936, -0.354276960978, -0.084326137642],
    [0.321673819703, -0.118873601279, -0.436528760525, -0.305769439998],
    [0.54611122119, -0.228369773361, -0.313474263047, -0.383404596943]]
PEFT_FORWARD = [
    [-0.037280164799, 0.094294897594, 0.574891453733, -0.397603110325, 0.166922121452,
     -0.799116219409],
    [0.491937939126, 0.033187312073, -0.218647485056, 0.21921876726, -0.235636832189,
     0.683836424788],
    [-0.889749668135, -0.156834551317, -0.162862363431, -0.015502529688, 0.277122453694,
     -0.489535694187]]


def test_gralora_matches_peft_numbers_in_float64():
    with jax.enable_x64(True):
        ad = adapters.gralora(2, alpha=6.0, gralora_k=2, hybrid_r=1,
                              param_dtype=jnp.float64)
        t = adapters.GraLoRAParams(
            a=jnp.asarray(_det((2, 2, 2), 1.0)), b=jnp.asarray(_det((2, 2, 3), 2.0)),
            a_hybrid=jnp.asarray(_det((1, 4), 3.0).T),
            b_hybrid=jnp.asarray(_det((6, 1), 4.0).T))
        w = jnp.asarray(_det((6, 4), 0.3).T)  # Flax (in, out)
        got = ad.apply(w, t, None)
        np.testing.assert_allclose(h.f64(got) - h.f64(w), np.array(PEFT_DELTA).T,
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(h.f64(got), ref_gralora(w, t, None, s=2.0),
                                   rtol=0, atol=1e-12)
        x = jnp.asarray(_det((1, 3, 4), 5.0))
        y = x @ w + ad.factored.terms(w, t, None).delta(x)  # factored: no ΔW formed
        np.testing.assert_allclose(h.f64(y), np.array([PEFT_FORWARD]), rtol=0, atol=1e-10)
        back = ad.unapply(got, t, None, None)
        np.testing.assert_allclose(h.f64(back), h.f64(w), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,hybrid", [(3, 0), (2, 2)])
def test_block_grid_and_factored_match_reference(k, hybrid, getkey):
    ad = adapters.gralora(6, alpha=4.0, gralora_k=k, hybrid_r=hybrid, init_weights=False)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((12, 6)) * 0.5, jnp.float32)
    t, f = ad.init(getkey(), w)
    want = ref_gralora(w, t, f, s=4.0 / (6 + hybrid))
    assert np.abs(want - h.f64(w)).max() > 0.1  # init_weights=False: not the identity
    np.testing.assert_allclose(h.f64(ad.apply(w, t, f)), want, **h.MATMUL_F32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 12)), jnp.float32)
    y = h.f64(x @ w) + h.f64(ad.factored.terms(w, t, f).delta(x))
    np.testing.assert_allclose(y, h.f64(x) @ want, **h.MATMUL_F32)
    # k² independent blocks of rank r/k: the update's rank is up to k·r (here full).
    assert np.linalg.matrix_rank(want - h.f64(w)) == min(6, k * 6)


def test_gralora_init_is_peft_default(getkey):
    # PEFT init_weights=True: A kaiming-uniform(a=sqrt(5)) with torch fan-in in/k
    # (hybrid A: in), every B zero; the trainable count is (r + hybrid_r)(in + out).
    n_in, n_out, r, k = 64, 32, 8, 4
    ad = adapters.gralora(r, gralora_k=k, hybrid_r=2)
    w = jnp.ones((n_in, n_out))
    t, f = ad.init(getkey(), w)
    assert f is None and t.a.shape == (k, n_in // k, r) and t.b.shape == (k, r, n_out // k)
    assert not np.any(h.f64(t.b)) and not np.any(h.f64(t.b_hybrid))
    for leaf, bound in ((t.a, 1 / np.sqrt(n_in // k)), (t.a_hybrid, 1 / np.sqrt(n_in))):
        x = np.abs(h.f64(leaf)).max()
        assert 0.8 * bound < x <= bound
    assert ad.num_trainable(w) == (r + 2) * (n_in + n_out)
    assert adapters.gralora(r, gralora_k=k).init(getkey(), w)[0].a_hybrid is None


def test_gralora_stacked_layers_get_independent_blocks(getkey):
    params = {"w": jnp.ones((2, 4, 6))}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.gralora(2))],
                    layout=tree.stacked("w"))
    t = adapters.init(a, getkey(), params).trainable["w"]
    assert t.a.shape == (2, 2, 2, 2) and t.b.shape == (2, 2, 2, 3)
    assert not np.allclose(h.f64(t.a[0]), h.f64(t.a[1]))


def test_gralora_bad_arguments_and_shapes(getkey):
    with pytest.raises(ValueError, match="rank must be divisible by gralora_k"):
        adapters.gralora(3, gralora_k=2)
    with pytest.raises(ValueError, match="hybrid_r must be an int >= 0"):
        adapters.gralora(2, hybrid_r=-1)
    with pytest.raises(ValueError, match="gralora_k must be an int >= 1"):
        adapters.gralora(2, gralora_k=0)
    with pytest.raises(ValueError, match=r"\(in=6, out=5\).*float32.*gralora_k=2"):
        adapters.gralora(2).init(getkey(), jnp.ones((6, 5)))
