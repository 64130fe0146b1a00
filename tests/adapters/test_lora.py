"""LoRA specifics: scaling numbers, PEFT inits, Einsum kernels, Equinox."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import adapters, tree
from tests import helpers as h


def test_scaling_numbers_are_pinned():
    sv = adapters.scaling_value
    assert sv(adapters.Scaling.ALPHA_OVER_RANK, 16.0, 8) == 2.0
    assert sv(adapters.Scaling.ALPHA_OVER_SQRT_RANK, 16.0, 16) == 4.0
    assert sv(adapters.Scaling.NONE, 16.0, 8) == 1.0
    with pytest.raises(TypeError, match="Scaling member"):
        sv("alpha/r", 16.0, 8)


def test_peft_default_init_distribution(getkey):
    n_in = 400
    t, _ = adapters.lora(rank=16).init(getkey(), jnp.zeros((n_in, 300)))
    a = h.f64(t.a)
    bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) on fan_in
    assert a.max() <= bound and a.min() >= -bound
    # Uniform(-b, b) has std b/sqrt(3); 6400 samples: 3% is > 4 sigma.
    assert abs(a.std() - bound / math.sqrt(3)) < 0.03 * bound
    np.testing.assert_array_equal(h.f64(t.b), 0.0)


def test_gaussian_and_embedding_inits(getkey):
    t, _ = adapters.lora(rank=4, init=adapters.LoRAInit.GAUSSIAN).init(
        getkey(), jnp.zeros((500, 40)))
    assert abs(h.f64(t.a).std() - 0.25) < 0.01  # N(0, 1/r^2), 2000 samples
    np.testing.assert_array_equal(h.f64(t.b), 0.0)
    t, _ = adapters.lora(rank=4, init=adapters.LoRAInit.EMBEDDING).init(
        getkey(), jnp.zeros((50, 500)))
    np.testing.assert_array_equal(h.f64(t.a), 0.0)
    assert abs(h.f64(t.b).std() - 1.0) < 0.05


def test_nnx_einsum_kernel_equals_reshaped_lora(getkey):
    """LoRA on an nnx.Einsum (embed, heads, head_dim) kernel equals LoRA on its
    (embed, heads*head_dim) reshape."""
    layer = nnx.Einsum("bte,ehd->bthd", (6, 2, 3), rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    dims = tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    a3 = tree.assign(state, [tree.Rule(where="kernel",
                                       then=adapters.lora(2, dimension_numbers=dims))])
    s3 = adapters.init(a3, getkey(), state)
    s3 = s3._replace(trainable=jax.tree.map(lambda x: x + 0.3, s3.trainable))
    k = nnx.to_pure_dict(state)["kernel"]
    flat = {"kernel": k.reshape(6, 6)}
    a2 = tree.assign(flat, [tree.Rule(where="kernel", then=adapters.lora(2))])
    m2 = adapters.materialize(a2, flat, s3.trainable, s3.frozen)
    m3 = adapters.materialize(a3, state, *s3)
    np.testing.assert_array_equal(
        np.asarray(nnx.to_pure_dict(m3)["kernel"]).reshape(6, 6),
        np.asarray(m2["kernel"]))
    # And the merged layer computes x @ W' through the einsum.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 6)), jnp.float32)
    graphdef, _ = nnx.split(layer)
    y = nnx.merge(graphdef, m3)(x)
    want = h.f64(x) @ h.f64(m2["kernel"])
    np.testing.assert_allclose(h.f64(y).reshape(1, 4, 6), want, **h.MATMUL_F32)


def test_equinox_linear_out_in(getkey):
    lin = eqx.nn.Linear(5, 4, key=jax.random.key(0))  # weight (out=4, in=5)
    dims = tree.DimensionNumbers(reduction_axis=1, output_axis=0)
    a = tree.assign(lin, [tree.Rule(where="weight",
                                    then=adapters.lora(2, alpha=2.0,
                                                       dimension_numbers=dims))])
    st = adapters.init(a, getkey(), lin)
    t = st.trainable["weight"]
    assert t.a.shape == (5, 2) and t.b.shape == (2, 4)
    t = t._replace(b=t.b + 0.5)
    merged = adapters.materialize(a, lin, {"weight": t}, st.frozen)
    assert isinstance(merged, eqx.nn.Linear)
    want = h.f64(lin.weight) + (h.f64(t.a) @ h.f64(t.b)).T
    np.testing.assert_allclose(h.f64(merged.weight), want, **h.MATMUL_F32)
    x = jnp.ones((5,), jnp.float32)
    np.testing.assert_allclose(h.f64(merged(x)),
                               want @ np.ones(5) + h.f64(lin.bias), **h.MATMUL_F32)


def test_dropout_only_on_factored_path(getkey):
    p = {"w": jnp.ones((4, 4))}
    a = tree.assign(p, [tree.Rule(where="w", then=adapters.lora(2, dropout=0.1))])
    st = adapters.init(a, getkey(), p)
    with pytest.raises(ValueError, match="deterministic=True"):
        adapters.materialize(a, p, *st)
    out = adapters.materialize(a, p, *st, deterministic=True)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(p["w"]))
    adapters.fold(a, p, *st)  # merging is evaluation: no dropout
    with pytest.raises(ValueError, match="dropout"):
        adapters.lora(2, dropout=1.0)


def test_lora_xs_basis_is_truncated_svd(getkey):
    w = jnp.asarray(np.random.default_rng(3).standard_normal((7, 5)), jnp.float32)
    t, f = adapters.lora_xs(rank=3).init(getkey(), w)
    a, b = h.f64(f.a), h.f64(f.b)
    np.testing.assert_allclose(a.T @ a, np.eye(3), **h.MATMUL_F32)
    u, s, vt = np.linalg.svd(h.f64(w), full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :3] * s[:3]) @ vt[:3], **h.MATMUL_F32)
    assert np.abs(h.f64(t.core)).max() < 1e-4  # N(0, 1e-5^2) as the reference


def test_ssf_init_statistics_and_bias_fold(getkey):
    p = {"l": {"kernel": jnp.ones((10, 400)), "bias": jnp.ones(400)}}
    a = tree.assign(p, [tree.Rule(where="l/kernel", then=adapters.ssf())])
    st = adapters.init(a, getkey(), p)
    t = st.trainable["l/kernel"]
    assert abs(h.f64(t.scale).mean() - 1.0) < 0.005
    assert abs(h.f64(t.scale).std() - 0.02) < 0.003
    assert abs(h.f64(t.shift).std() - 0.02) < 0.003
    m = adapters.materialize(a, p, *st)
    np.testing.assert_allclose(h.f64(m["l"]["bias"]), h.ref_ssf_bias(p["l"]["bias"], t),
                               **h.ELEMENTWISE_F32)


def test_ia3_output_scales_bias_input_does_not(getkey):
    p = {"k": {"kernel": jnp.ones((3, 2)), "bias": jnp.full((2,), 2.0)}}
    cases = (
        (adapters.Side.OUTPUT, [0.5, 2.0], [1.0, 4.0], [[0.5, 2.0]] * 3),
        (adapters.Side.INPUT, [0.5, 1.0, 2.0], [2.0, 2.0],
         [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]),
    )
    for side, scale, want_bias, want_kernel in cases:
        a = tree.assign(p, [tree.Rule(where="k/kernel", then=adapters.ia3(side))])
        st = adapters.init(a, getkey(), p)
        t = {"k/kernel": adapters.ScaleParams(jnp.asarray(scale, jnp.float32))}
        m = adapters.materialize(a, p, t, st.frozen)
        np.testing.assert_array_equal(np.asarray(m["k"]["bias"]), want_bias)
        np.testing.assert_array_equal(np.asarray(m["k"]["kernel"]), want_kernel)


def test_check_rank_is_the_one_rank_check_of_adapters_and_inits():
    assert adapters.check_rank(np.int64(3), "x") == 3
    assert type(adapters.check_rank(np.uint8(3), "x")) is int
    for bad in (True, 2.0, None, "2"):
        with pytest.raises(TypeError, match=r"^x: rank must be a positive int"):
            adapters.check_rank(bad, "x")
    with pytest.raises(ValueError, match=r"^x: rank must be > 0, got rank=-1"):
        adapters.check_rank(-1, "x")
    # The data-driven initialisers reject a bad rank with the same check.
    from peftjax import inits
    with pytest.raises(ValueError, match=r"^pissa: rank must be > 0, got rank=0"):
        inits.pissa(0)
    with pytest.raises(TypeError, match=r"^olora: rank must be a positive int"):
        inits.olora(1.5)
