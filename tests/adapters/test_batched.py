"""Batched multi-adapter execution (issue 12 item 3): one adapter per example.

The reference for every example is the model with that example's adapter
merged into the weights (``adapters.fold``), run on the example alone; the
base rows (id -1) use the base weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, tree
from peftjax import models as pm
from peftjax.models import llama
from tests.helpers import EXACT, GRAD_F32, MATMUL_F32, count_traces, f64
from tests.models.test_llama import close, make, make_config

ATTN = r"layers/(\d+/)?self_attn/(q|v)_proj/kernel"
MLP = r"layers/(\d+/)?mlp/down_proj/kernel"


def _randomise(state, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return adapters.AdapterState(
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale,
                                           x.dtype), state.trainable),
        state.frozen)


def _collection(params):
    """Three adapters: "a" and "b" share one assignment (one gather group);
    "c" is another LoRA on other paths (a second group, masked sum)."""
    ab = tree.assign(params, [tree.Rule(where=ATTN, then=adapters.lora(4, alpha=8.0))])
    c_rules = [tree.Rule(where=MLP, then=adapters.lora(2, alpha=2.0)),
               tree.Rule(where=r"layers/(\d+/)?self_attn/q_proj/kernel",
                         then=adapters.lora(3, alpha=6.0, scaling=adapters.Scaling
                                            .ALPHA_OVER_SQRT_RANK))]
    cc = tree.assign(params, c_rules)
    coll = adapters.collection()
    for i, (name, a) in enumerate((("a", ab), ("b", ab), ("c", cc))):
        state = _randomise(adapters.init(a, jax.random.key(i), params), 10 + i)
        coll = adapters.add(coll, name, a, state)
    return coll


IDS = [2, -1, 0, 1, 0]


def test_batched_greedy_decoding_equals_per_example():
    """Scanned layers (the states are sliced per layer inside the scan), KV
    cache, greedy: token for token what each example gives alone."""
    cfg = make_config()
    g, params = make(cfg, scan_layers=True, seed=1)
    coll = _collection(params)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (len(IDS), 4)), jnp.int32)
    names = list(coll.adapters)

    def gen(p, prompt):
        return llama.generate(pm.rebuild(g, p), prompt, max_new_tokens=6)

    nb = adapters.batched(coll, params, jnp.asarray(IDS))
    got = np.asarray(jax.jit(lambda p, t, f, x: factored.transform(
        gen, nb.assignment, t, f)(p, x))(params, nb.trainable, nb.frozen, prompt))

    one = jax.jit(gen)  # one compile for the base and every merged tree
    merged = {n: adapters.fold(*[coll.adapters[n].assignment, params,
                                  coll.adapters[n].trainable,
                                  coll.adapters[n].frozen]) for n in names}
    want = [np.asarray(one(params if i < 0 else merged[names[i]], prompt[b:b + 1]))[0]
            for b, i in enumerate(IDS)]
    np.testing.assert_array_equal(got, np.stack(want))
    # The adapters matter: every adapted row differs from the base's tokens.
    base = [np.asarray(one(params, prompt[b:b + 1]))[0] for b in range(len(IDS))]
    assert all(not np.array_equal(got[b], base[b]) for b, i in enumerate(IDS) if i >= 0)


def test_batched_logits_new_ids_no_retrace_base_rows_exact():
    """Unrolled layers: per-example logits equal the merged adapter's; base
    rows are the base model bit for bit; new ids reuse the compiled function."""
    cfg = make_config(num_hidden_layers=1)
    g, params = make(cfg, seed=2)
    coll = _collection(params)
    names = list(coll.adapters)
    rows = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 5))
    rows[2] = rows[1]
    tokens = jnp.asarray(rows, jnp.int32)
    ids = [2, 1, 0]
    nb = adapters.batched(coll, params, jnp.asarray(ids))

    def fn(t, f, x):
        return factored.transform(lambda p, x: pm.apply(g, p, x), nb.assignment, t, f)(
            params, x)

    counted, traces = count_traces(fn)
    jfn = jax.jit(counted)
    first = jfn(nb.trainable, nb.frozen, tokens)
    fwd = jax.jit(lambda p, x: pm.apply(g, p, x))
    for b, i in enumerate(ids):
        n = names[i]
        merged = adapters.fold(coll.adapters[n].assignment, params,
                                coll.adapters[n].trainable, coll.adapters[n].frozen)
        close(first[b:b + 1], f64(fwd(merged, tokens[b:b + 1])))
    routed = adapters.batched(coll, params, jnp.asarray([-1, -1, 1]))
    second = jfn(routed.trainable, routed.frozen, tokens)
    assert traces["n"] == 1
    base = fwd(params, tokens)
    np.testing.assert_allclose(f64(second[:2]), f64(base[:2]), **EXACT)
    # Row 2 now runs adapter "b" on row 1's tokens: what row 1 gave before.
    np.testing.assert_allclose(f64(second[2]), f64(first[1]), **EXACT)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(base[0]))


def test_batched_on_a_dict_model_matches_float64_and_gradients():
    """x_b @ W + s_b·x_b@A_b@B_b in float64, and the gradient of the stacked
    factors equals each adapter's own gradient on its examples."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2, alpha=4.0))])
    coll = adapters.collection()
    for i, n in enumerate(("x", "y")):
        coll = adapters.add(coll, n, a, _randomise(
            adapters.init(a, jax.random.key(i), params), 20 + i))
    x = jnp.asarray(rng.standard_normal((4, 2, 5)), jnp.float32)
    ids = [1, 0, -1, 1]
    nb = adapters.batched(coll, params, jnp.asarray(ids))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    y = factored.transform(f, *nb)(params, x)
    names = list(coll.adapters)
    for b, i in enumerate(ids):
        w = f64(params["w"])
        if i >= 0:
            t = coll.adapters[names[i]].trainable["w"]
            w = w + 2.0 * f64(t.a) @ f64(t.b)
        np.testing.assert_allclose(f64(y[b]), f64(x[b]) @ w, **MATMUL_F32)

    def loss(t):
        return jnp.sum(factored.transform(f, nb.assignment, t, nb.frozen)(params, x) ** 2)

    # The one group's stacked (2, ...) factors.
    grads = jax.jit(jax.grad(loss))(nb.trainable)["w"][0]
    for i, n in enumerate(names):
        rows = jnp.asarray([b for b, j in enumerate(ids) if j == i])
        own = jax.jit(jax.grad(lambda t, n=n, rows=rows: jnp.sum(factored.transform(
            f, coll.adapters[n].assignment, t, coll.adapters[n].frozen)(
                params, x[rows]) ** 2)))(coll.adapters[n].trainable)["w"]
        np.testing.assert_allclose(f64(grads.a[i]), f64(own.a), **GRAD_F32)
        np.testing.assert_allclose(f64(grads.b[i]), f64(own.b), **GRAD_F32)


def test_batched_members_with_a_shared_bank_match_their_own_weights():
    """VB-LoRA keeps one bank per adapter under SHARED: each example gets its
    adapter's materialized weights (float64 reference)."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)}
    a = tree.assign(params, [tree.Rule(where="w|v", then=adapters.vblora(
        2, num_vectors=6, vector_length=4))])
    coll = adapters.collection()
    for i, n in enumerate(("x", "y")):
        coll = adapters.add(coll, n, a, _randomise(
            adapters.init(a, jax.random.key(i), params), 30 + i))
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    ids = [1, -1, 0]
    f = lambda p, x: (x @ p["w"]) @ p["v"]  # noqa: E731
    y = factored.transform(f, *adapters.batched(coll, params, jnp.asarray(ids)))(
        params, x)
    names = list(coll.adapters)
    for b, i in enumerate(ids):
        p = params if i < 0 else adapters.materialize(
            a, params, coll.adapters[names[i]].trainable, coll.adapters[names[i]].frozen)
        np.testing.assert_allclose(f64(y[b]), f64(x[b]) @ f64(p["w"]) @ f64(p["v"]),
                                   **MATMUL_F32)


def test_batched_refuses_what_cannot_vary_per_example():
    params = {"w": jnp.ones((4, 3)), "v": jnp.ones((3, 2))}
    lora = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])
    dora = tree.assign(params, [tree.Rule(where="w", then=adapters.dora(1))])
    coll = adapters.collection()
    coll = adapters.add(coll, "l", lora, adapters.init(lora, jax.random.key(0), params))
    with_dora = adapters.add(coll, "d", dora,
                             adapters.init(dora, jax.random.key(1), params))
    with pytest.raises(TypeError, match=r"'d' at 'w'.*scales the base product"):
        adapters.batched(with_dora, params, jnp.asarray([0, 1]))
    # An output map (RoAd's rotation; its bias hook aside) cannot vary either.
    road = tree.assign(params, [tree.Rule(where="v", then=adapters.road(
        group_size=2)._replace(bias=None))])
    with_road = adapters.add(coll, "r", road,
                             adapters.init(road, jax.random.key(1), params))
    with pytest.raises(TypeError, match=r"'r' at 'v'.*or output \(RoAd\)"):
        adapters.batched(with_road, params, jnp.asarray([0, 1]))
    with pytest.raises(ValueError, match=r"ids \[2\] out of range"):
        adapters.batched(coll, params, jnp.asarray([0, 2]))
    with pytest.raises(ValueError, match=r"1-D integer array.*shape \(2, 1\)"):
        adapters.batched(coll, params, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        adapters.batched(coll, params, jnp.asarray([0]), names=["z"])
    nb = adapters.batched(coll, params, jnp.asarray([0, -1]))
    with pytest.raises(ValueError, match=r"'w' \(shape \(4, 3\), dtype float32\).*"
                                         "only in factored form"):
        adapters.materialize(nb.assignment, params, nb.trainable, nb.frozen)
    # The examples must be the activation's leading axis.
    with pytest.raises(ValueError, match=r"'w'.*shape \(3, 4\).*leading axis must "
                                         "be the 2 examples"):
        factored.transform(lambda p, x: x @ p["w"], *nb)(params, jnp.ones((3, 4)))
