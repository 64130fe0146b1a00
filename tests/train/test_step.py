"""train.trainer: the four compositions, factored vs materialize, donation, skips, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax import adapters, masks, optim, train, tree
from tests import helpers as h


def _params():
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32) * 0.5

    return {"w1": normal(4, 8), "b1": normal(8), "w2": normal(8, 3)}


def _loss(p, batch):
    hid = jnp.tanh(batch["x"] @ p["w1"] + p["b1"][None, :])
    return jnp.mean((hid @ p["w2"] - batch["y"]) ** 2)


def _batch(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.standard_normal((n, 4)), jnp.float32),
            "y": jnp.asarray(rng.standard_normal((n, 3)), jnp.float32)}


def _host(t):
    """A host copy of a tree (a donated state's buffers are gone after the call)."""
    return jax.tree.map(lambda x: np.array(jax.random.key_data(x) if jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), t)


def _lora_xs_rules():
    return [tree.Rule(where="w1", then=adapters.lora(2)),
            tree.Rule(where="w2", then=adapters.lora_xs(2))]  # lora_xs: a frozen basis


def _build(kind, params):
    """(trainer, names of base leaves that must change in t.params) per composition."""
    if kind == "adapters":
        a = tree.assign(params, _lora_xs_rules())
        return train.trainer(_loss, optax.adam(3e-2), adapters=a), {"w1", "w2"}
    if kind == "hybrid":
        a = tree.assign(params, [tree.Rule(where="w1", then=adapters.lora(2))])
        opt = optax.partition({"ad": optax.adam(3e-2), "full": optax.adam(1e-2)},
                              train.hybrid_labels(adapters="ad", full="full"))
        return (train.trainer(_loss, opt, adapters=a,
                              full=[tree.Rule(where="b1|w2", then=True)]), {"w1", "b1", "w2"})
    if kind == "optimizer":
        labels = tree.labels(params, [tree.Rule(where="w1", then="frozen"),
                                      tree.Rule(where=".*", then="adam")])
        opt = optax.partition({"adam": optax.adam(3e-2), "frozen": optax.set_to_zero()},
                              labels)
        return train.trainer(_loss, opt), {"b1", "w2"}
    a = tree.assign(params, [tree.Rule(where="w1|w2", then=adapters.sparse_delta(k=8))])
    sel = masks.spiel_selector(total_steps=30, reselection_steps=6, accumulation_steps=2)
    return train.trainer(_loss, optim.sft_adamw(3e-2), adapters=a, sparse=sel), {"w1", "w2"}


@pytest.mark.parametrize("kind", ["adapters", "hybrid", "optimizer", "sparse"])
def test_each_composition_trains_and_changes_only_trainable_leaves(kind):
    params = _params()
    base_before = _host(params)
    t, moved = _build(kind, params)
    state = t.init(jax.random.key(0), params)
    frozen0 = _host(state.frozen)
    trainable0 = _host(state.trainable)
    p = None if kind == "optimizer" else params
    batch = _batch()
    losses = []
    for _ in range(12):
        state, m = t.step(state, batch, p)
        losses.append(float(m["loss"]))
        assert int(m["skipped"]) == 0 and np.isfinite(float(m["grad_norm"]))
    assert int(state.step) == 12
    assert losses[-1] < 0.8 * losses[0], losses
    # The base tree given to init/step is never written (nor donated).
    for k in params:
        assert np.array_equal(np.asarray(params[k]), base_before[k]), k
    eff = t.params(state, p)
    for k in params:
        changed = not np.allclose(np.asarray(eff[k]), base_before[k], **h.ELEMENTWISE_F32)
        assert changed == (k in moved), (k, changed)
    # Every trainable leaf moved (the sparse supports are frozen, and may move);
    # optimizer-only: the leaf routed to set_to_zero is bit-identical.
    now = _host(state.trainable)
    if kind == "optimizer":
        np.testing.assert_array_equal(now["w1"], trainable0["w1"])
        now, trainable0 = ({k: v for k, v in x.items() if k != "w1"} for x in (now, trainable0))
    for a, b in zip(jax.tree.leaves(trainable0), jax.tree.leaves(now), strict=True):
        assert not np.allclose(a, b, **h.ELEMENTWISE_F32)
    if kind == "sparse":
        assert any(not np.array_equal(np.sort(frozen0[k].indices),
                                      np.sort(np.asarray(state.frozen[k].indices)))
                   for k in frozen0)
    else:  # frozen adapter parts (lora_xs's basis) are bit-identical
        h.assert_tree_allclose(_host(state.frozen), frozen0, **h.EXACT)
    if kind == "adapters":
        assert jax.tree.leaves(frozen0)  # the check above compared something


def test_adapter_composition_matches_a_hand_written_step():
    # Independent reference: value_and_grad of the materialised loss + adam.
    params, batch = _params(), _batch()
    a = tree.assign(params, _lora_xs_rules())
    opt = optax.adam(3e-2)
    t = train.trainer(_loss, opt, adapters=a, factored=False, donate=False)
    state = t.init(jax.random.key(0), params)
    ref = adapters.init(a, jax.random.key(0), params)
    h.assert_tree_allclose(state.trainable, dict(ref.trainable), **h.EXACT)  # same key
    tr, ost = dict(ref.trainable), opt.init(dict(ref.trainable))
    for _ in range(3):
        state, m = t.step(state, batch, params)
        loss, g = jax.value_and_grad(
            lambda t_: _loss(adapters.materialize(a, params, t_, ref.frozen), batch))(tr)
        with jax.numpy_dtype_promotion("standard"):
            up, ost = opt.update(g, ost, tr)
        tr = optax.apply_updates(tr, up)
        np.testing.assert_allclose(float(m["loss"]), float(loss), **h.MATMUL_F32)
        np.testing.assert_allclose(float(m["grad_norm"]),
                                   float(np.sqrt(sum(np.sum(h.f64(x) ** 2)
                                                     for x in jax.tree.leaves(g)))),
                                   **h.MATMUL_F32)
    h.assert_tree_allclose(state.trainable, tr, **h.MATMUL_F32)



def test_init_starts_from_a_given_adapter_state():
    # A data-driven initialiser hands over an AdapterState (and its base tree):
    # init(state=) starts there instead of adapters.init's zero-delta start.
    params, batch = _params(), _batch()
    a = tree.assign(params, _lora_xs_rules())
    given = adapters.init(a, jax.random.key(5), params)
    given = given._replace(trainable={
        p: v._replace(**{f: v_f + 0.25 for f, v_f in v._asdict().items()})
        for p, v in given.trainable.items()})
    t = train.trainer(_loss, optax.sgd(0.1), adapters=a, factored=False, donate=False)
    state = t.init(jax.random.key(0), params, state=given)
    h.assert_tree_allclose(state.trainable, dict(given.trainable), **h.EXACT)
    h.assert_tree_allclose(state.frozen, dict(given.frozen), **h.EXACT)
    ref = adapters.materialize(a, params, *given)
    h.assert_tree_allclose(t.params(state, params), ref, **h.EXACT)
    _, m = t.step(state, batch, params)
    np.testing.assert_allclose(float(m["loss"]), float(_loss(ref, batch)), **h.MATMUL_F32)
    with pytest.raises(TypeError, match="state must be an adapters.AdapterState"):
        t.init(jax.random.key(0), params, state=dict(given.trainable))
    short = given._replace(trainable={"w1": given.trainable["w1"]})
    with pytest.raises(ValueError, match=r"state.trainable .* missing \['w2'\]"):
        t.init(jax.random.key(0), params, state=short)
    with pytest.raises(ValueError, match="state= .* needs adapters="):
        train.trainer(_loss, optax.sgd(0.1)).init(jax.random.key(0), params, state=given)


def test_optimizer_state_holds_moments_for_the_trainable_leaves_only():
    params = _params()
    a = tree.assign(params, [tree.Rule(where="w1", then=adapters.lora(2))])
    state = train.trainer(_loss, optax.adam(1e-2), adapters=a).init(jax.random.key(0), params)
    n = adapters.num_trainable(state.trainable)
    assert n == 2 * (4 + 8)
    # Adam: two float32 moments per trainable value and one int32 count.
    assert peftjax.tree_bytes(state.opt_state) == 2 * 4 * n + 4


def test_hybrid_export_folds_to_what_the_step_trained():
    # Export: splice the full leaves back, fold the adapters in; the exported
    # tree gives the loss of the effective parameters the step trained.
    params, batch = _params(), _batch()
    a = tree.assign(params, [tree.Rule(where="w1", then=adapters.lora(2))])
    opt = optax.partition({"ad": optax.adam(3e-2), "full": optax.adam(1e-2)},
                          train.hybrid_labels(adapters="ad", full="full"))
    t = train.trainer(_loss, opt, adapters=a, full=[tree.Rule(where="b1|w2", then=True)])
    state = t.init(jax.random.key(0), params)
    for _ in range(3):
        state, _ = t.step(state, batch, params)
    exported = adapters.fold(a, tree.replace_leaves(params, state.trainable["full"]),
                              state.trainable["adapters"], state.frozen)
    eff = t.params(state, params)
    h.assert_tree_allclose(exported, eff, **h.MATMUL_F32)
    assert not np.allclose(np.asarray(exported["w2"]), np.asarray(params["w2"]),
                           **h.ELEMENTWISE_F32)
    np.testing.assert_allclose(float(_loss(exported, batch)), float(_loss(eff, batch)),
                               **h.MATMUL_F32)

@pytest.mark.parametrize("kind", ["adapters", "hybrid"])
def test_factored_and_materialize_steps_agree(kind):
    params, batch = _params(), _batch()
    a = tree.assign(params, _lora_xs_rules() if kind == "adapters"
                    else [tree.Rule(where="w1", then=adapters.lora(2))])
    full = [tree.Rule(where="b1", then=True)] if kind == "hybrid" else None
    states, losses = [], []
    for fac in (None, False):
        t = train.trainer(_loss, optax.adam(3e-2), adapters=a, full=full, factored=fac)
        s = t.init(jax.random.key(0), params)
        ls = []
        for _ in range(3):
            s, m = t.step(s, batch, params)
            ls.append(float(m["loss"]))
        states.append(_host(s.trainable))
        losses.append(ls)
    np.testing.assert_allclose(losses[0], losses[1], **h.MATMUL_F32)
    h.assert_tree_allclose(states[0], states[1], **h.MATMUL_F32)


def test_tiny_llama_factored_lora_trains_and_matches_materialize():
    from flax import nnx

    from peftjax.models import apply, llama, split_params

    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    graph, params = split_params(llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 32)

    def loss_fn(p, toks):
        logits = apply(graph, p, toks[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    a = tree.assign(params, [tree.Rule(where=r"layers/\d+/self_attn/(q|v)_proj/kernel",
                                       then=adapters.lora(4, alpha=8.0))])
    runs = []
    for fac in (True, False):
        t = train.trainer(loss_fn, optax.adam(5e-2), adapters=a, factored=fac)
        s = t.init(jax.random.key(0), params)
        ls = []
        for _ in range(4):
            s, m = t.step(s, tokens, params)
            ls.append(float(m["loss"]))
        runs.append((ls, _host(s.trainable)))
    assert runs[0][0][-1] < runs[0][0][0] - 0.05, runs[0][0]
    np.testing.assert_allclose(runs[0][0], runs[1][0], **h.MATMUL_F32)
    # Four Adam steps amplify last-bit differences of the two matmul orders.
    h.assert_tree_allclose(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-5)


def test_factored_default_falls_back_with_one_warning_and_hybrid_without_adapters():
    params, batch = _params(), _batch()
    # a use of an adapted kernel outside a matmul (a weight penalty) is materialised,
    # with the warning naming the path
    a = tree.assign(params, [tree.Rule(where="w1", then=adapters.lora(2))])
    t = train.trainer(lambda p, b: _loss(p, b) + 1e-3 * jnp.sum(p["w1"] ** 2),
                      optax.adam(1e-2), adapters=a)
    state = t.init(jax.random.key(0), params)
    with pytest.warns(peftjax.factored.FactoredFallbackWarning, match="'w1'"):
        state, m = t.step(state, batch, params)
    assert int(m["skipped"]) == 0
    # hybrid with adapters={}: only the full leaves train
    hy = train.trainer(_loss, optax.sgd(0.1), adapters={},
                       full=[tree.Rule(where="w2", then=True)])
    hs = hy.init(jax.random.key(0), params)
    assert hs.trainable["adapters"] == {} and sorted(hs.trainable["full"]) == ["w2"]
    hs, _ = hy.step(hs, batch, params)
    eff = hy.params(hs, params)
    np.testing.assert_array_equal(eff["w1"], params["w1"])
    assert not np.allclose(eff["w2"], params["w2"], **h.ELEMENTWISE_F32)


def _state_bytes(state):
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(_host(state)))


@pytest.mark.parametrize("kind", ["adapters", "optimizer"])
def test_donation_aliases_the_whole_state(kind):
    params, batch = _params(), _batch()
    p = None if kind == "optimizer" else params
    for donate in (True, False):
        if kind == "adapters":
            a = tree.assign(params, _lora_xs_rules())
            t = train.trainer(_loss, optax.adam(1e-2), adapters=a, donate=donate)
        else:
            t = train.trainer(_loss, optax.adam(1e-2), donate=donate)
        state = t.init(jax.random.key(0), params)
        mem = t.step.lower(state, batch, p).compile().memory_analysis()
        if donate:
            assert mem.alias_size_in_bytes >= _state_bytes(state)
            leaf = jax.tree.leaves(state.trainable)[0]
            t.step(state, batch, p)
            assert leaf.is_deleted()  # no second copy of the state is kept
        else:
            assert mem.alias_size_in_bytes == 0


@pytest.mark.parametrize("kind", ["adapters", "hybrid", "optimizer"])
def test_a_nan_batch_is_skipped_and_the_next_batch_trains(kind):
    params = _params()
    t, _ = _build(kind, params)
    p = None if kind == "optimizer" else params
    state = t.init(jax.random.key(0), params)
    state, _ = t.step(state, _batch(), p)
    before = _host(state)
    bad = dict(_batch(seed=2), x=_batch(seed=2)["x"].at[0, 0].set(jnp.nan))
    state, m = t.step(state, bad, p)
    after = _host(state)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(after.step) == int(before.step) + 1
    assert not np.array_equal(after.key, before.key)  # the key still advances
    for part in ("trainable", "frozen", "opt_state"):  # unchanged, not recomputed
        h.assert_tree_allclose(getattr(after, part), getattr(before, part), **h.EXACT)
    state, m = t.step(state, _batch(seed=3), p)
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))
    assert not np.allclose(jax.tree.leaves(_host(state.trainable))[0],
                           jax.tree.leaves(after.trainable)[0], **h.ELEMENTWISE_F32)

    raw = train.trainer(_loss, optax.sgd(0.1), skip_nonfinite=False,
                        **({} if kind == "optimizer" else
                           {"adapters": tree.assign(params, _lora_xs_rules())}))
    s = raw.init(jax.random.key(0), params)
    s, m = raw.step(s, bad, p)
    assert int(m["skipped"]) == 0
    assert np.isnan(np.concatenate([np.ravel(x) for x in
                                    jax.tree.leaves(_host(s.trainable))])).any()


@pytest.mark.parametrize("kind", ["adapters", "optimizer"])
def test_accumulate_equals_one_step_on_the_concatenated_batch(kind):
    params, batch = _params(), _batch(n=8)
    p = None if kind == "optimizer" else params
    kw = {} if kind == "optimizer" else {"adapters": tree.assign(params, _lora_xs_rules())}
    one = train.trainer(_loss, optax.adam(3e-2), **kw)
    four = train.trainer(_loss, optax.adam(3e-2), accumulate=4, **kw)
    s1, s4 = one.init(jax.random.key(0), params), four.init(jax.random.key(0), params)
    micro = jax.tree.map(lambda x: x.reshape((4, 2) + x.shape[1:]), batch)
    for _ in range(2):
        s1, m1 = one.step(s1, batch, p)
        s4, m4 = four.step(s4, micro, p)
        np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), **h.MATMUL_F32)
        np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]),
                                   **h.MATMUL_F32)
    h.assert_tree_allclose(s4.trainable, s1.trainable, **h.MATMUL_F32)
    # A NaN in one micro-batch skips the whole update.
    before = _host(s4.trainable)
    bad = jax.tree.map(lambda x: x.at[3].set(jnp.nan), micro)
    s4, m = four.step(s4, bad, p)
    assert int(m["skipped"]) == 1
    h.assert_tree_allclose(s4.trainable, before, **h.EXACT)


def test_dropout_follows_the_state_key():
    params, batch = _params(), _batch()
    a = tree.assign(params, [tree.Rule(where="w1|w2", then=adapters.lora(2, dropout=0.5))])
    # b is zero at init: a first step moves only b, whose gradient sees the dropout mask.
    t = train.trainer(_loss, optax.sgd(0.5), adapters=a)
    state = t.init(jax.random.key(0), params)
    state, _ = t.step(state, batch, params)  # b != 0 from here on

    kept = _host(state)

    def after(seed, trainer=t):  # the step donates its state: a fresh copy each call
        s = jax.tree.map(jnp.asarray, kept._replace(key=None))
        s, m = trainer.step(s._replace(key=jax.random.key(seed)), batch, params)
        return _host(s.trainable), float(m["loss"])

    k1, k2 = 11, 12
    (t1, l1), (t1b, l1b), (t2, l2) = after(k1), after(k1), after(k2)
    h.assert_tree_allclose(t1, t1b, **h.MATMUL_F32)
    np.testing.assert_allclose(l1, l1b, **h.MATMUL_F32)
    assert abs(l1 - l2) > 1e-4
    assert any(not np.allclose(x, y, **h.MATMUL_F32)
               for x, y in zip(jax.tree.leaves(t1), jax.tree.leaves(t2), strict=True))
    # deterministic=True: no dropout, the key does not matter.
    det = train.trainer(_loss, optax.sgd(0.5), adapters=a, deterministic=True)
    (d1, dl1), (d2, dl2) = after(k1, det), after(k2, det)
    h.assert_tree_allclose(d1, d2, **h.MATMUL_F32)
    np.testing.assert_allclose(dl1, dl2, **h.MATMUL_F32)


def test_hybrid_labels_route_each_part():
    params, batch = _params(), _batch()
    a = tree.assign(params, [tree.Rule(where="w1", then=adapters.lora(2))])
    labels = train.hybrid_labels(adapters="still",
                                 full=lambda path: "sgd" if path == "b1" else "still")
    opt = optax.partition({"sgd": optax.sgd(0.1), "still": optax.set_to_zero()}, labels)
    t = train.trainer(_loss, opt, adapters=a, full=[tree.Rule(where="b1|w2", then=True)])
    state = t.init(jax.random.key(0), params)
    assert sorted(state.trainable) == ["adapters", "full"]
    assert sorted(state.trainable["full"]) == ["b1", "w2"]
    got = labels(state.trainable)
    assert got["full"] == {"b1": "sgd", "w2": "still"}
    assert set(jax.tree.leaves(got["adapters"])) == {"still"}
    before = _host(state.trainable)
    state, _ = t.step(state, batch, params)
    after = _host(state.trainable)
    h.assert_tree_allclose(after["adapters"], before["adapters"], **h.EXACT)
    np.testing.assert_array_equal(after["full"]["w2"], before["full"]["w2"])
    assert not np.allclose(after["full"]["b1"], before["full"]["b1"], **h.ELEMENTWISE_F32)
    with pytest.raises(ValueError, match="hybrid trainable tree"):
        labels({"w": jnp.ones(2)})


def test_metrics_count_tokens_and_carry_aux():
    params = _params()
    t = train.trainer(lambda p, b: (_loss(p, b), jnp.sum(b["y"])), optax.sgd(0.1),
                      has_aux=True)
    batch = dict(_batch(), segment_ids=jnp.array([[1, 1, 0], [2, 0, 0]]))
    state = t.init(jax.random.key(0), params)
    _, m = t.step(state, batch)
    assert int(m["tokens"]) == 3
    np.testing.assert_allclose(float(m["aux"]), float(jnp.sum(batch["y"])), **h.MATMUL_F32)
    t2 = train.trainer(_loss, optax.sgd(0.1), accumulate=2,
                       tokens=lambda b: jnp.sum(b["x"][:, 0] > 0))
    micro = jax.tree.map(lambda x: x.reshape((2, 4) + x.shape[1:]), _batch())
    _, m = t2.step(t2.init(jax.random.key(0), params), micro)
    assert int(m["tokens"]) == int(jnp.sum(_batch()["x"][:, 0] > 0))
    assert set(m) == {"loss", "grad_norm", "skipped", "tokens"}


def test_bad_input_errors():
    params = _params()
    a = tree.assign(params, [tree.Rule(where="w1", then=adapters.lora(2))])
    sel = masks.spiel_selector(total_steps=10)
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="sparse= needs adapters="):
        train.trainer(_loss, opt, sparse=sel)
    with pytest.raises(ValueError, match="factored=True cannot apply"):
        train.trainer(_loss, opt, adapters=a, sparse=sel, factored=True)
    with pytest.raises(ValueError, match="factored=True needs adapters="):
        train.trainer(_loss, opt, factored=True)
    with pytest.raises(ValueError, match="nothing is trainable"):
        train.trainer(_loss, opt, adapters={})
    with pytest.raises(ValueError, match="accumulate must be a positive int, got 0"):
        train.trainer(_loss, opt, accumulate=0)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        train.trainer(_loss, optax.sgd)
    with pytest.raises(TypeError, match=r"adapters\['w1'\] must be an adapters.Adapter"):
        train.trainer(_loss, opt, adapters={"w1": "lora"})
    with pytest.raises(TypeError, match="full must be a list of tree.Rule"):
        train.trainer(_loss, opt, adapters=a, full=tree.Rule(where="b1", then=True))
    with pytest.raises(TypeError, match="selector must be a peftjax.masks.Selector"):
        train.trainer(_loss, opt, adapters=a, sparse=object())
    with pytest.raises(ValueError, match=r"\['w1'\] are adapted and also trained in full"):
        train.trainer(_loss, opt, adapters=a,
                      full=[tree.Rule(where="w.*", then=True)]).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="full= rules take payload True.*'b1' got 'adam'"):
        train.trainer(_loss, opt, adapters=a,
                      full=[tree.Rule(where="b1", then="adam")]).init(jax.random.key(0),
                                                                       params)
    t = train.trainer(_loss, opt, adapters=a)
    state = t.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="adapter-only composition needs params="):
        t.step(state, _batch())
    with pytest.raises(TypeError, match="state must be a train.TrainState"):
        t.step(tuple(state), _batch(), params)
    o = train.trainer(_loss, opt)
    ostate = o.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match="optimizer-only .* pass params=None"):
        o.step(ostate, _batch(), params)
    acc = train.trainer(_loss, opt, accumulate=4)
    with pytest.raises(ValueError, match=r"accumulate=4 .* batch leaf 'x' has shape "
                                         r"\(8, 4\) dtype float32"):
        acc.step(acc.init(jax.random.key(0), params), _batch())
    with pytest.raises(TypeError, match=r"key must be a jax.random.key .* shape \(3,\)"):
        t.init(jnp.zeros(3, jnp.uint32), params)
