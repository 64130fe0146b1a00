"""Adaption prompts (``adapters.adaption_prompt``, ``AdaptionPromptHook``):
PEFT's formula in float64, zero-gate identity, gradients, top-layer selection
and KV-cache generation. PEFT parity: tests/io/test_peft_adaption_prompt.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax import models as pm
from peftjax.models import llama
from tests.io import tuner_checks as tc


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
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, 5, 4, 3))
    wk, wv = (jax.random.normal(k, (6, 2 * 3)) for k in ks[1:3])
    p = adapters.adaption_prompt(ks[3], hidden_size=6, adapter_len=3, adapter_layers=2)
    p = p._replace(gate=jnp.array([0.7, -1.3]))
    hook = adapters.AdaptionPromptHook(p, num_layers=3)
    attn = _Attn(wk, wv)
    for layer in range(3):
        site = pm.Site(jnp.int32(layer), "self_attn", jnp.arange(5))
        got = hook.attention(site, q, attn)
        if layer == 0:  # below the top two: nothing
            np.testing.assert_array_equal(got, 0)
            continue
        want = _peft_reference(q, p.prompt[layer - 1], wk, wv, float(p.gate[layer - 1]))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert hook.linear(site, None, q) is q
    with pytest.raises(ValueError, match="positive int"):
        adapters.adaption_prompt(ks[3], hidden_size=6, adapter_len=0, adapter_layers=1)
    with pytest.raises(ValueError, match="num_layers=1"):
        adapters.AdaptionPromptHook(p, num_layers=1).attention(site, q, attn)


def test_zero_gate_gradients_and_generation():
    g, params, _, _ = tc.load("llama", scanned=True)
    toks = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    p = adapters.adaption_prompt(jax.random.key(2), hidden_size=16, adapter_len=2,
                                 adapter_layers=2)

    def loss(p):
        return pm.apply(g, params, toks, hooks=adapters.AdaptionPromptHook(
            p, num_layers=2))[..., :8].sum()

    vg = jax.jit(jax.value_and_grad(loss))
    val, gr = vg(p)
    zero = adapters.AdaptionPromptParams(p.prompt * 0, p.gate)  # gate 0: no prompt matters
    np.testing.assert_allclose(val, vg(zero)[0], rtol=1e-6)
    # zero-init attention: only the gates move first (paper §3.2)
    assert float(jnp.abs(gr.gate).min()) > 0 and float(jnp.abs(gr.prompt).max()) == 0
    hook = adapters.AdaptionPromptHook(p._replace(gate=jnp.array([0.8, -1.5])), num_layers=2)
    gen = np.asarray(llama.generate(pm.rebuild(g, params), toks, max_new_tokens=3,
                                    hooks=hook))
    full = jnp.concatenate([toks, jnp.asarray(gen)], axis=1)
    logits = jax.jit(lambda h: pm.apply(g, params, full, hooks=h))(hook)
    # KV-cache generation = full passes (teacher forcing on the generated tokens)
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, 5:8]), -1), gen)
