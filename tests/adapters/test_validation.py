"""Argument and state validation of the adapter factories: integer-like ranks,
positive alpha, state dtypes against the assignment, a bias mistaken for a
kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, inits, optim, train, tree

W = jnp.arange(48, dtype=jnp.float32).reshape(8, 6) / 48.0

# Every factory that takes a rank (or a count) and builds on an (8, 6) matrix.
RANKED = {
    "lora": lambda r: adapters.lora(r),
    "dora": lambda r: adapters.dora(r),
    "lora_xs": lambda r: adapters.lora_xs(r),
    "adalora": lambda r: adapters.adalora(r),
    "sora": lambda r: adapters.sora(r),
    "svfit": lambda r: adapters.svfit(r),
    "vera": lambda r: adapters.vera(r, max_in=8, max_out=6),
    "nola": lambda r: adapters.nola(r, r, r),
    "abba": lambda r: adapters.abba(r, r),
    "pissa": lambda r: inits.pissa(r),
    "olora": lambda r: inits.olora(r),
}


def _shapes(tree_):
    return jax.tree.map(lambda x: (tuple(x.shape), x.dtype.name), tree_)


@pytest.mark.parametrize("name", sorted(RANKED))
@pytest.mark.parametrize("rank", [np.int64(2), np.int32(2), np.uint8(2)],
                         ids=lambda r: type(r).__name__)
def test_numpy_integer_rank_is_a_rank(name, rank):
    make = RANKED[name]
    ad, ref = make(rank), make(2)
    assert repr(ad) == repr(ref)  # the rank is stored as a Python int
    if isinstance(ad, adapters.Adapter):
        got = jax.eval_shape(lambda k, w: ad.init(k, w), jax.random.key(0), W)
        want = jax.eval_shape(lambda k, w: ref.init(k, w), jax.random.key(0), W)
        assert _shapes(got) == _shapes(want)


def test_numpy_integer_rank_in_the_data_driven_inits_and_optimizers():
    assert repr(inits.lora_ga(np.int64(2))) == repr(inits.lora_ga(2))
    assert repr(inits.corda(np.int64(2))) == repr(inits.corda(2))
    assert repr(inits.lora_sb(np.int64(2), learning_rate=1e-3, total_steps=np.int64(10),
                              niter=np.int64(2))) == repr(
        inits.lora_sb(2, learning_rate=1e-3, total_steps=10, niter=2))
    params = {"w": W}
    for tx, ref in (
        (optim.galore(1e-2, rank=np.int64(2), update_proj_gap=np.int64(3)),
         optim.galore(1e-2, rank=2, update_proj_gap=3)),
        (optim.frugal(1e-2, density=0.5, update_gap=np.int64(3)),
         optim.frugal(1e-2, density=0.5, update_gap=3)),
    ):
        assert _shapes(tx.init(params)) == _shapes(ref.init(params))


@pytest.mark.parametrize("bad", [True, 2.0, "2", None])
def test_rank_that_is_not_an_integer_is_a_type_error(bad):
    with pytest.raises(TypeError, match=f"lora: rank must be a positive int, got {bad!r}"):
        adapters.lora(bad)
    with pytest.raises(TypeError, match="pissa: rank must be a positive int"):
        inits.pissa(bad)
    with pytest.raises(TypeError, match="rank must be an int"):
        optim.galore(1e-2, rank=bad)


@pytest.mark.parametrize("alpha", [0, 0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("make", [
    lambda a: adapters.lora(2, alpha=a),
    lambda a: adapters.lora(2, alpha=a, scaling=adapters.Scaling.ALPHA_OVER_SQRT_RANK),
    lambda a: adapters.dora(2, alpha=a),
    lambda a: adapters.lora_xs(2, alpha=a),
    lambda a: adapters.sora(2, alpha=a),
    lambda a: adapters.nola(2, 2, 2, alpha=a),
    lambda a: adapters.adalora(2, alpha=a),
    lambda a: adapters.abba(2, 2, alpha=a),
    lambda a: inits.pissa(2, alpha=a),
    lambda a: inits.lora_sb(2, alpha=a, learning_rate=1e-3, total_steps=10),
], ids=["lora", "rslora", "dora", "lora_xs", "sora", "nola", "adalora", "abba", "pissa",
        "lora_sb"])
def test_alpha_not_positive_is_rejected(make, alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got alpha="):
        make(alpha)


def test_alpha_is_ignored_without_an_alpha_scaling():
    ad = adapters.lora(2, alpha=0.0, scaling=adapters.Scaling.NONE)
    t, _ = ad.init(jax.random.key(0), W)
    t = t._replace(b=jnp.ones_like(t.b))
    np.testing.assert_allclose(ad.apply(W, t, None), W + t.a @ t.b, rtol=1e-6, atol=1e-6)
    assert adapters.scaling_value(adapters.Scaling.ALPHA_OVER_RANK, 4.0, 2) == 2.0
    with pytest.raises(ValueError, match="alpha"):
        adapters.scaling_value(adapters.Scaling.ALPHA_OVER_RANK, -4.0, 2)


def _lora_problem():
    params = {"attn": {"q": {"kernel": W}}, "norm": {"scale": jnp.ones(6)}}
    plan = tree.assign(params, [tree.Rule(where="attn/q/kernel", then=adapters.lora(2))])
    return params, plan, adapters.init(plan, jax.random.key(0), params)


@pytest.mark.parametrize("fn", ["materialize", "fold", "train_step"])
def test_state_dtype_other_than_param_dtype_is_an_error(fn):
    params, plan, state = _lora_problem()
    f16 = jax.tree.map(lambda x: x.astype(jnp.float16), state.trainable)
    msg = (r"trainable state for 'attn/q/kernel', field 'a', has dtype float16, but "
           r"lora\(rank=2.*\) makes it float32 \(its param_dtype\)")
    with pytest.raises(TypeError, match=msg):
        if fn == "materialize":
            adapters.materialize(plan, params, f16, state.frozen)
        elif fn == "fold":
            adapters.fold(plan, params, f16, state.frozen)
        else:
            t = train.trainer(lambda p, b: jnp.sum(p["attn"]["q"]["kernel"] ** 2),
                              optax.sgd(0.1), adapters=plan)
            s = t.init(jax.random.key(0), params,
                       state=adapters.AdapterState(f16, state.frozen))
            t.step(s, None, params)
    # the same state in the assignment's dtype is fine, and so is an f16 adapter
    adapters.materialize(plan, params, state.trainable, state.frozen)
    plan16 = tree.assign(params, [tree.Rule(where="attn/q/kernel",
                                            then=adapters.lora(2, param_dtype=jnp.float16))])
    adapters.materialize(plan16, params, f16, state.frozen)


@pytest.mark.parametrize("rule", ["dense/bias", "dense/.*"])
def test_ia3_on_a_bias_says_to_target_the_kernel(rule):
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    plan = tree.assign(params, [tree.Rule(where=rule, then=adapters.ia3())])
    with pytest.raises(ValueError) as err:
        adapters.init(plan, jax.random.key(0), params)
    msg = str(err.value)
    assert "'dense/bias' (shape (3,), dtype float32), which is itself a bias leaf" in msg
    assert "Target the kernel ('dense/kernel')" in msg
    assert "as the bias of 'dense/bias'" not in msg  # no self-reference
    ok = tree.assign(params, [tree.Rule(where="dense/kernel", then=adapters.ia3())])
    state = adapters.init(ok, jax.random.key(0), params)
    assert set(state.trainable) == {"dense/kernel"}
