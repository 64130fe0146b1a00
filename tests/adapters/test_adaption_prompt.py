"""Adaption prompts (``adapters.adaption_prompt``, ``AdaptionPromptHook``):
PEFT's formula in float64, zero-gate identity, gradients and top-layer
selection. PEFT parity and KV-cache generation:
tests/io/test_peft_adaption_prompt.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax import models as pm


def _peft_reference(q, prompt, wk, wv, gate):
    """PEFT's ``AdaptedAttention`` extra output (before o_proj), float64."""
    q, prompt, wk, wv = (np.asarray(x, np.float64) for x in (q, prompt, wk, wv))
    b, t, h, d = q.shape
    kv = wk.shape[1] // d
    k = np.repeat((prompt @ wk).reshape(-1, kv, d), h // kv, axis=1)  # repeat_interleave
    v = np.repeat((prompt @ wv).reshape(-1, kv, d), h // kv, axis=1)
    s = np.einsum("bthd,shd->bhts", q, k) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = gate * p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,shd->bthd", p, v)


class _Attn:
    def __init__(self, wk, wv):
        self.k_proj, self.v_proj = (lambda x: x @ wk), (lambda x: x @ wv)


def test_hook_matches_peft_formula_and_selects_top_layers():
    rng = np.random.default_rng(0)  # NumPy draws: no per-shape compiles
    q, wk, wv = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((2, 5, 4, 3), (6, 6), (6, 6)))
    p = adapters.adaption_prompt(jax.random.key(3), hidden_size=6, adapter_len=3,
                                 adapter_layers=2)
    p = p._replace(gate=jnp.array([0.7, -1.3]))
    hook = adapters.AdaptionPromptHook(p, num_layers=3)
    attn = _Attn(wk, wv)
    run = jax.jit(lambda layer: hook.attention(pm.Site(layer, "self_attn", jnp.arange(5)),
                                               q, attn))  # one compile, layer traced
    site = pm.Site(jnp.int32(0), "self_attn", jnp.arange(5))
    for layer in range(3):
        got = run(jnp.int32(layer))
        if layer == 0:  # below the top two: nothing
            np.testing.assert_array_equal(got, 0)
            continue
        want = _peft_reference(q, p.prompt[layer - 1], wk, wv, float(p.gate[layer - 1]))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert hook.linear(site, None, q) is q
    with pytest.raises(ValueError, match="positive int"):
        adapters.adaption_prompt(jax.random.key(3), hidden_size=6, adapter_len=0,
                                 adapter_layers=1)
    with pytest.raises(ValueError, match="num_layers=1"):
        adapters.AdaptionPromptHook(p, num_layers=1).attention(site, q, attn)


def test_zero_gate_identity_and_gradients():
    rng = np.random.default_rng(1)
    q, wk, wv, prompt = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                         for s in ((2, 4, 4, 3), (6, 6), (6, 6), (1, 2, 6)))
    attn = _Attn(wk, wv)
    p = adapters.AdaptionPromptParams(prompt, jnp.zeros((1,)))  # PEFT's zero gate
    site = pm.Site(jnp.int32(1), "self_attn", jnp.arange(4))

    def extra(p):
        return adapters.AdaptionPromptHook(p, num_layers=2).attention(site, q, attn)

    vg = jax.jit(jax.value_and_grad(lambda p: jnp.abs(extra(p)).sum()))
    val, gr = vg(p)
    assert float(val) == 0  # zero gate: the model is unchanged
    # zero-init attention: only the gates move first (paper §3.2)
    assert float(jnp.abs(gr.gate).min()) > 0 and float(jnp.abs(gr.prompt).max()) == 0
    val, gr = vg(p._replace(gate=jnp.array([0.5])))
    assert float(val) > 0 and float(jnp.abs(gr.prompt).max()) > 0
