"""A skipped step leaves no trace: a bad batch inserted into a run changes nothing.

Each test trains a tiny model twice through ``train.trainer``: once on a clean
batch sequence, once on the same sequence with a bad batch inserted in the
middle. The final trainable tree and optimizer state must equal the clean
run's exactly (the update is not applied, so there is nothing to round).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, optim, train, tree
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


def _with_bad(batches, bad):
    return batches[:BAD_AT] + [bad(batches[BAD_AT])] + batches[BAD_AT:]


def _run(t, params, batches):
    state = t.init(jax.random.key(0), params)
    skipped = []
    for b in batches:
        state, m = t.step(state, b, params)
        skipped.append(int(m["skipped"]))
    return state, skipped


def _has_nan(t):
    return any(np.isnan(h.f64(x)).any() for x in jax.tree.leaves(t))


@pytest.mark.parametrize("factored", [None, False], ids=["factored", "materialize"])
def test_adapter_step_skips_bad_batches_and_counts_them(factored):
    params = _params()
    a = tree.assign(params, [tree.Rule(where=r"attn/q/kernel|mlp/(up|down)/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    t = train.trainer(_loss, optax.adamw(3e-2, weight_decay=0.1), adapters=a,
                      factored=factored)
    batches = _batches()
    st = adapters.init(a, jax.random.key(0), params)
    for bad, finite in ((_nan_loss_batch, False), (_nan_grad_batch, True)):
        loss = _loss(adapters.materialize(a, params, *st), bad(batches[0]))
        assert np.isfinite(float(loss)) == finite

    ref, s_ref = _run(t, params, batches)
    # A NaN loss, then a finite loss with a NaN gradient, both at position BAD_AT.
    got, s = _run(t, params, _with_bad(_with_bad(batches, _nan_loss_batch), _nan_grad_batch))
    assert s_ref == [0] * 4 and s == [0, 0, 1, 1, 0, 0]
    assert int(got.step) == 6
    h.assert_tree_allclose(got.trainable, ref.trainable, **h.EXACT)
    h.assert_tree_allclose(got.opt_state, ref.opt_state, **h.EXACT)  # AdamW's count, moments
    assert not _has_nan((got.trainable, got.opt_state))


def _galore_state(o):
    return o.inner_states["galore"].inner_state[0]


def test_hybrid_step_skips_a_nan_batch_on_a_galore_refresh():
    """LoRA on q, GaLore (rank 2, refresh every 2 steps) on the MLP, Adam on the head."""
    params = _params()
    a = tree.assign(params, [tree.Rule(where=r"attn/q/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    labels = train.hybrid_labels(full=lambda p: "galore" if p.startswith("mlp") else "adam")
    opt = optax.partition({
        "adapters": optax.adam(3e-2),
        "adam": optax.adam(3e-2),
        "galore": optim.galore(3e-2, rank=2, update_proj_gap=BAD_AT,
                               inner=optim.scale_by_adam_hf()),
    }, labels)
    full = [tree.Rule(where=r"mlp/.*|head/.*", then=True)]
    batches = _batches()
    # The bad batch arrives when GaLore's count is BAD_AT: a refresh step.
    t = train.trainer(_loss, opt, adapters=a, full=full)
    ref, _ = _run(t, params, batches)
    got, s = _run(t, params, _with_bad(batches, _nan_loss_batch))
    assert s == [0, 0, 1, 0, 0]
    h.assert_tree_allclose(got.trainable, ref.trainable, **h.EXACT)
    h.assert_tree_allclose(got.opt_state, ref.opt_state, **h.EXACT)  # projector, moments
    assert int(_galore_state(got.opt_state).count) == len(batches)

    # Without skipping, the NaN reaches the weights and the moments.
    raw = train.trainer(_loss, opt, adapters=a, full=full, skip_nonfinite=False)
    bad, _ = _run(raw, params, _with_bad(batches, _nan_loss_batch))
    assert _has_nan(bad.trainable["full"]) and _has_nan(_galore_state(bad.opt_state).inner_state)
