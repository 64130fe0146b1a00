"""DePT: a short soft prompt plus a low-rank, position-wise input-embedding offset.

The reference is the authors' forward (github.com/ZhengxiangShi/DePT),
restated in torch by ``scripts/golden/dept_make.py`` and run through Hugging
Face's Llama on the committed tiny base (``tests/adapters/golden/dept``).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters
from peftjax import models as pm
from tests import helpers as h
from tests.io.tuner_checks import load

GOLDEN = pathlib.Path(__file__).parent / "golden" / "dept" / "dept.npz"


def _forward(g, params, p, ids, alpha=8.0):
    """The recipe: the whole input as a soft prompt over zero tokens."""
    emb = params["embed_tokens"]["embedding"][ids]
    h0 = adapters.dept_embeddings(p, emb, alpha=alpha)
    return pm.apply(g, params, ids[:, :0], prompt_embeddings=h0, keep_prompt_logits=True)


_jit_forward = jax.jit(_forward, static_argnums=(0, 4))  # one compile per shape


def test_authors_forward_on_the_tiny_llama():
    ref = np.load(GOLDEN)
    g, params, _, _ = load("llama")
    ids = jnp.asarray(ref["ids"])
    p = adapters.DePTParams(prompt=jnp.asarray(ref["prompt"]), a=jnp.asarray(ref["a"]),
                            b=jnp.asarray(ref["b"]))
    h0 = adapters.dept_embeddings(p, params["embed_tokens"]["embedding"][ids],
                                  alpha=float(ref["alpha"]))
    np.testing.assert_allclose(np.asarray(h0), ref["h0"], atol=1e-6)
    assert float(ref["alpha"]) == 8.0
    logits = _jit_forward(g, params, p, ids, 8.0)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4)
    # the offset moves the logits far beyond the bar
    off = _jit_forward(g, params, p._replace(b=jnp.zeros_like(p.b)), ids, 8.0)
    assert np.abs(np.asarray(off) - ref["logits"]).max() > 1e-1
    # the authors' kaiming-uniform bound for A (s, r): 1/sqrt(r)
    assert float(ref["kaiming_bound"]) == pytest.approx(1 / np.sqrt(ref["a"].shape[1]))


def test_identity_at_init_is_prompt_tuning_and_a_float64_transcription():
    _, params, _, _ = load("llama")
    table = params["embed_tokens"]["embedding"]
    p = adapters.dept(jax.random.key(0), 3, table, rank=2, max_length=8)
    ids = jnp.asarray(np.load(GOLDEN)["ids"])
    # B = 0: the input is prompt tuning's, [P_s ; E] exactly (the golden test
    # checks that the Llama reads it as HF's inputs_embeds).
    h0 = jax.jit(adapters.dept_embeddings)(p, table[ids])
    np.testing.assert_array_equal(h0[:, 3:], table[ids])
    np.testing.assert_array_equal(h0[:, :3], jnp.broadcast_to(p.prompt, (2, 3, 16)))
    # the init: A ~ U(-1/sqrt(r), 1/sqrt(r)) (the authors' kaiming-uniform), B = 0
    assert 0.5 / np.sqrt(2) < float(jnp.abs(p.a).max()) <= 1 / np.sqrt(2)
    assert not np.any(np.asarray(p.b))
    # float64: h0 = [P_s ; E + alpha/sqrt(r) A[:T] B] for T = 6 < s = 10, unbatched,
    # and bfloat16 inputs
    rng = np.random.default_rng(1)
    p = p._replace(a=jnp.asarray(rng.standard_normal((10, 2)), jnp.float32),
                   b=jnp.asarray(rng.standard_normal((2, 16)), jnp.float32))
    emb = np.asarray(table, np.float64)[np.asarray(ids[0, :6])]
    a, b = np.asarray(p.a, np.float64), np.asarray(p.b, np.float64)
    ref = np.concatenate([np.asarray(p.prompt, np.float64),
                          emb + 3.0 / np.sqrt(2) * a[:6] @ b])
    got, bf = jax.jit(lambda p, x: (adapters.dept_embeddings(p, x[0], alpha=3.0),
                                    adapters.dept_embeddings(p, x.astype(jnp.bfloat16))))(
        p, table[ids[:, :6]])
    np.testing.assert_allclose(h.f64(got), ref, **h.MATMUL_F32)
    assert bf.dtype == jnp.bfloat16 and bf.shape == (2, 9, 16)


def test_counts_and_bad_inputs():
    _, params, _, _ = load("llama")
    table = params["embed_tokens"]["embedding"]
    p = adapters.dept(jax.random.key(0), 3, table, rank=2, max_length=8)
    assert sum(x.size for x in jax.tree.leaves(p)) == 3 * 16 + 2 * (8 + 16)
    p = p._replace(a=p.a[:5])
    # the paper's budget: m = 40, r = 45 at s = 256 is prompt tuning's l = 100 on T5-Base
    assert 40 * 768 + 45 * (256 + 768) == 100 * 768
    with pytest.raises(ValueError, match=r"T <= max_length 5, got shape \(2, 6, 16\)"):
        adapters.dept_embeddings(p, jnp.zeros((2, 6, 16)))
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        adapters.dept_embeddings(p, jnp.zeros((2, 4, 8)))
    with pytest.raises(ValueError, match="rank 6 exceeds"):
        adapters.dept(jax.random.key(0), 3, table, rank=6, max_length=5)
    with pytest.raises(ValueError, match="num_tokens"):
        adapters.dept(jax.random.key(0), 0, table, rank=2, max_length=5)
    with pytest.raises(ValueError, match="vocab, d"):
        adapters.dept(jax.random.key(0), 2, jnp.zeros(4), rank=1, max_length=5)
    with pytest.raises(TypeError, match="DePTParams"):
        adapters.dept_embeddings(adapters.PromptParams(table), jnp.zeros((2, 16)))


def test_two_learning_rates_train_the_tiny_llama():
    g, params, _, _ = load("llama")
    p = adapters.dept(jax.random.key(0), 3, params["embed_tokens"]["embedding"], rank=2,
                      max_length=8)
    ids = jnp.asarray(np.load(GOLDEN)["ids"])

    def loss_fn(q):
        logits = _forward(g, params, q, ids)[:, 3:-1]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    opt = optax.partition({"prompt": optax.adam(3e-1), "low_rank": optax.adam(5e-3)},
                          adapters.dept_labels())

    @jax.jit
    def step(q, s):
        loss, grads = jax.value_and_grad(loss_fn)(q)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int count in
            updates, s = opt.update(grads, s, q)
        return optax.apply_updates(q, updates), s, loss

    q, s, loss0 = step(p, opt.init(p))
    # Adam's first step moves every entry by its learning rate: 3e-1 for the
    # prompt, 5e-3 for B (A's gradient is 0 while B = 0).
    np.testing.assert_allclose(np.abs(np.asarray(q.prompt - p.prompt)), 3e-1, rtol=1e-3)
    np.testing.assert_allclose(np.abs(np.asarray(q.b)), 5e-3, rtol=1e-3)
    np.testing.assert_array_equal(q.a, p.a)
    for _ in range(7):
        q, s, loss = step(q, s)
    assert float(loss) < float(loss0) - 0.1
    assert float(jnp.abs(q.a - p.a).max()) > 0
