"""The model hook (``peftjax.models.Hooks``): where it is called, what it may
change, and that KV-cache generation with a hook, a soft prompt or a prefix
equals repeated full forward passes."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import adapters
from peftjax import models as pm
from peftjax.models import bert, llama
from peftjax.models.llama import _tiny

LLAMA_NAMES = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
               "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]
BERT_NAMES = ["attention/query", "attention/key", "attention/value",
              "attention/output", "intermediate", "output"]


def _llama(scan=False, remat=False):
    cfg = _tiny.tiny_config(num_hidden_layers=2)
    return llama.LlamaForCausalLM(cfg, scan_layers=scan, remat=remat, rngs=nnx.Rngs(3))


def _tokens(b=2, t=6, v=None, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, v or 64)


@flax.struct.dataclass
class LoraHook(pm.Hooks):
    """A per-layer LoRA on one projection, as a hook: ``y + s·(x@A[l])@B[l]``."""

    a: jax.Array  # (L, in, r)
    b: jax.Array  # (L, r, out)
    name: str = flax.struct.field(pytree_node=False, default="mlp/up_proj")

    def linear(self, site, x, y):
        if site.name != self.name:
            return y
        return y + (x @ self.a[site.layer]) @ self.b[site.layer]


@flax.struct.dataclass
class FromSlot(pm.Hooks):
    """Adds ``c`` to down_proj's output at slots >= ``start[b]`` (aLoRA-like)."""

    start: jax.Array  # (B,)
    c: jax.Array  # (d,)

    def linear(self, site, x, y):
        if site.name != "mlp/down_proj":
            return y
        on = site.slots[None, :] >= self.start[:, None]
        return y + on[..., None].astype(y.dtype) * self.c[None, None, :]


class Recorder(pm.Hooks):
    def __init__(self):
        self.sites = []

    def linear(self, site, x, y):
        self.sites.append((site.name, x.shape[-1], y.shape[-1]))
        return y

    def attention(self, site, q, attn):
        self.sites.append((site.name, q.shape[-1], None))
        return None


def test_sites_llama_and_bert():
    m = _llama()
    rec = Recorder()
    jax.eval_shape(lambda x: m(x, hooks=rec), _tokens())
    names = [s[0] for s in rec.sites]
    assert names == (LLAMA_NAMES[:3] + ["self_attn"] + LLAMA_NAMES[3:]) * 2
    cfg = m.config
    assert rec.sites[0][1:] == (cfg.hidden_size, cfg.num_attention_heads * cfg.dim_head)
    bcfg = bert.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=16)
    rec = Recorder()
    bm = bert.BertModel(bcfg, rngs=nnx.Rngs(0))
    jax.eval_shape(lambda x: bm(x, hooks=rec), _tokens(v=32))
    assert [s[0] for s in rec.sites] == (BERT_NAMES[:3] + ["attention"]
                                         + BERT_NAMES[3:]) * 2


@pytest.mark.parametrize("scan,remat", [(False, False), (True, True)])
def test_lora_hook_equals_weight_space_lora(scan, remat):
    m = _llama(scan, remat)
    gdef, params = pm.split_params(m)
    cfg = m.config
    L, d, f, r = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, 3
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (L, d, r)) * 0.3
    b = jax.random.normal(kb, (L, r, f)) * 0.3
    hook = LoraHook(a, b)
    toks = _tokens()
    mask = jnp.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = jax.jit(lambda p, hk: pm.apply(gdef, p, toks, attention_mask=mask, hooks=hk))(
        params, hook)
    merged = jax.tree.map(lambda x: x, params)
    delta = jnp.einsum("lir,lro->lio", a, b)
    if scan:
        merged["layers"]["mlp"]["up_proj"]["kernel"] += delta
    else:
        for i in range(L):
            merged["layers"][i]["mlp"]["up_proj"]["kernel"] += delta[i]
    want = pm.apply(gdef, merged, toks, attention_mask=mask)
    base = pm.apply(gdef, params, toks, attention_mask=mask)
    assert float(jnp.max(jnp.abs(want - base))) > 1e-2  # the hook does something
    np.testing.assert_allclose(np.asarray(got)[mask == 1], np.asarray(want)[mask == 1],
                               atol=2e-5)
    # gradients reach the hook's arrays
    g = jax.grad(lambda hk: pm.apply(gdef, params, toks, hooks=hk).sum())(hook)
    assert float(jnp.abs(g.a).sum()) > 0


def test_bert_hook_equals_weight_space():
    cfg = bert.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=16)
    m = bert.BertForSequenceClassification(cfg, num_labels=3, rngs=nnx.Rngs(0))
    gdef, params = pm.split_params(m)
    a = jax.random.normal(jax.random.key(2), (2, 8, 2))
    b = jax.random.normal(jax.random.key(3), (2, 2, 8))
    toks = _tokens(v=32)
    got = pm.apply(gdef, params, toks, hooks=LoraHook(a, b, name="attention/value"))
    merged = jax.tree.map(lambda x: x, params)
    for i in range(2):
        merged["layers"][i]["attention"]["value"]["kernel"] += a[i] @ b[i]
    np.testing.assert_allclose(got, pm.apply(gdef, merged, toks), atol=2e-5)


def test_attention_hook_adds_before_output_projection():
    m = _llama()
    gdef, params = pm.split_params(m)
    cfg = m.config
    c = jax.random.normal(jax.random.key(4), (2, 6, cfg.num_attention_heads, cfg.dim_head))

    class Extra(pm.Hooks):
        def attention(self, site, q, attn):
            return c * (site.layer + 1).astype(c.dtype)

    class ViaOut(pm.Hooks):
        def linear(self, site, x, y):
            if site.name != "self_attn/o_proj":
                return y
            w = params["layers"][int(site.layer)]["self_attn"]["o_proj"]["kernel"]
            return y + (c * (site.layer + 1).astype(c.dtype)).reshape(x.shape) @ w

    toks = _tokens()
    np.testing.assert_allclose(pm.apply(gdef, params, toks, hooks=Extra()),
                               pm.apply(gdef, params, toks, hooks=ViaOut()), atol=2e-5)

    class Bad(pm.Hooks):
        def attention(self, site, q, attn):
            return q[..., :1]

    with pytest.raises(ValueError, match=r"hooks.attention returned shape"):
        m(toks, hooks=Bad())


def _greedy_full(m, toks, n, **kw):
    """Greedy decoding by repeated full forward passes (no cache).

    A causal model's logits at slot ``i`` read slots ``<= i`` only, so each
    pass runs one fixed-length buffer (the later slots hold 0) and every pass
    shares one compilation.
    """
    gdef, state = nnx.split(m)

    @jax.jit
    def next_token(state, buf, i, kw):
        logits = nnx.merge(gdef, state)(buf, **kw)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, 1, False), -1)

    t = toks.shape[1]
    buf = jnp.concatenate([toks, jnp.zeros((toks.shape[0], n), toks.dtype)], axis=1)
    for i in range(n):
        buf = buf.at[:, t + i].set(next_token(state, buf, t - 1 + i, kw))
    return np.asarray(buf[:, t:])


def test_generate_with_hooks_prompt_and_prefix_equals_full_passes():
    m = _llama(scan=True)
    cfg = m.config
    toks = _tokens(t=5, seed=7)
    L, d, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    a = jax.random.normal(jax.random.key(5), (L, d, 2)) * 2.0
    b = jax.random.normal(jax.random.key(6), (L, 2, f)) * 2.0
    slot = FromSlot(jnp.array([3, 6]), jax.random.normal(jax.random.key(8), (d,)) * 3)
    hook = pm.compose_hooks(LoraHook(a, b), slot)
    n = 4
    plain = np.asarray(llama.generate(m, toks, max_new_tokens=n))
    got = np.asarray(llama.generate(m, toks, max_new_tokens=n, hooks=hook))
    np.testing.assert_array_equal(got, _greedy_full(m, toks, n, hooks=hook))
    assert (got != plain).any()  # the hooks change the generation
    prompt = jax.random.normal(jax.random.key(9), (3, d)) * 2.0
    kv = (L, 2, cfg.num_key_value_heads, cfg.dim_head)
    pre = adapters.PrefixParams(jax.random.normal(jax.random.key(10), kv) * 2.0,
                                jax.random.normal(jax.random.key(11), kv) * 2.0)
    for kw in (dict(prefix=pre), dict(prompt_embeddings=prompt, prefix=pre, hooks=hook)):
        got = np.asarray(llama.generate(m, toks, max_new_tokens=n, **kw))
        np.testing.assert_array_equal(got, _greedy_full(m, toks, n, **kw))
    with pytest.raises(TypeError, match="not a JAX pytree"):
        llama.generate(m, toks, max_new_tokens=2, hooks=Recorder())
    with pytest.raises(TypeError, match="no method 'linear'"):
        m(toks, hooks=object())
