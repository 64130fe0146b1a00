"""train.cola: COLA's chain of LoRA (train, merge, re-initialise, reset optimizer state)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, train, tree

D = 6


@functools.cache
def _problem():
    """A regression whose target is the base plus a rank-3 change (known spectrum),
    and one trainer for every test (one compile of its step)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((D, D)).astype(np.float32) * 0.3
    u, _ = np.linalg.qr(rng.standard_normal((D, D)))
    v, _ = np.linalg.qr(rng.standard_normal((D, D)))
    sigma = np.array([3.0, 2.0, 1.0])
    change = (u[:, :3] * sigma) @ v[:, :3].T
    target = jnp.asarray(w0 + change, jnp.float32)
    params = {"w": jnp.asarray(w0)}
    assignment = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(1))])

    def loss_fn(p, x):  # x = I: the loss is ||W - W*||_F^2 / D^2
        return jnp.mean((x @ p["w"] - x @ target) ** 2)

    t = train.trainer(loss_fn, optax.adam(0.05), adapters=assignment, donate=False)
    return t, params, assignment, loss_fn, target, sigma


def test_one_link_is_lora_then_fold_and_each_link_restarts():
    t, params, assignment, loss_fn, _, _ = _problem()
    key = jax.random.key(3)
    batches = [jnp.eye(D)] * 20
    r = train.cola(t, params, batches, key=key, cycles=[12, 8], progress=False,
                   keep_bases=True)

    # Link 0 by hand: plain LoRA training, then adapters.fold.
    s = t.init(jax.random.fold_in(key, 0), params)
    for b in batches[:12]:
        s, _ = t.step(s, b, params)
    merged = adapters.fold(assignment, params, s.trainable, s.frozen)
    np.testing.assert_array_equal(r.bases[1]["w"], merged["w"])
    # Link 1 by hand: fresh adapters (B = 0) and optimizer state on the merged base.
    s = t.init(jax.random.fold_in(key, 1), merged)
    np.testing.assert_array_equal(s.trainable["w"].b, 0.0)
    assert int(s.opt_state[0].count) == 0
    for b in batches[12:]:
        s, _ = t.step(s, b, merged)
    final = adapters.fold(assignment, merged, s.trainable, s.frozen)
    np.testing.assert_array_equal(r.params["w"], final["w"])
    assert r.bases[-1] is r.params and r.bases[0] is params
    assert int(r.state.step) == 8 and int(r.state.opt_state[0].count) == 8
    assert [row["step"] for row in r.history] == list(range(1, 21))
    assert [row["cycle"] for row in r.history] == [0] * 12 + [1] * 8
    # The restart does not move the model: the first loss of link 1 is the loss
    # of the merged base.
    assert r.history[12]["loss"] == pytest.approx(float(loss_fn(merged, jnp.eye(D))), rel=1e-6)


def test_chain_goes_past_the_rank_of_one_link_and_the_loss_keeps_falling():
    t, params, _, loss_fn, target, sigma = _problem()
    evals = []
    r = train.cola(t, params, iter([jnp.eye(D)] * 10**4), key=jax.random.key(0),
                   cycles=[150] * 3, progress=False, keep_bases=True,
                   eval_fn=lambda p: evals.append(p["w"]) or {"loss": loss_fn(p, jnp.eye(D))})
    ends = [float(loss_fn(b, jnp.eye(D))) for b in r.bases]
    assert all(a > b for a, b in zip(ends, ends[1:], strict=False)), ends
    for j, (before, after) in enumerate(zip(r.bases, r.bases[1:], strict=False)):
        step = np.asarray(after["w"] - before["w"], np.float64)
        s = np.linalg.svd(step, compute_uv=False)
        assert s[1] < 1e-4 * s[0]  # each knot: a rank-1 change of the base ...
        assert s[0] == pytest.approx(sigma[j], rel=1e-3)  # ... the residual's top direction
    total = np.linalg.svd(np.asarray(r.params["w"] - params["w"], np.float64),
                          compute_uv=False)
    assert total[2] > 0.5  # the chain: rank 3
    # No rank-1 update of W0 gets below the Eckart-Young floor; the chain does.
    floor = float(np.sum(sigma[1:] ** 2)) / D**2
    assert ends[1] >= floor * 0.999
    assert ends[-1] < floor / 10
    np.testing.assert_allclose(r.params["w"], target, atol=0.05)
    # eval_fn saw the effective tree of each link (on that link's base).
    assert len(evals) == 3 and [e["step"] for e in r.fits[0].evals] == [150]
    np.testing.assert_allclose(evals[-1], r.params["w"], atol=1e-6)


def test_batches_continue_across_links_and_bad_arguments():
    t, params, _, loss_fn, _, _ = _problem()
    drawn = []

    def gen():
        for i in range(100):
            drawn.append(i)
            yield jnp.eye(D) * (1.0 + i)

    r = train.cola(t, params, gen(), key=jax.random.key(0), cycles=[3, 2], progress=False)
    assert drawn == list(range(5)) and len(r.fits) == 2
    # A finite iterable that runs out ends the chain after its last link.
    r = train.cola(t, params, [jnp.eye(D)] * 4, key=jax.random.key(0), cycles=[3, 3, 3],
                   progress=False)
    assert [f.step for f in r.fits] == [3, 1] and r.bases is None
    with pytest.raises(ValueError, match="cycles"):
        train.cola(t, params, [], key=jax.random.key(0), cycles=[])
    with pytest.raises(ValueError, match=r"cycles\[1\]"):
        train.cola(t, params, [], key=jax.random.key(0), cycles=[2, 0])
    with pytest.raises(TypeError, match="train.Trainer"):
        train.cola(loss_fn, params, [], key=jax.random.key(0), cycles=[1])
