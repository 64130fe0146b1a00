"""Named adapters on one base (issue 12 item 3): add, switch, disable, delete,
weighted combination. References: the base leaves themselves (disable), each
adapter's own state (switch), and the float64 NumPy formulas
``W + Σ w_i s_i A_i B_i`` (concatenate, svd_refactor at full rank) and PEFT's
``A = Σ √w_i s_i A_i, B = Σ √w_i B_i`` (linear)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, merge, tree
from peftjax import models as pm
from tests.helpers import ELEMENTWISE_F32, EXACT, MATMUL_F32, f64
from tests.models.test_llama import make, make_config

ALPHA_OVER_SQRT_RANK = adapters.Scaling.ALPHA_OVER_SQRT_RANK


def _random_state(assignment, params, seed):
    state = adapters.init(assignment, jax.random.key(seed), params)
    rng = np.random.default_rng(seed)
    return adapters.AdapterState(
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.5,
                                           x.dtype), state.trainable),
        state.frozen)


@pytest.fixture
def dict_setup(tiny_params):
    params = {k: tiny_params[k] for k in ("dense1", "dense2", "stack")}
    rules = {
        "r2": [tree.Rule(where=r"dense\d/kernel|stack/kernel",
                         then=adapters.lora(2, alpha=4.0))],
        "r3": [tree.Rule(where=r"dense\d/kernel|stack/kernel",
                         then=adapters.lora(3, alpha=6.0,
                                            scaling=ALPHA_OVER_SQRT_RANK))],
        "v": [tree.Rule(where=r"dense1/kernel", then=adapters.lora(1, alpha=1.0))],
    }
    coll = adapters.collection()
    states = {}
    for i, (name, r) in enumerate(rules.items()):
        a = tree.assign(params, r, layout=tree.stacked("stack"))
        states[name] = (a, _random_state(a, params, i))
        coll = adapters.add(coll, name, a, states[name][1])
    return params, coll, states


SCALE = {"r2": 4.0 / 2, "r3": 6.0 / np.sqrt(3), "v": 1.0}


def _materialize(named, params):
    return adapters.materialize(named.assignment, params, named.trainable, named.frozen)


def test_switch_gives_each_adapter_and_disable_the_base(dict_setup):
    params, coll, states = dict_setup
    assert coll.active is None and list(coll.adapters) == ["r2", "r3", "v"]
    for name, (assignment, state) in states.items():
        got = _materialize(adapters.active(adapters.switch(coll, name)), params)
        direct = adapters.materialize(assignment, params, *state)
        for path in ("dense1", "dense2", "stack"):
            np.testing.assert_array_equal(np.asarray(got[path]["kernel"]),
                                          np.asarray(direct[path]["kernel"]))
            t = state.trainable.get(f"{path}/kernel")
            ref = f64(params[path]["kernel"])
            if t is not None:
                ref = ref + SCALE[name] * f64(t.a) @ f64(t.b)
            np.testing.assert_allclose(f64(got[path]["kernel"]), ref, **MATMUL_F32)
    off = adapters.disable(adapters.switch(coll, "r3"))
    assert off.active is None and list(off.adapters) == list(coll.adapters)
    base = _materialize(adapters.active(off), params)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(params), strict=True):
        assert x is y  # every leaf passed through by identity: exactly the base


def test_disable_is_exactly_the_base_through_the_factored_path():
    cfg = make_config(num_hidden_layers=1)
    g, params = make(cfg, seed=4)
    a = tree.assign(params, [tree.Rule(where=r"layers/0/self_attn/(q|v)_proj/kernel",
                                       then=adapters.lora(2))])
    coll = adapters.add(adapters.collection(), "x", a, _random_state(a, params, 0),
                        activate=True)
    tokens = jnp.asarray([[1, 5, 9, 3]], jnp.int32)
    fn = lambda p, x: pm.apply(g, p, x)  # noqa: E731

    def run(named):
        return jax.jit(lambda p, t, f, x: factored.transform(fn, named.assignment, t, f)(
            p, x))(params, named.trainable, named.frozen, tokens)

    base = jax.jit(fn)(params, tokens)
    off = run(adapters.active(adapters.disable(coll)))
    np.testing.assert_allclose(f64(off), f64(base), **EXACT)
    on = run(adapters.active(coll))
    assert np.abs(f64(on) - f64(base)).max() > 1e-3


def test_add_delete_and_errors(dict_setup):
    params, coll, states = dict_setup
    a, s = states["v"]
    c2 = adapters.add(coll, "w", a, s, activate=True)
    assert c2.active == "w" and "w" not in coll.adapters  # the input is unchanged
    c3 = adapters.delete(c2, "w")
    assert c3.active is None and list(c3.adapters) == ["r2", "r3", "v"]
    c4 = adapters.delete(adapters.switch(c2, "r2"), "v")
    assert c4.active == "r2" and list(c4.adapters) == ["r2", "r3", "w"]
    with pytest.raises(ValueError, match="'v' already exists"):
        adapters.add(coll, "v", a, s)
    with pytest.raises(ValueError, match=r"no adapter named 'zz'.*\['r2', 'r3', 'v'\]"):
        adapters.switch(coll, "zz")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        adapters.delete(coll, "zz")
    with pytest.raises(TypeError, match="non-empty str"):
        adapters.add(coll, "", a, s)
    with pytest.raises(ValueError, match=r"state.trainable must be keyed by"):
        adapters.add(coll, "bad", a, states["r2"][1])
    with pytest.raises(TypeError, match="AdapterCollection"):
        adapters.switch({"v": s}, "v")


def _entry(coll, name):
    e = coll.adapters[name]
    return e.trainable


def test_add_weighted_concatenate_equals_the_float64_formula(dict_setup):
    params, coll, _ = dict_setup
    weights = {"r2": 0.7, "r3": -0.4}
    c = adapters.add_weighted(coll, "mix", weights, combine=merge.adapters.concatenate,
                              activate=True)
    got = _materialize(adapters.active(c), params)
    for path in ("dense1", "dense2", "stack"):
        ref = f64(params[path]["kernel"])
        for n, w in weights.items():
            t = _entry(coll, n)[f"{path}/kernel"]
            ref = ref + w * SCALE[n] * f64(t.a) @ f64(t.b)
        np.testing.assert_allclose(f64(got[path]["kernel"]), ref, **MATMUL_F32)
    assert c.adapters["mix"].trainable["stack/kernel"].a.shape == (3, 8, 5)


def test_add_weighted_linear_is_peft_formula(dict_setup):
    params, coll, states = dict_setup
    a, _ = states["r2"]
    c = adapters.add(coll, "r2b", a, _random_state(a, params, 7))
    weights = {"r2": 0.25, "r2b": 0.64}
    c = adapters.add_weighted(c, "lin", weights, combine=merge.adapters.linear)
    got = _materialize(adapters.switch(c, "lin").adapters["lin"], params)
    for path in ("dense1", "stack"):
        ts = [_entry(c, n)[f"{path}/kernel"] for n in weights]
        big_a = sum(np.sqrt(w) * SCALE["r2"] * f64(t.a)
                    for w, t in zip(weights.values(), ts, strict=True))
        big_b = sum(np.sqrt(w) * f64(t.b) for w, t in zip(weights.values(), ts, strict=True))
        ref = f64(params[path]["kernel"]) + big_a @ big_b
        np.testing.assert_allclose(f64(got[path]["kernel"]), ref, **MATMUL_F32)
    # The combined adapter is a plain LoRA with scaling 1 on the same paths.
    assert sorted(c.adapters["lin"].assignment) == sorted(states["r2"][0])
    np.testing.assert_allclose(
        f64(c.adapters["lin"].trainable["dense2/kernel"].b),
        sum(np.sqrt(w) * f64(_entry(c, n)["dense2/kernel"].b)
            for n, w in weights.items()), **ELEMENTWISE_F32)


def test_add_weighted_errors(dict_setup, tiny_params):
    params, coll, _ = dict_setup
    with pytest.raises(ValueError, match=r"'v' targets \['dense1/kernel'\]"):
        adapters.add_weighted(coll, "m", {"r2": 1.0, "v": 1.0},
                              combine=merge.adapters.concatenate)
    with pytest.raises(ValueError, match="no adapter named 'q'"):
        adapters.add_weighted(coll, "m", {"q": 1.0}, combine=merge.adapters.concatenate)
    # 2 + 3 + 3 = 8 > min(6, 8) = 6 for dense1's (6, 8) kernel; a rank-4 SVD fits.
    c = adapters.add(coll, "r3b", *_with_state(coll, "r3", params))
    with pytest.raises(ValueError, match=r"'dense1/kernel' has rank 8 > min\(in, out\)"
                                         r" = 6.*svd_refactor"):
        adapters.add_weighted(c, "m", {"r2": 1.0, "r3": 1.0, "r3b": 1.0},
                              combine=merge.adapters.concatenate)
    svd = adapters.add_weighted(c, "m", {"r2": 1.0, "r3": 1.0, "r3b": 1.0},
                                combine=functools.partial(merge.adapters.svd_refactor,
                                                          rank=4))
    assert svd.adapters["m"].trainable["dense1/kernel"].a.shape == (6, 4)
    d = tree.assign(params, [tree.Rule(where=r"dense\d/kernel|stack/kernel",
                                       then=adapters.dora(2))], layout=tree.stacked("stack"))
    abstract = jax.eval_shape(lambda: adapters.init(d, jax.random.key(0), params))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    c = adapters.add(coll, "d", d, zeros)
    with pytest.raises(TypeError, match=r"'d' at 'dense1/kernel'.*LoRA-family"):
        adapters.add_weighted(c, "m", {"r2": 1.0, "d": 1.0},
                              combine=merge.adapters.concatenate)


def _with_state(coll, name, params):
    e = coll.adapters[name]
    return e.assignment, _random_state(e.assignment, params, 11)
