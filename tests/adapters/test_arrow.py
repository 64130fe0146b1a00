"""Arrow (``adapters.ArrowHook``): PEFT's routing (|x·v|, top-k, softmax with
temperature) against a NumPy reference, GenKnowSub, torch's randn start vector,
KV-cache generation equal to full passes. PEFT parity: tests/io/test_peft_arrow.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters
from peftjax import models as pm
from peftjax.adapters import _arrow
from peftjax.models import Site, llama
from tests.io import tuner_checks as tc


def _loras(n, d, f, seed, L=2, r=2):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = {"mlp/up_proj": jnp.asarray(rng.standard_normal((L, d, r)), jnp.float32)}
        b = {"mlp/up_proj": jnp.asarray(rng.standard_normal((L, r, f)), jnp.float32)}
        out.append((a, b, {"mlp/up_proj": 1.0 + i}))
    return out


def test_routing_matches_reference_and_gks():
    task, gen = _loras(3, 16, 8, 0, L=1), _loras(2, 16, 8, 1, L=1)
    cfg = adapters.ArrowConfig(top_k=2, router_temperature=0.5, use_gks=True)
    ex = adapters.arrow_experts(task, gen, cfg)
    x = np.random.default_rng(2).standard_normal((1, 3, 16)).astype(np.float32)
    got = adapters.ArrowHook(ex, cfg).linear(
        Site(jnp.int32(0), "mlp/up_proj", jnp.arange(3)), jnp.asarray(x), jnp.zeros((1, 3, 8)))
    ga = np.mean([np.asarray(g[0]["mlp/up_proj"][0], np.float64) for g in gen], 0)
    gb = np.mean([np.asarray(g[1]["mlp/up_proj"][0], np.float64) for g in gen], 0)
    want = np.zeros((3, 8))
    for t in range(3):
        ws, ds = [], []
        for a, b, s in task:
            a_ = np.asarray(a["mlp/up_proj"][0], np.float64) - ga
            b_ = np.asarray(b["mlp/up_proj"][0], np.float64) - gb
            v = np.linalg.svd(a_ @ b_)[0][:, 0]
            ws.append(abs(x[0, t] @ v))
            ds.append(s["mlp/up_proj"] * (x[0, t] @ a_ @ b_))
        ws = np.array(ws)
        keep = ws >= np.sort(ws)[-2]
        c = np.where(keep, np.exp((ws - ws.max()) / 0.5), 0.0)
        want[t] = (c / c.sum()) @ np.array(ds)
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=2e-4, atol=2e-4)


def test_generation_equals_full_passes():
    gdef, params, _, _ = tc.load("llama", scanned=True)  # cached, shared
    m = pm.rebuild(gdef, params)
    cfg_m = m.config
    ex = adapters.arrow_experts(_loras(3, cfg_m.hidden_size, cfg_m.intermediate_size, 4),
                                config=adapters.ArrowConfig(top_k=2, rng_seed=0))
    hook = adapters.ArrowHook(ex, adapters.ArrowConfig(top_k=2))
    toks = jax.random.randint(jax.random.key(2), (2, 5), 0, cfg_m.vocab_size)
    got = llama.generate(m, toks, max_new_tokens=3, hooks=hook)
    full = jax.jit(lambda h, t: pm.apply(gdef, params, t, hooks=h))(
        hook, jnp.concatenate([toks, got], axis=1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(full, -1))[:, 4:7])
    with pytest.raises(ValueError, match="adapts"):
        bad = _loras(2, cfg_m.hidden_size, cfg_m.intermediate_size, 5)
        bad[1] = ({"mlp/down_proj": bad[1][0]["mlp/up_proj"]}, bad[1][1], bad[1][2])
        adapters.arrow_experts(bad)
    with pytest.raises(ValueError, match="n=8"):
        _arrow.torch_randn(8, 0)
