"""Shared adapter arrays: one array in the state, one gradient summed over its users."""

import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, factored, train, tree
from peftjax.io import checkpoint
from tests import helpers as h


def _params():
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32)

    # A scanned stack of two layers and an unstacked head: three matrices in all.
    return {"layers": {"kernel": normal(2, 4, 4)}, "head": {"kernel": normal(4, 2)}}


def _model(p, x):
    def layer(h_, w):
        return jnp.tanh(h_ @ w), None

    hid, _ = jax.lax.scan(layer, x, p["layers"]["kernel"])
    return hid @ p["head"]["kernel"]


def _x():
    return jnp.asarray(np.random.default_rng(5).standard_normal((3, 4)), jnp.float32)


@pytest.fixture(scope="module")
def setup():
    params = _params()
    ad = adapters.vblora(2, num_vectors=5, vector_length=2, topk=2)
    a = tree.assign(params, [tree.Rule(where=".*kernel", then=ad)])
    return params, a, adapters.init(a, jax.random.key(0), params)


def test_the_bank_lives_once(setup):
    params, a, s = setup
    assert set(s.trainable) == {"layers/kernel", "head/kernel", adapters.SHARED}
    assert set(s.trainable[adapters.SHARED]) == {"vblora"}
    assert s.trainable["head/kernel"].bank == adapters.Shared("vblora")
    bank = s.trainable[adapters.SHARED]["vblora"]
    assert bank.shape == (5, 2)
    np.testing.assert_array_less(np.abs(np.asarray(bank)), 0.02)
    # logits: 2 layers x (2*2*5 + 2*2*5) + head (2*2*5 + 1*2*5); bank 5*2 once.
    assert adapters.num_trainable(s.trainable) == 2 * 40 + 30 + 10
    # describe counts it once too, on its own row.
    table = str(tree.describe(a, params))
    assert "@shared/vblora  (5, 2)" in table and "trainable params: 120 " in table
    # Optimizers see the bank once.
    opt = optax.adam(1e-2).init(s.trainable)
    assert len(jax.tree.leaves(opt[0].mu)) == 2 * 2 + 1


def _copies_loss(params, a, s, x):
    """Loss with an independent copy of the bank per leaf (the reference)."""
    def loss(banks, logits):
        p = dict(params)
        out = {}
        for (path, ad), bank in zip(a.items(), banks, strict=True):
            t = logits[path]._replace(bank=bank)
            if path == "layers/kernel":
                t = t._replace(bank=jnp.broadcast_to(bank, (2,) + bank.shape))
            out[path] = ad.apply(tree.leaves_by_path(params)[path], t, None)
        p = {"layers": {"kernel": out["layers/kernel"]},
             "head": {"kernel": out["head/kernel"]}}
        return jnp.sum(_model(p, x) ** 2)
    return loss


def test_gradient_of_the_bank_is_the_sum_over_its_users(setup):
    params, a, s = setup
    x = _x()
    bank = s.trainable[adapters.SHARED]["vblora"]

    def loss(t):
        return jnp.sum(_model(adapters.materialize(a, params, t, s.frozen), x) ** 2)

    g = jax.jit(jax.grad(loss))(s.trainable)
    logits = {p: s.trainable[p] for p in a}
    per_copy = jax.jit(jax.grad(_copies_loss(params, a, s, x)))([bank, bank], logits)
    np.testing.assert_allclose(h.f64(g[adapters.SHARED]["vblora"]),
                               h.f64(per_copy[0]) + h.f64(per_copy[1]), **h.MATMUL_F32)
    assert float(jnp.abs(per_copy[0]).max()) > 0 and float(jnp.abs(per_copy[1]).max()) > 0
    assert g["head/kernel"].bank == adapters.Shared("vblora")


def test_factored_equals_materialize_on_scanned_layers_without_fallback(setup):
    params, a, s = setup
    x = _x()

    def loss_m(t):
        return jnp.sum(_model(adapters.materialize(a, params, t, s.frozen), x) ** 2)

    def loss_f(t):
        return jnp.sum(factored.transform(_model, a, t, s.frozen)(params, x) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vf, gf = jax.jit(jax.value_and_grad(loss_f))(s.trainable)
    vm, gm = jax.jit(jax.value_and_grad(loss_m))(s.trainable)
    np.testing.assert_allclose(float(vf), float(vm), **h.MATMUL_F32)
    h.assert_tree_allclose(gf, gm, **h.MATMUL_F32)


def test_fold_unfold_and_unstacked_layout_agree(setup):
    params, a, s = setup
    folded = adapters.fold(a, params, *s)
    back = adapters.unfold(a, folded, *s)
    h.assert_tree_allclose(back, params, **h.MATMUL_F32)
    # The unrolled layout of the same state gives the same folded layers.
    flat_p = tree.unstack_layers(tree.leaves_by_path(params))
    trainable = tree.unstack_layers(dict(s.trainable))
    assert trainable[adapters.SHARED] is s.trainable[adapters.SHARED]
    a_u = tree.assign(flat_p, [tree.Rule(where=".*kernel", then=a["head/kernel"])])
    frozen = {p: None for p in a_u}  # VB-LoRA has nothing frozen
    folded_u = adapters.fold(a_u, flat_p, trainable, frozen)
    for i in range(2):
        np.testing.assert_allclose(h.f64(folded_u[f"layers/{i}/kernel"]),
                                   h.f64(folded["layers"]["kernel"][i]), **h.MATMUL_F32)


def test_trainer_updates_the_one_bank_and_checkpoints_it(setup):
    params, a, s = setup
    x = _x()
    y = jnp.asarray(np.random.default_rng(6).standard_normal((3, 2)), jnp.float32)

    def loss(p, batch):
        return jnp.mean((_model(p, batch["x"]) - batch["y"]) ** 2)

    t = train.trainer(loss, optax.adam(5e-2), adapters=a, donate=False)
    state = t.init(jax.random.key(0), params)
    bank0 = np.array(state.trainable[adapters.SHARED]["vblora"])
    losses = []
    for _ in range(4):
        state, m = t.step(state, {"x": x, "y": y}, params)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert np.any(np.array(state.trainable[adapters.SHARED]["vblora"]) != bank0)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, 4, {"trainable": state.trainable})
        back = checkpoint.restore(d, {"trainable": state.trainable})
    h.assert_tree_allclose(back["trainable"], state.trainable, **h.EXACT)
    assert back["trainable"]["head/kernel"].bank == adapters.Shared("vblora")


def test_state_errors_name_the_shared_array(setup):
    params, a, s = setup
    no_bank = {p: v for p, v in s.trainable.items() if p != adapters.SHARED}
    with pytest.raises(ValueError, match=r"'@shared'.*\[\].*\['vblora'\]"):
        adapters.materialize(a, params, no_bank, s.frozen)
    wrong = dict(s.trainable)
    wrong[adapters.SHARED] = {"vblora": jnp.zeros((5, 3))}
    with pytest.raises(ValueError, match=r"'vblora'\] has shape \(5, 3\).*\(5, 2\)"):
        adapters.materialize(a, params, wrong, s.frozen)
    other = adapters.vblora(2, num_vectors=6, vector_length=2)
    mixed = tree.assign(params, [tree.Rule(where="head/kernel", then=other),
                                 tree.Rule(where=".*kernel", then=a["head/kernel"])])
    with pytest.raises(ValueError, match="disagree on its hyperparameters"):
        adapters.init(mixed, jax.random.key(0), params)
    with pytest.raises(TypeError, match="has no shared arrays"):
        adapters.unshare(adapters.lora(2))


def test_separate_banks_by_name_and_unshare():
    params = _params()
    rules = [tree.Rule(where="head/kernel", then=adapters.vblora(
                 2, num_vectors=6, vector_length=2, bank="head")),
             tree.Rule(where=".*kernel", then=adapters.vblora(
                 2, num_vectors=5, vector_length=2))]
    s = adapters.init(tree.assign(params, rules), jax.random.key(0), params)
    assert {k: v.shape for k, v in s.trainable[adapters.SHARED].items()} == {
        "head": (6, 2), "vblora": (5, 2)}
    u = adapters.unshare(adapters.vblora(2, num_vectors=5, vector_length=2))
    us = u.with_dimension_numbers(tree.dims.stacked())
    t, f = us.init(jax.random.key(1), params["layers"]["kernel"])
    assert f is None and t.bank.shape == (2, 5, 2)  # a private bank per layer
    np.testing.assert_array_equal(np.asarray(t.bank[0]), np.asarray(t.bank[1]))
