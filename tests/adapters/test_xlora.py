"""X-LoRA (``adapters.xlora_forward``/``XLoraHook``/``xlora_generate``): PEFT's
top-k and softmax-top-k, KV-cache generation with two caches equal to full
passes (PEFT generates without a cache), gradients reaching the classifier
only through the second pass. PEFT parity: tests/io/test_peft_xlora.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax import models as pm
from peftjax.adapters import _xlora
from tests.io import tuner_checks as tc


def test_topk_and_softmax_topk_as_peft():
    cfg = adapters.XLoraConfig(n_experts=4, sites=("mlp/up_proj",), n_layers=1,
                               hidden_size=4, top_k_lora=2, enable_softmax_topk=True)
    s = jnp.array([[[0.1, 0.5, 0.0, 0.3], [0.0, 0.0, 0.2, 0.0]]])
    got = np.asarray(_xlora._topk(s, cfg))
    e = np.exp([0.5, 0.3])
    np.testing.assert_allclose(got[0, 0], [0, e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-6)
    # a kept zero is excluded from the softmax (PEFT's nonzero mask)
    np.testing.assert_allclose(got[0, 1], [0, 0, 1, 0], atol=1e-7)
    z = np.asarray(_xlora._topk(jnp.zeros((1, 1, 4)), cfg))  # all zero: zeros, no NaN
    assert np.isfinite(z).all() and (z == 0).all()


def test_xlora_generation_equals_full_passes_and_gradients():
    gdef, params, _, _ = tc.load("llama", scanned=True)  # cached, shared
    m = pm.rebuild(gdef, params)
    cfg_m = m.config
    d, f, k, r = cfg_m.hidden_size, cfg_m.intermediate_size, 3, 2
    rng = np.random.default_rng(0)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    ex = adapters.XLoraExperts(
        {"self_attn/q_proj": arr(2, k, d, r), "mlp/up_proj": arr(2, k, d, r)},
        {"self_attn/q_proj": arr(2, k, r, d), "mlp/up_proj": arr(2, k, r, f)},
        {"self_attn/q_proj": jnp.array([1.0, 0.5, 2.0]),
         "mlp/up_proj": jnp.array([1.0, 0.0, 2.0])})
    cfg = adapters.XLoraConfig(n_experts=k, sites=("self_attn/q_proj", "mlp/up_proj"),
                               n_layers=2, hidden_size=d, xlora_depth=2, xlora_size=8,
                               layerwise_scalings=True, top_k_lora=2,
                               scaling_pass_value=0.3, softmax_temperature=0.5)
    clf = jax.tree.map(lambda x: arr(*x.shape) * 2,
                       jax.eval_shape(lambda: adapters.xlora_init(jax.random.key(1), cfg)))
    toks = jax.random.randint(jax.random.key(2), (2, 5), 0, cfg_m.vocab_size)
    got = adapters.xlora_generate(m, toks, clf, ex, cfg, max_new_tokens=3)
    seq = jnp.concatenate([toks, got], axis=1)

    def loss(c):
        logits, s = adapters.xlora_forward(gdef, params, seq, c, ex, cfg)
        return logits.sum(), (logits, s)

    (_, (logits, s)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(clf)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(jnp.argmax(logits, -1))[:, 4:7])
    assert s.shape == (2, 8, 4, 3) and float(s.std()) > 1e-3  # per-token routing
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g))
    with pytest.raises(ValueError, match="xlora_depth=0"):
        adapters.xlora_init(jax.random.key(0), cfg._replace(xlora_depth=0))
