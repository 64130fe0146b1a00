"""A non-finite batch is skipped by the adapter-only and hybrid steps.

Each test trains a tiny model twice: once on a clean batch sequence, once on
the same sequence with a bad batch inserted in the middle. The skipped step
must leave no trace: the final trainable tree and optimizer state equal the
clean run's exactly (the update is not applied, so there is nothing to round).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, optim, tree
from tests import helpers as h

BAD_AT = 2  # the bad batch is the third call


def _params():
    rng = np.random.default_rng(0)

    def n(*s):
        return jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)

    return {"attn": {"q": {"kernel": n(6, 6)}},
            "mlp": {"up": {"kernel": n(6, 8)}, "down": {"kernel": n(8, 6)}},
            "head": {"kernel": n(6, 3)}}


def _batches(n=4):
    rng = np.random.default_rng(1)
    return [(jnp.asarray(rng.standard_normal((5, 6)), jnp.float32),
             jnp.asarray(rng.integers(0, 3, 5), jnp.int32),
             jnp.ones([], jnp.float32)) for _ in range(n)]


def _loss(p, batch):
    x, y, c = batch
    hdn = jnp.tanh(x @ p["attn"]["q"]["kernel"])
    hdn = hdn + jax.nn.gelu(hdn @ p["mlp"]["up"]["kernel"]) @ p["mlp"]["down"]["kernel"]
    ce = optax.softmax_cross_entropy_with_integer_labels(hdn @ p["head"]["kernel"], y)
    # sqrt(|x q| + c): finite loss everywhere, but an infinite slope at 0 when c = 0.
    return ce.mean() + 1e-3 * jnp.mean(jnp.sqrt(jnp.abs(x @ p["attn"]["q"]["kernel"]) + c))


def _nan_loss_batch(like):
    x, y, c = like
    return x.at[0, 0].set(jnp.nan), y, c


def _nan_grad_batch(like):
    """Finite loss, NaN gradient: zero inputs hit sqrt's infinite slope at 0."""
    x, y, _ = like
    return jnp.zeros_like(x), y, jnp.zeros([], jnp.float32)


def _run(step, trainable, opt_state, params, frozen, batches):
    skipped = []
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        for b in batches:
            trainable, opt_state, _, metrics = step(trainable, opt_state, params,
                                                    frozen, b)
            skipped.append(int(metrics["skipped"]))
    return trainable, opt_state, skipped


def _with_bad(batches, bad):
    return batches[:BAD_AT] + [bad(batches[BAD_AT])] + batches[BAD_AT:]


def _has_nan(t):
    return any(np.isnan(h.f64(x)).any() for x in jax.tree.leaves(t))


def _adapter_setup():
    params = _params()
    a = tree.assign(params, [tree.Rule(where=r"attn/q/kernel|mlp/up/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    state = adapters.init(a, jax.random.key(0), params)
    return params, a, state


@pytest.mark.parametrize("bad", [_nan_loss_batch, _nan_grad_batch],
                         ids=["nan_loss", "nan_grad_finite_loss"])
def test_adapter_step_skips_a_bad_batch(bad):
    params, a, state = _adapter_setup()
    opt = optax.adam(3e-2)
    step = jax.jit(adapters.make_train_step(a, _loss, opt, return_metrics=True))
    o0 = opt.init(state.trainable)
    batches = _batches()
    with jax.numpy_dtype_promotion("standard"):
        loss = _loss(adapters.materialize(a, params, *state), bad(batches[0]))
    assert np.isfinite(float(loss)) == (bad is _nan_grad_batch)

    t_ref, o_ref, s_ref = _run(step, state.trainable, o0, params, state.frozen, batches)
    t, o, s = _run(step, state.trainable, o0, params, state.frozen,
                   _with_bad(batches, bad))
    assert s_ref == [0, 0, 0, 0] and s == [0, 0, 1, 0, 0]
    h.assert_tree_allclose(t, t_ref, **h.EXACT)
    h.assert_tree_allclose(o, o_ref, **h.EXACT)  # Adam's count and moments too
    assert not _has_nan((t, o))


def test_adapter_step_without_skipping_lets_nan_through():
    params, a, state = _adapter_setup()
    opt = optax.adam(3e-2)
    step = jax.jit(adapters.make_train_step(a, _loss, opt, skip_nonfinite=False,
                                            return_metrics=True))
    t, o, s = _run(step, state.trainable, opt.init(state.trainable), params,
                   state.frozen, _with_bad(_batches(), _nan_loss_batch))
    assert s == [0] * 5 and _has_nan(t) and _has_nan(o)


def test_default_step_keeps_its_three_outputs_and_skips():
    params, a, state = _adapter_setup()
    opt = optax.sgd(0.1)
    step = jax.jit(adapters.make_train_step(a, _loss, opt))
    with jax.numpy_dtype_promotion("standard"):
        out = step(state.trainable, opt.init(state.trainable), params, state.frozen,
                   _nan_loss_batch(_batches(1)[0]))
    assert len(out) == 3 and np.isnan(float(out[2]))
    h.assert_tree_allclose(out[0], state.trainable, **h.EXACT)


def _hybrid_setup():
    """LoRA on q, GaLore (rank 2, refresh every 2 steps) on the MLP, Adam on the head."""
    params = _params()
    a = tree.assign(params, [tree.Rule(where=r"attn/q/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    state = adapters.init(a, jax.random.key(0), params)
    t = adapters.hybrid_init(state, params, [tree.Rule(where=r"mlp/.*|head/.*",
                                                      then=True)])
    labels = adapters.hybrid_labels(
        t, full=lambda p: "galore" if p.startswith("mlp") else "adam")
    opt = optax.partition({
        "adapters": optax.adam(3e-2),
        "adam": optax.adam(3e-2),
        "galore": optim.galore(3e-2, rank=2, update_proj_gap=BAD_AT,
                               inner=optim.scale_by_adam_hf()),
    }, labels)
    return params, a, state, t, opt


def _galore_state(o):
    return o.inner_states["galore"].inner_state[0]


def test_hybrid_step_skips_a_nan_batch_on_a_galore_refresh():
    params, a, state, t0, opt = _hybrid_setup()
    step = jax.jit(adapters.make_hybrid_train_step(a, _loss, opt, return_metrics=True))
    o0 = opt.init(t0)
    batches = _batches()
    # The bad batch arrives when GaLore's count is BAD_AT: a refresh step.
    t_ref, o_ref, _ = _run(step, t0, o0, params, state.frozen, batches)
    t, o, s = _run(step, t0, o0, params, state.frozen, _with_bad(batches, _nan_loss_batch))
    assert s == [0, 0, 1, 0, 0]
    h.assert_tree_allclose(t, t_ref, **h.EXACT)
    h.assert_tree_allclose(o, o_ref, **h.EXACT)  # projector, moments, counts
    assert int(_galore_state(o).count) == len(batches)

    # Without skipping, the NaN reaches the weights and the moments.
    raw = jax.jit(adapters.make_hybrid_train_step(a, _loss, opt, skip_nonfinite=False,
                                                  return_metrics=True))
    t_nan, o_nan, _ = _run(raw, t0, o0, params, state.frozen,
                           _with_bad(batches, _nan_loss_batch))
    assert _has_nan(t_nan["full"]) and _has_nan(_galore_state(o_nan).inner_state)
