"""aLoRA (``adapters.alora_starts``, ``alora_hook``): PEFT's offsets, the hook
against weight-space LoRA before/after the start, both layouts, gradients,
KV-cache generation and errors. PEFT parity: tests/io/test_peft_alora.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from peftjax import models as pm
from peftjax.adapters._alora import NEVER
from peftjax.models import llama
from tests.io import tuner_checks as tc


def _peft_offsets_start(row, inv):
    """PEFT's ``calculate_alora_offsets`` for one row, as a start slot."""
    best = -1
    for i in range(len(row) - len(inv) + 1):
        if list(row[i:i + len(inv)]) == list(inv):
            best = i
    return NEVER if best < 0 else best


def test_alora_starts_match_peft():
    toks = np.asarray(jax.random.randint(jax.random.key(0), (16, 12), 0, 3))
    for inv in ([1], [1, 2], [2, 0, 1]):
        got = jax.jit(adapters.alora_starts, static_argnums=1)(toks, tuple(inv))
        assert got.tolist() == [_peft_offsets_start(r, inv) for r in toks]
    mask = np.ones_like(toks)
    mask[:, -2:] = 0  # occurrences touching a masked slot do not count
    got = adapters.alora_starts(toks, [1, 2], mask)
    assert got.tolist() == [_peft_offsets_start(r[:-2], [1, 2]) for r in toks]
    assert adapters.alora_starts(toks[:, :1], [1, 2]).tolist() == [NEVER] * 16
    with pytest.raises(ValueError, match="tokens must be"):
        adapters.alora_starts(toks[0], [1])
    with pytest.raises(ValueError, match="empty"):
        adapters.alora_starts(toks, [])


@pytest.fixture(scope="module")
def tiny():
    g, params, _, _ = tc.load("llama", scanned=True)  # the shared tiny Llama
    m = pm.rebuild(g, params)
    rules = [tree.Rule(where="layers/(self_attn/v_proj|mlp/down_proj)/kernel",
                       then=adapters.lora(2, alpha=4.0))]
    a = tree.assign(params, rules)
    st = adapters.init(a, jax.random.key(1), params)
    t = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape) * 0.5,
                     st.trainable)
    return m, g, params, a, adapters.AdapterState(t, st.frozen)


def test_hook_is_lora_from_the_start_on(tiny):
    m, g, params, a, st = tiny
    toks = jax.random.randint(jax.random.key(3), (3, 7), 0, 64)
    start = jnp.array([0, 4, NEVER])
    hook = adapters.alora_hook(a, st.trainable, start, num_layers=2)

    @jax.jit
    def run(hook, st):
        return (pm.apply(g, params, toks, hooks=hook),
                pm.apply(g, adapters.materialize(a, params, *st), toks),
                pm.apply(g, params, toks))

    got, lora, base = map(np.asarray, run(hook, st))
    np.testing.assert_allclose(got[0], lora[0], atol=2e-5)  # from slot 0: LoRA
    np.testing.assert_allclose(got[1, :4], base[1, :4], atol=2e-5)  # causal: base before
    assert np.abs(got[1, 4:] - base[1, 4:]).min() > 1e-4
    assert np.abs(got[1, 4:] - lora[1, 4:]).max() > 1e-3  # the prefix' keys stay base
    np.testing.assert_allclose(got[2], base[2], atol=2e-5)  # no invocation: base
    # the unrolled layout of the same state gives the same hook
    ua = {p.replace("layers/", f"layers/{i}/"): ad for p, ad in a.items() for i in range(2)}
    ut = {p.replace("layers/", f"layers/{i}/"): adapters.LoRAParams(t.a[i], t.b[i])
          for p, t in st.trainable.items() for i in range(2)}
    uhook = adapters.alora_hook(ua, ut, start, num_layers=2)
    jax.tree.map(np.testing.assert_array_equal, uhook, hook)
    # a layer the adapter leaves out has scale 0
    one = {k: v for k, v in ua.items() if k.startswith("layers/1/")}
    h1 = adapters.alora_hook(one, ut, start, num_layers=2)
    assert h1.scale["mlp/down_proj"].tolist() == [0.0, 2.0]
    # gradients reach the LoRA factors (none when no row is adapted)
    def loss(t, s):
        return pm.apply(g, params, toks, hooks=adapters.alora_hook(a, t, s, num_layers=2)
                        ).sum()
    grad = jax.jit(jax.grad(loss))
    gr = grad(st.trainable, start)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(gr))
    gr = grad(st.trainable, jnp.full((3,), NEVER))
    assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(gr))
    # KV-cache generation equals repeated full passes with the same hook
    gen = np.asarray(llama.generate(m, toks, max_new_tokens=3, hooks=hook))
    full = jnp.concatenate([toks, jnp.asarray(gen)], axis=1)
    logits = jax.jit(lambda h: pm.apply(g, params, full, hooks=h))(hook)
    # teacher forcing: each generated token is the argmax of the full pass
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[:, 6:9]), -1), gen)


def test_alora_hook_errors(tiny):
    _, _, params, a, st = tiny
    s = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="inside 'layers'"):
        adapters.alora_hook({"lm_head/kernel": None}, {}, s, num_layers=2)
    p = next(iter(a))
    with pytest.raises(ValueError, match="plain LoRA"):
        adapters.alora_hook({p: a[p]}, {p: adapters.DoRAParams(*st.trainable[p], None)},
                            s, num_layers=2)
    with pytest.raises(ValueError, match=r"expected \(3, in, r\)"):
        adapters.alora_hook(a, st.trainable, s, num_layers=3)
    with pytest.raises(ValueError, match="outside num_layers"):
        adapters.alora_hook({"layers/5/mlp/up_proj/kernel": a[p]},
                            {"layers/5/mlp/up_proj/kernel": adapters.LoRAParams(
                                st.trainable[p].a[0], st.trainable[p].b[0])},
                            s, num_layers=2)
