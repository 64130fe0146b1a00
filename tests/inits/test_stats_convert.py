"""Statistics helpers (streaming gradients, covariances), export to plain LoRA, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, inits, tree
from peftjax.inits import _stats
from tests.helpers import MATMUL_F32, f64

D, BIG = 128, 256


def mlp_params():
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)  # noqa: E731
    return {"l1": {"kernel": n(D, D)}, "l2": {"kernel": n(D, D)},
            "big": {"kernel": n(D, BIG)}}


def loss_fn(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"])
    h = jnp.tanh(h @ p["l2"]["kernel"])
    return jnp.mean((h @ p["big"]["kernel"]) ** 2)


def test_accumulate_equals_sum_of_grads_and_offload():
    p = mlp_params()
    xs = [jnp.asarray(np.random.default_rng(i).standard_normal((2, D)), jnp.float32)
          for i in range(3)]
    targets = ["l1/kernel", "l2/kernel"]
    g = inits.accumulate_gradients(loss_fn, p, xs, targets)
    gm = inits.accumulate_gradients(loss_fn, p, xs, targets, mean=True, offload=True)
    ref = [jax.grad(loss_fn)(p, x) for x in xs]
    for t in targets:
        a, b = t.split("/")
        want = sum(f64(r[a][b]) for r in ref)
        np.testing.assert_allclose(f64(g[t]), want, **MATMUL_F32)
        np.testing.assert_allclose(f64(gm[t]), want / 3, **MATMUL_F32)
    assert set(g) == set(targets)


def test_accumulate_step_memory_holds_one_batch_of_targeted_grads():
    """argument + output + temp - alias of the jitted step.

    See docs/architecture.md#measuring-on-a-shared-cpu.
    """
    p = mlp_params()
    x = jnp.ones((1, D), jnp.float32)
    targets = ["l1/kernel", "l2/kernel"]
    tgt_bytes = 2 * D * D * 4
    param_bytes = tgt_bytes + D * BIG * 4
    acc = {t: jnp.zeros((D, D), jnp.float32) for t in targets}

    def add(acc, base, batch):
        flat = tree.leaves_by_path(base)
        t = {k: flat[k] for k in targets}
        g = jax.grad(lambda tt: loss_fn(tree.map_with_path(lambda q, v: tt.get(q, v), base),
                                        batch))(t)
        return {k: acc[k] + g[k] for k in targets}

    m = jax.jit(add, donate_argnums=0).lower(acc, p, x).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    slack = 64 * 1024  # activations of one token and XLA scratch
    # params + running sum + one batch's targeted gradients, no more:
    assert total <= param_bytes + 2 * tgt_bytes + slack, (total, m)
    # in particular no gradient of the untargeted 'big' kernel (D*BIG*4 = 128 KiB)
    assert total < param_bytes + 2 * tgt_bytes + D * BIG * 4
    assert m.alias_size_in_bytes == tgt_bytes  # the running sum is updated in place
    # the helper uses the same step: its result equals this one's
    got = inits.accumulate_gradients(loss_fn, p, [x], targets)
    want = jax.jit(add)(acc, p, x)
    for t in targets:
        np.testing.assert_allclose(f64(got[t]), f64(want[t]), **MATMUL_F32)
    assert _stats.accumulate_gradients.__doc__.count("Memory") == 1


def test_covariances_scan_over_stacked_layers():
    rng = np.random.default_rng(0)
    L = 3
    w = jnp.asarray(rng.standard_normal((L, 6, 6)) * 0.3, jnp.float32)
    params = {"layers": {"kernel": w}}
    xs = [jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32) for _ in range(2)]

    def apply_fn(p, x):
        def body(h, k):
            return jnp.tanh(h @ k), None
        return jax.lax.scan(body, x, p["layers"]["kernel"])[0]

    cov = inits.collect_covariances(apply_fn, params, xs, ["layers/kernel"],
                                    transform=factored.transform)["layers/kernel"]
    assert cov.shape == (L, 6, 6)
    want = np.zeros((L, 6, 6))
    for x in xs:
        h = f64(x)
        for i in range(L):
            hm = h.reshape(-1, 6)
            hm = hm / abs(hm.max())
            want[i] += hm.T @ hm
            h = np.tanh(h @ f64(w[i]))
    np.testing.assert_allclose(f64(cov), want / 2, rtol=1e-4, atol=1e-5)  # tanh chain in f32


@pytest.mark.parametrize("make", [
    lambda: inits.pissa(2, alpha=4.0), lambda: inits.olora(2),
    lambda: inits.lora_ga(2, alpha=4.0, scaling=adapters.Scaling.ALPHA_OVER_SQRT_RANK),
    lambda: inits.corda(2), lambda: inits.lora_sb(2, learning_rate=1e-2)])
def test_to_lora_reproduces_trained_model_over_unmodified_base(make):
    ini = make()
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}
    stats = {"gradient": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
             "covariance": jnp.eye(8, dtype=jnp.float32), None: None}[ini.stats]
    plan = tree.assign(p, [tree.Rule(where="w", then=ini)])
    res = inits.run(plan, jax.random.key(0), p, stats=None if stats is None else {"w": stats})
    trained = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), res.state.trainable)
    asg, st = inits.to_lora(plan, res.state.trainable, trained, res.state.frozen)
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    y_trained = x @ adapters.fold(res.assignment, res.params, trained, res.state.frozen)["w"]
    y_export = x @ adapters.fold(asg, p, *st)["w"]
    np.testing.assert_allclose(f64(y_export), f64(y_trained), rtol=1e-5, atol=1e-5)
    r = st.trainable["w"].a.shape[-1]
    assert r == (4 if ini.modifies_base else 2)


def test_errors_name_path_shape_and_argument():
    p = {"w": jnp.ones((4, 3), jnp.float32)}

    def plan(ini):
        return tree.assign(p, [tree.Rule(where="w", then=ini)])

    with pytest.raises(ValueError, match=r"'w'.*\(4, 3\).*rank=5 exceeds min\(in, out\)=3"):
        inits.run(plan(inits.pissa(5)), jax.random.key(0), p)
    with pytest.raises(ValueError, match=r"2·rank=4 exceeds"):
        inits.run(plan(inits.lora_ga(2)), jax.random.key(0), p, stats={"w": jnp.ones((4, 3))})
    with pytest.raises(ValueError, match=r"needs gradient statistics.*no entry for 'w'"):
        inits.run(plan(inits.lora_sb(1, learning_rate=1e-3)), jax.random.key(0), p)
    with pytest.raises(ValueError, match=re.escape("expected (4, 4)")):
        inits.run(plan(inits.corda(1)), jax.random.key(0), p, stats={"w": jnp.eye(3)})
    with pytest.raises(ValueError, match=r"gradient statistic has shape \(3, 4\)"):
        inits.run(plan(inits.lora_ga(1)), jax.random.key(0), p, stats={"w": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"1 non-finite"):
        inits.run(plan(inits.lora_ga(1)), jax.random.key(0), p,
                  stats={"w": jnp.ones((4, 3)).at[0, 0].set(jnp.nan)})
    with pytest.raises(ValueError, match="takes no statistics"):
        inits.run(plan(inits.pissa(1)), jax.random.key(0), p, stats={"w": jnp.ones((4, 3))})
    with pytest.raises(ValueError, match="mode must be"):
        inits.corda(1, mode="xpm")
    with pytest.raises(ValueError, match="scale for variant='official'"):
        inits.lora_ga(1, scale="gd_scale")
    with pytest.raises(TypeError, match="rank must be a positive int"):
        inits.pissa(1.5)
    with pytest.raises(ValueError, match="never multiplied"):
        inits.collect_covariances(lambda q, x: jnp.sum(x), p, [jnp.ones((1, 4))], ["w"],
                                  transform=factored.transform)
    with pytest.raises(ValueError, match="no batch"):
        inits.accumulate_gradients(lambda q, x: jnp.sum(q["w"]), p, [], ["w"])
