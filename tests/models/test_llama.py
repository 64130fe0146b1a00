"""Tiny random Llama-family models: reference parity, causality, padding, GQA,
tied heads, scan vs unrolled (outputs and gradients), remat, RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import models as pm
from peftjax import tree
from peftjax.models import llama
from peftjax.models.llama import _rope
from tests.helpers import EXACT, GRAD_F32, MATMUL_F32, f64
from tests.models import _reference


def make_config(**kw):
    base = dict(vocab_size=48, hidden_size=32, intermediate_size=40, rope_theta=500.0,
                tie_word_embeddings=False)
    return llama.tiny_config(**{**base, **kw})


def make(cfg, *, seed=0, scan_layers=False, remat=False):
    """Returns ``(graphdef, params)`` with numpy-random parameters (no eager init).

    Norm scales are 1 + noise and biases are noise, so the reference check
    covers them too.
    """
    model = nnx.eval_shape(
        lambda: llama.LlamaForCausalLM(
            cfg, scan_layers=scan_layers, remat=remat, rngs=nnx.Rngs(0)
        )
    )
    g, abstract = pm.split_params(model)
    rng = np.random.default_rng(seed)

    def init(path, x):
        noise = rng.standard_normal(x.shape)
        if path.endswith("scale"):
            noise = 1.0 + 0.1 * noise
        elif path.endswith("bias"):
            noise = 0.1 * noise
        else:
            noise = noise / np.sqrt(x.shape[-2])
        return jnp.asarray(noise, x.dtype)

    return g, tree.map_with_path(init, abstract)


def fwd(g, p, ids, mask=None):
    return _jit_apply(g, p, ids, mask)


def _jit_apply(g, p, ids, mask):
    return jax.jit(lambda p, ids, mask: pm.apply(g, p, ids, attention_mask=mask))(
        p, ids, mask
    )


def close(got, want):
    """MATMUL_F32, with atol scaled by max|want|: float32 summation-order noise
    (padded vs unpadded reductions) scales with the logits' magnitude."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(
        f64(got),
        want,
        rtol=MATMUL_F32["rtol"],
        atol=MATMUL_F32["rtol"] * np.abs(want).max(),
    )


def tokens(cfg, b=2, t=7, seed=0):
    return jnp.asarray(
        np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32
    )


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # 1, heads/2, heads
def test_gqa_matches_float64_reference(kv_heads):
    cfg = make_config(num_key_value_heads=kv_heads)
    g, p = make(cfg)
    ids = tokens(cfg)
    got = fwd(g, p, ids)
    np.testing.assert_allclose(
        f64(got), _reference.llama_logits(p, cfg, ids), **MATMUL_F32
    )


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_head(tied):
    cfg = make_config(tie_word_embeddings=tied, attention_bias=True)
    g, p = make(cfg)
    assert ("lm_head" in p) is (not tied)
    assert "bias" in p["layers"][0]["self_attn"]["q_proj"]
    assert "bias" not in p["layers"][0]["self_attn"]["o_proj"]
    ids = tokens(cfg)
    np.testing.assert_allclose(
        f64(fwd(g, p, ids)), _reference.llama_logits(p, cfg, ids), **MATMUL_F32
    )
    if tied:  # the head really is the embedding: changing it changes logits
        p2 = jax.tree.map(lambda x: x, p)
        p2["embed_tokens"]["embedding"] = p["embed_tokens"]["embedding"].at[5].add(1.0)
        ids0 = jnp.zeros((1, 3), jnp.int32)
        d = fwd(g, p2, ids0) - fwd(g, p, ids0)
        assert float(jnp.abs(d[..., 5]).min()) > 0
        assert float(jnp.abs(d[..., 6]).max()) == 0.0


def test_causality():
    cfg = make_config()
    g, p = make(cfg)
    ids = tokens(cfg, t=9)
    changed = ids.at[:, 5:].set((ids[:, 5:] + 1) % cfg.vocab_size)
    a, b = fwd(g, p, ids), fwd(g, p, changed)
    np.testing.assert_allclose(f64(a[:, :5]), f64(b[:, :5]), **EXACT)
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(side):
    cfg = make_config()
    g, p = make(cfg)
    ids = tokens(cfg, b=1, t=6)
    alone = fwd(g, p, ids)[0]
    pad = jnp.full((1, 3), 7, jnp.int32)
    if side == "left":
        padded, mask, sl = (
            jnp.concatenate([pad, ids], 1),
            [0] * 3 + [1] * 6,
            slice(3, 9),
        )
    else:
        padded, mask, sl = (
            jnp.concatenate([ids, pad], 1),
            [1] * 6 + [0] * 3,
            slice(0, 6),
        )
    batch = jnp.concatenate([padded, tokens(cfg, b=1, t=9, seed=3)], 0)
    masks = jnp.asarray([mask, [1] * 9], jnp.int32)
    got = fwd(g, p, batch, masks)[0, sl]
    close(got, f64(alone))
    ref = _reference.llama_logits(p, cfg, batch, masks)
    close(fwd(g, p, batch, masks)[1], ref[1])


def test_scan_equals_unrolled_outputs_and_grads():
    cfg = make_config(num_hidden_layers=2, hidden_size=16, intermediate_size=24)
    g, p = make(cfg)
    ps = tree.stack_layers(p)
    ids = tokens(cfg)

    def loss(g, params):
        logits = pm.apply(g, params, ids[:, :-1])
        lp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

    gu = jax.jit(jax.grad(lambda q: loss(g, q)))(p)
    for remat in (False, True):
        gs, _ = make(cfg, scan_layers=True, remat=remat)
        np.testing.assert_allclose(
            f64(fwd(gs, ps, ids)), f64(fwd(g, p, ids)), **MATMUL_F32
        )
        jaxpr = str(jax.make_jaxpr(lambda q, gs=gs: loss(gs, q))(ps))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) is remat
        gsc = jax.jit(jax.grad(lambda q, gs=gs: loss(gs, q)))(ps)
        assert tree.paths(tree.unstack_layers(gsc)) == tree.paths(gu)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **GRAD_F32),
            tree.unstack_layers(gsc),
            gu,
        )


def test_scanned_paths_documented():
    cfg = make_config(tie_word_embeddings=False)
    _, p = make(cfg, scan_layers=True)
    shapes = pm.param_shapes(None, p)
    assert shapes["layers/self_attn/q_proj/kernel"][0] == (2, 32, 32)
    assert shapes["layers/self_attn/k_proj/kernel"][0] == (2, 32, 16)
    assert shapes["layers/mlp/down_proj/kernel"][0] == (2, 40, 32)
    assert shapes["layers/input_layernorm/scale"][0] == (2, 32)
    assert shapes["lm_head/kernel"][0] == (32, 48)
    assert shapes["embed_tokens/embedding"][0] == (48, 32)


def test_sliding_window_limits_attention():
    cfg = make_config(sliding_window=3)
    g, p = make(cfg)
    ids = tokens(cfg, t=8)
    a = fwd(g, p, ids)
    b = fwd(g, p, ids.at[:, 0].set((ids[:, 0] + 1) % cfg.vocab_size))
    # With 2 layers the receptive field is 2 * (window - 1) = 4 tokens back.
    np.testing.assert_allclose(f64(a[:, 5:]), f64(b[:, 5:]), **EXACT)
    assert float(jnp.abs(a[:, 1:5] - b[:, 1:5]).max()) > 1e-4


def test_rope_scaling_frequencies():
    base = make_config(hidden_size=64, num_attention_heads=2, rope_theta=10000.0)
    inv0 = np.asarray(_rope.inv_frequencies(base), np.float64)
    want = 1.0 / 10000.0 ** (np.arange(0, 32, 2) / 32)
    np.testing.assert_allclose(inv0, want, rtol=1e-6)
    lin = make_config(
        hidden_size=64,
        num_attention_heads=2,
        rope_theta=10000.0,
        rope_scaling=llama.RopeScaling(rope_type="linear", factor=4.0),
    )
    np.testing.assert_allclose(_rope.inv_frequencies(lin), inv0 / 4, rtol=1e-6)
    l3 = llama.RopeScaling(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    inv3 = np.asarray(
        _rope.inv_frequencies(
            make_config(
                hidden_size=64,
                num_attention_heads=2,
                rope_theta=10000.0,
                rope_scaling=l3,
            )
        )
    )
    wavelen = 2 * np.pi / inv0
    high = wavelen < 64 / 4  # short wavelengths: unchanged
    low = wavelen > 64 / 1  # long wavelengths: divided by the factor
    assert high.any() and low.any()
    np.testing.assert_allclose(inv3[high], inv0[high], rtol=1e-6)
    np.testing.assert_allclose(inv3[low], inv0[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert np.all((inv3[mid] < inv0[mid]) & (inv3[mid] > inv0[mid] / 8))


def test_unknown_rope_scaling_and_bad_config():
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        llama.RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="must divide"):
        make_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        llama.LlamaConfig.from_hf({"model_type": "gpt2"})


def test_bf16_compute_close_to_f32():
    cfg = make_config()
    g, p = make(cfg)
    gb = nnx.graphdef(
        nnx.eval_shape(
            lambda: llama.LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        )
    )
    ids = tokens(cfg)
    a = fwd(g, p, ids)
    b = fwd(gb, p, ids)
    assert b.dtype == jnp.float32
    # bf16 activations through 2 layers: a few bf16 ulps of the logit scale.
    np.testing.assert_allclose(f64(b), f64(a), rtol=0, atol=0.05)


def test_hf_configs_of_the_family():
    common = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    qwen = llama.LlamaConfig.from_hf(
        {
            **common,
            "model_type": "qwen2",
            "sliding_window": 64,
            "use_sliding_window": False,
        }
    )
    assert qwen.attention_bias and qwen.sliding_window is None
    mistral = llama.LlamaConfig.from_hf(
        {**common, "model_type": "mistral", "sliding_window": 64}
    )
    assert mistral.sliding_window == 64 and not mistral.attention_bias
    l3 = llama.LlamaConfig.from_hf(
        {
            **common,
            "model_type": "llama",
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert l3.rope_theta == 5e5 and l3.rope_scaling.rope_type == "llama3"
    for c in (qwen, mistral, l3):
        assert llama.LlamaConfig.from_hf(c.to_hf()) == c
