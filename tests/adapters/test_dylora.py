"""DyLoRA (peftjax.adapters.dylora): the authors' truncation (outputs and gradients at
several ranks, all-components and frozen updates), rank changes without retracing,
evaluation at rank b as a rank-b LoRA, the rank sampler and setter."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "dylora" / "dylora.npz"


def ref_dylora(w, t, f, alpha=6.0):
    """float64 ``W0 + (α/b)·a[:, :b] @ b_[:b]`` (the contract suite's reference)."""
    b = int(f.rank)
    return h.f64(w) + alpha / b * h.f64(t.a)[:, :b] @ h.f64(t.b)[:b]


@pytest.mark.parametrize("frozen", [False, True])
def test_dylora_matches_the_authors_truncation(frozen):
    g = dict(np.load(GOLDEN))
    with jax.enable_x64(True):
        w = jnp.asarray(g["weight"].T)
        ad = adapters.dylora(4, alpha=6.0, frozen=frozen, param_dtype=jnp.float64)
        t = adapters.DyLoRAParams(a=jnp.asarray(g["lora_A"].T), b=jnp.asarray(g["lora_B"].T))
        x, target = jnp.asarray(g["x"]), jnp.asarray(g["target"])
        traces = {"n": 0}

        @jax.jit
        def run(t, f):
            traces["n"] += 1

            def loss(t):
                y = x @ ad.apply(w, t, f)
                return jnp.mean((y - target) ** 2), y

            return jax.grad(loss, has_aux=True)(t)

        for b in (1, 2, 4):
            tag = f"b{b}_{'frozen' if frozen else 'all'}"
            grads, y = run(t, adapters.DyLoRARank(jnp.asarray(b, jnp.int32)))
            np.testing.assert_allclose(np.asarray(y), g[f"{tag}/y"], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(grads.a), g[f"{tag}/grad_A"].T,
                                       rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(np.asarray(grads.b), g[f"{tag}/grad_B"].T,
                                       rtol=1e-10, atol=1e-14)
            # only the first b components learn (only the b-th when frozen)
            learn = np.flatnonzero(np.any(np.asarray(grads.a) != 0, axis=0))
            assert list(learn) == ([b - 1] if frozen else list(range(b)))
        assert traces["n"] == 1  # b is frozen data, not a static argument


def test_dylora_at_rank_b_is_a_rank_b_lora_in_every_path():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
    params = {"w": w}
    ad = adapters.dylora(4, alpha=8.0)
    a = tree.assign(params, [tree.Rule(where="w", then=ad)])
    s = jax.jit(lambda k: adapters.init(a, k, params))(jax.random.key(0))
    rng = np.random.default_rng(1)
    t = adapters.DyLoRAParams(jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
                              jnp.asarray(rng.standard_normal((4, 5)), jnp.float32))
    s = s._replace(trainable={"w": t})
    assert int(s.frozen["w"].rank) == 4  # evaluation at full rank after init
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)

    @jax.jit
    def at_rank(s, b):
        s = adapters.dylora_set_rank(s, b)
        folded = adapters.fold(a, params, *s)["w"]
        factored = x @ w + ad.factored.terms(w, s.trainable["w"], s.frozen["w"]).delta(x)
        return folded, factored

    folded, factored = at_rank(s, jnp.asarray(2, jnp.int32))
    lora2 = adapters.lora(2, alpha=8.0).apply(w, adapters.LoRAParams(t.a[:, :2], t.b[:2]), None)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(lora2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(factored), np.asarray(x @ lora2), rtol=1e-5,
                               atol=1e-5)


def test_dylora_rank_sampler_and_setter():
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: adapters.dylora_sample_rank(k, 4, r_min=2)))(
        keys))
    assert set(draws.tolist()) == {2, 3, 4}
    ad = adapters.dylora(3, dimension_numbers=tree.dims.stacked())
    frozen = {"s": adapters.DyLoRARank(jnp.full((2,), 3, jnp.int32)),
              "t": adapters.DyLoRARank(jnp.asarray(3, jnp.int32)), "other": None}
    b = jnp.asarray(1, jnp.int32)
    new = adapters.dylora_set_rank(frozen, b)
    np.testing.assert_array_equal(np.asarray(new["s"].rank), [1, 1])
    assert new["t"].rank is not b  # its own buffer: a donating step may delete it
    assert new["other"] is None and ad.hyperparameters[0] == ("rank", 3)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        adapters.dylora_set_rank(frozen, 0)
    with pytest.raises(TypeError, match="integer"):
        adapters.dylora_set_rank(frozen, 1.5)
    with pytest.raises(ValueError, match="no DyLoRA entry"):
        adapters.dylora_set_rank({"w": None}, 1)
    with pytest.raises(ValueError, match="need r_min <= r_max"):
        adapters.dylora_sample_rank(keys[0], 2, r_min=3)
