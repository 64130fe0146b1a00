"""KV-cache decoding and generation on tiny random Llama models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import EXACT, f64
from tests.models.test_llama import close, make, make_config


def model_of(cfg, *, scan_layers=False, seed=0):
    g, p = make(cfg, scan_layers=scan_layers, seed=seed)
    return pm.rebuild(g, p)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cache_decoding_equals_full_recompute(scan_layers):
    cfg = make_config(num_key_value_heads=1)
    model = model_of(cfg, scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    # Row 0 has a 2-token left padding in its 5-token prompt.
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], jnp.int32)
    full = jax.jit(lambda ids, m: model(ids, attention_mask=m))(ids, mask)
    step = jax.jit(lambda t, c, m: model.decode(t, c, attention_mask=m))
    cache = model.init_cache(2, 12)
    prefill, cache = step(ids[:, :5], cache, mask[:, :5])
    close(prefill[0, 2:], f64(full[0, 2:5]))
    close(prefill[1], f64(full[1, :5]))
    for t in range(5, 9):
        logits, cache = step(ids[:, t : t + 1], cache, mask[:, t : t + 1])
        close(logits[:, 0], f64(full[:, t]))
    assert int(cache.index) == 9
    np.testing.assert_array_equal(np.asarray(cache.next_position), [7, 9])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_generate_equals_full_recompute_loop(scan_layers):
    cfg = make_config()
    model = model_of(cfg, scan_layers=scan_layers, seed=3)
    prompt = jnp.asarray([[0, 3, 5, 7], [2, 4, 6, 8]], jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32)
    out = llama.generate(model, prompt, prompt_mask=mask, max_new_tokens=6)
    # Full recompute with one compile: a right-padded buffer; by causality the
    # logits at the last real position ignore the padding after it.
    fwd = jax.jit(lambda ids, m: model(ids, attention_mask=m))
    seq = jnp.concatenate([prompt, jnp.zeros((2, 6), jnp.int32)], 1)
    m = jnp.concatenate([mask, jnp.zeros((2, 6), jnp.int32)], 1)
    want = []
    for t in range(4, 10):
        nxt = jnp.argmax(fwd(seq, m)[:, t - 1], -1).astype(jnp.int32)
        want.append(nxt)
        seq, m = seq.at[:, t].set(nxt), m.at[:, t].set(1)
    np.testing.assert_array_equal(np.asarray(out), np.stack(want, 1))


def test_eos_sticks():
    cfg = make_config()
    model = model_of(cfg, seed=1)
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    free = np.asarray(llama.generate(model, prompt, max_new_tokens=6))[0]
    eos = int(free[2])
    out = np.asarray(llama.generate(model, prompt, max_new_tokens=6, eos_id=eos))[0]
    first = list(out).index(eos)
    np.testing.assert_array_equal(out[:first], free[:first])
    assert (out[first:] == eos).all()


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    greedy = llama.sample_logits(logits, None)
    assert set(np.asarray(greedy).tolist()) == {0}
    one = llama.Sampling(temperature=1.0, top_k=1)
    np.testing.assert_array_equal(
        np.asarray(llama.sample_logits(logits, key, one)), np.asarray(greedy)
    )
    s = np.asarray(llama.sample_logits(logits, key, llama.Sampling(temperature=1.0)))
    freq = np.bincount(s, minlength=4) / len(s)
    # 4000 draws: binomial standard error <= 0.008; 4 sigma.
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.032)
    k2 = np.asarray(
        llama.sample_logits(logits, key, llama.Sampling(temperature=1.0, top_k=2))
    )
    assert set(k2.tolist()) == {0, 1}
    assert abs((k2 == 0).mean() - 0.5 / 0.8) < 0.032
    # top_p=0.7: {0.5, 0.3} reaches 0.8 >= 0.7, the 0.15 token is cut.
    p7 = np.asarray(
        llama.sample_logits(logits, key, llama.Sampling(temperature=1.0, top_p=0.7))
    )
    assert set(p7.tolist()) == {0, 1}
    p5 = np.asarray(
        llama.sample_logits(logits, key, llama.Sampling(temperature=1.0, top_p=0.5))
    )
    assert set(p5.tolist()) == {0}
    cold = np.asarray(
        llama.sample_logits(logits, key, llama.Sampling(temperature=0.05))
    )
    assert (cold == 0).mean() > 0.99


def test_sampled_generation_is_reproducible_and_valid():
    cfg = make_config()
    model = model_of(cfg, seed=2)
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    rule = llama.Sampling(temperature=0.8, top_k=5, top_p=0.9)
    a = llama.generate(
        model, prompt, max_new_tokens=5, sampling=rule, key=jax.random.key(7)
    )
    b = llama.generate(
        model, prompt, max_new_tokens=5, sampling=rule, key=jax.random.key(7)
    )
    np.testing.assert_allclose(f64(a), f64(b), **EXACT)
    assert int(a.min()) >= 0 and int(a.max()) < cfg.vocab_size


def test_generation_errors():
    cfg = make_config()
    model = model_of(cfg)
    prompt = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        llama.generate(model, prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="cache_len=5"):
        llama.generate(model, prompt, max_new_tokens=4, cache_len=5)
    with pytest.raises(ValueError, match="top_p"):
        llama.sample_logits(
            jnp.zeros((1, 3)),
            jax.random.key(0),
            llama.Sampling(temperature=1.0, top_p=1.5),
        )
    with pytest.raises(ValueError, match="PRNG key"):
        llama.sample_logits(jnp.zeros((1, 3)), None, llama.Sampling(temperature=1.0))
