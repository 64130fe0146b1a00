"""The SpIEL step skips a non-finite batch: values, support, moments, accumulators unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, masks, optim, tree
from tests import helpers as h


def _setup():
    rng = np.random.default_rng(3)
    base = {"w": jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)}
    a = tree.assign(base, [tree.Rule(where="w", then=adapters.sparse_delta(k=15))])
    st = adapters.init(a, jax.random.key(0), base)
    return a, base, st


def _loss(p, batch):
    return jnp.sum(p["w"] * batch) + 0.5 * jnp.sum(p["w"] ** 2 * jnp.abs(batch))


def _batches(n):
    rng = np.random.default_rng(4)
    return [jnp.asarray(rng.standard_normal((12, 10)), jnp.float32) for _ in range(n)]


def _run(step, st, opt_state, batches):
    t, f, o, s = st.trainable, st.frozen, opt_state, optim.spiel_init(st.trainable,
                                                                       st.frozen)
    skipped = []
    for b in batches:
        t, f, o, s, _, m = step(t, f, o, s, b)
        skipped.append(int(m["skipped"]))
    return (t, f, o, s), skipped


# Reselection every 4 steps after 2 accumulated batches: the second call closes
# the first phase (regrowth), the sixth the second.
SELECTOR = masks.spiel_selector(total_steps=12, reselection_steps=4, accumulation_steps=2)


@pytest.mark.parametrize("at", [1, 3], ids=["on_a_regrowth_step", "outside_a_phase"])
def test_spiel_step_skips_a_nan_batch(at):
    a, base, st = _setup()
    opt = optim.sft_adamw(1e-1)
    make = functools.partial(optim.make_spiel_step,
                             functools.partial(adapters.materialize, a, base), _loss,
                             opt, selector=SELECTOR, return_metrics=True)
    step = jax.jit(make())
    batches = _batches(8)
    ref, s_ref = _run(step, st, opt.init(st.trainable), batches)
    bad = batches[:at] + [jnp.full_like(batches[at], jnp.nan)] + batches[at:]
    got, s = _run(step, st, opt.init(st.trainable), bad)
    assert sum(s_ref) == 0 and s == [int(i == at) for i in range(9)]
    h.assert_tree_allclose(got, ref, **h.EXACT)  # support, moments, accumulators
    assert int(got[3].count) == len(batches)
    # The run did regrow: the support moved away from its initial draw.
    assert not np.array_equal(np.sort(got[1]["w"].indices), np.sort(st.frozen["w"].indices))

    raw = jax.jit(make(skip_nonfinite=False))
    (t, _, o, s_state), s = _run(raw, st, opt.init(st.trainable), bad)
    assert sum(s) == 0
    assert np.isnan(h.f64(t["w"].values)).all() and np.isnan(h.f64(o[0].mu["w"].values)).all()
