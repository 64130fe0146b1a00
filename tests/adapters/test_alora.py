"""aLoRA (``adapters.alora_starts``, ``alora_hook``): PEFT's offsets, the hook
against weight-space LoRA before/after the start, both layouts, gradients and
errors. PEFT parity and KV-cache generation: tests/io/test_peft_alora.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from peftjax import models as pm
from peftjax.adapters._alora import NEVER
from tests import helpers as h


def _peft_offsets_start(row, inv):
    """PEFT's ``calculate_alora_offsets`` for one row, as a start slot."""
    best = -1
    for i in range(len(row) - len(inv) + 1):
        if list(row[i:i + len(inv)]) == list(inv):
            best = i
    return NEVER if best < 0 else best


def test_alora_starts_match_peft():
    toks = np.random.default_rng(0).integers(0, 3, (16, 12))
    starts = jax.jit(adapters.alora_starts)  # traced ids: one compile per length
    for inv in ([1], [2, 0, 1], [1, 2]):
        got = starts(toks, jnp.array(inv))
        assert got.tolist() == [_peft_offsets_start(r, inv) for r in toks]
    mask = np.ones_like(toks)
    mask[:, -2:] = 0  # occurrences touching a masked slot do not count
    got = starts(toks, jnp.array([1, 2]), mask)
    assert got.tolist() == [_peft_offsets_start(r[:-2], [1, 2]) for r in toks]
    assert adapters.alora_starts(toks[:, :1], [1, 2]).tolist() == [NEVER] * 16
    with pytest.raises(ValueError, match="tokens must be"):
        adapters.alora_starts(toks[0], [1])
    with pytest.raises(ValueError, match="empty"):
        adapters.alora_starts(toks, [])


@pytest.fixture(scope="module")
def tiny():
    params = {"layers": {"self_attn": {"v_proj": {"kernel": jnp.zeros((2, 16, 8))}},
                         "mlp": {"down_proj": {"kernel": jnp.zeros((2, 32, 16))}}}}
    rules = [tree.Rule(where="layers/(self_attn/v_proj|mlp/down_proj)/kernel",
                       then=adapters.lora(2, alpha=4.0))]
    a = tree.assign(params, rules)
    rng = np.random.default_rng(2)  # NumPy draws: no per-shape compiles
    t = {p: adapters.LoRAParams(
        *(jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
          for s in ((2, w.shape[1], 2), (2, 2, w.shape[2]))))
        for p, w in tree.leaves_by_path(params).items()}
    return params, a, adapters.AdapterState(t, {p: None for p in t})


def test_hook_is_lora_from_the_start_on(tiny):
    params, a, st = tiny
    start = jnp.array([0, 3, NEVER])
    hook = adapters.alora_hook(a, st.trainable, start, num_layers=2)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    t = st.trainable["layers/mlp/down_proj/kernel"]
    run = jax.jit(lambda h, layer, slots: h.linear(pm.Site(layer, "mlp/down_proj", slots),
                                                   x, y))
    for layer, first in ((0, 0), (1, 4)):  # slots of a prefill and of a later chunk
        slots = first + jnp.arange(5)
        got = np.asarray(run(hook, jnp.int32(layer), slots), np.float64)
        delta = 2.0 * h.f64(x) @ h.f64(t.a[layer]) @ h.f64(t.b[layer])  # s = alpha/r
        on = (np.asarray(slots)[None, :] >= np.asarray(start)[:, None])[..., None]
        np.testing.assert_allclose(got, h.f64(y) + on * delta, rtol=1e-5, atol=1e-5)
    site = pm.Site(jnp.int32(0), "self_attn/q_proj", jnp.arange(5))
    assert hook.linear(site, x, y) is y  # not adapted
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
    # gradients reach the LoRA factors only through adapted slots
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    site = pm.Site(jnp.int32(1), "self_attn/v_proj", jnp.arange(5))

    def loss(t, s):
        hk = adapters.alora_hook(a, t, s, num_layers=2)
        return hk.linear(site, x, jnp.zeros((3, 5, 8))).sum()

    grad = jax.jit(jax.grad(loss))
    gr = grad(st.trainable, jnp.array([0, 3, NEVER]))
    assert float(jnp.abs(gr["layers/self_attn/v_proj/kernel"].a[1]).sum()) > 0
    assert float(jnp.abs(gr["layers/self_attn/v_proj/kernel"].a[0]).sum()) == 0
    gr = grad(st.trainable, jnp.full((3,), NEVER))
    assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(gr))


def test_alora_hook_errors(tiny):
    params, a, st = tiny
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
