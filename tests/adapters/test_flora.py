"""FLoRA (peftjax.adapters.flora): the authors' layers (golden) on a linear kernel,
an HWIO conv kernel (factored conv path and merge) and a head-split attention
kernel; init, counts, stacked layers, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, tree
from tests import helpers as h

G = np.load("tests/adapters/golden/flora/flora.npz")


def ref_flora(w, t, f, s):
    """float64 ``W + s·F0 G F1ᵀ`` for a 2-mode (matrix) leaf."""
    return h.f64(w) + s * h.f64(t.factors[0]) @ h.f64(t.core) @ h.f64(t.factors[1]).T


def _params(case, order):
    """Their ``param_G``/``param_i`` (modes ``[in, out, spatial...]``) in our mode order."""
    core = jnp.asarray(G[f"{case}/G"].transpose(order))
    return adapters.FLoRAParams(core, tuple(jnp.asarray(G[f"{case}/P{i}"]) for i in order))


def test_flora_matches_authors_layers():
    with jax.enable_x64(True):
        # Linear: (in, out) modes, their layer's forward.
        ad = adapters.flora((3, 2), scale=1.5, param_dtype=jnp.float64)
        t = _params("linear", (0, 1))
        w, b = jnp.asarray(G["linear/weight"].T), G["linear/bias"]
        got = np.asarray(ad.apply(w, t, None)) - np.asarray(w)
        np.testing.assert_allclose(got, G["linear/delta"].T, atol=1e-12)
        x = jnp.asarray(G["linear/x"])
        y = np.asarray(x @ w + ad.factored.terms(w, t, None).delta(x)) + b
        np.testing.assert_allclose(y, G["linear/y"], atol=1e-12)
        # Head-split attention kernel (embed, heads, head_dim): three modes.
        ad = adapters.flora((3, 2, 3), scale=2.0, param_dtype=jnp.float64,
                            dimension_numbers=tree.dims.head_split())
        t = _params("heads", (0, 1, 2))
        wq = jnp.zeros((8, 2, 4), jnp.float64)
        want = G["heads/delta"].transpose(1, 0, 2)  # undo their transpose(0, 1)
        np.testing.assert_allclose(np.asarray(ad.apply(wq, t, None)), want, atol=1e-12)
        xq = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)))
        yq = np.asarray(ad.factored.terms(wq.reshape(8, 8), t, None).delta(xq))
        np.testing.assert_allclose(yq, np.asarray(xq) @ want.reshape(8, 8), atol=1e-12)
        assert ad.num_trainable(wq) == 3 * 2 * 3 + 8 * 3 + 2 * 2 + 4 * 3


def test_flora_conv_kernel_factored_and_merged_match_authors_conv2d():
    """HWIO kernel, stride 2 and padding 1: their Conv2D forward vs both paths."""
    ad = adapters.flora((2, 2, 3, 4), scale=4.0, dimension_numbers=tree.dims.conv())
    t = _params("conv", (2, 3, 0, 1))  # their [in, out, kh, kw] -> our (kh, kw, in, out)
    t = jax.tree.map(lambda a: a.astype(jnp.float32), t)
    conv = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    params = {"params": {"kernel": jnp.asarray(G["conv/weight"].transpose(2, 3, 1, 0),
                                               jnp.float32),
                         "bias": jnp.asarray(G["conv/bias"], jnp.float32)}}
    a = tree.assign(params, [tree.Rule(where=".*kernel", then=ad)])
    tr, fr = {"params/kernel": t}, {"params/kernel": None}
    x = jnp.asarray(np.moveaxis(G["conv/x"], 1, -1), jnp.float32)  # NCHW -> NHWC
    want = np.moveaxis(G["conv/y"], 1, -1)
    fac = jax.jit(factored.transform(conv.apply, a, tr, fr))(params, x)
    merged = conv.apply(adapters.fold(a, params, tr, fr), x)
    for got in (fac, merged):
        np.testing.assert_allclose(h.f64(got), want, rtol=1e-4, atol=1e-4)
    delta = h.f64(adapters.materialize(a, params, tr, fr)["params"]["kernel"]) - h.f64(
        params["params"]["kernel"])
    np.testing.assert_allclose(delta, G["conv/delta"].transpose(2, 3, 1, 0), atol=1e-5)


def test_flora_init_counts_and_errors(getkey):
    ad = adapters.flora(4, dimension_numbers=tree.dims.conv())
    t, f = ad.init(getkey(), jnp.ones((3, 3, 16, 32)))
    assert f is None and t.core.shape == (3, 3, 4, 4)  # spatial ranks capped at 3
    np.testing.assert_array_equal(np.asarray(t.core), 0)  # W' = W at init
    assert 0.2 < float(jnp.std(t.factors[3])) < 0.5  # N(0, 1/(2·4)): std 0.354
    # SmolLM2 q,k,v,o at rank 8: Π r + Σ d·r per matrix.
    sizes = [(576, 576), (576, 192), (576, 192), (576, 576)]
    assert sum(adapters.flora(8).num_trainable(jnp.zeros(s)) for s in sizes) == 30976
    st = adapters.flora(2).with_dimension_numbers(tree.dims.stacked())
    ts, _ = jax.eval_shape(st.init, jax.random.key(0), jnp.zeros((3, 6, 5)))
    assert ts.core.shape == (3, 2, 2) and ts.factors[1].shape == (3, 5, 2)
    with pytest.raises(ValueError, match=r"3 ranks for a leaf of shape \(6, 5\)"):
        adapters.flora((2, 2, 2)).init(getkey(), jnp.ones((6, 5)))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        adapters.flora((2, 0))
