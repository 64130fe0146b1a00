"""The factored step skips a non-finite batch: the state after equals the clean run's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import adapters, factored, tree
from tests import helpers as h
from tests.adapters.test_train_nonfinite import (
    _batches,
    _has_nan,
    _loss,
    _nan_grad_batch,
    _nan_loss_batch,
    _params,
    _with_bad,
)


def _run(step, trainable, opt_state, params, frozen, batches):
    skipped = []
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        for b in batches:
            trainable, opt_state, _, m = step(trainable, opt_state, params, frozen, b)
            skipped.append(int(m["skipped"]))
    return trainable, opt_state, skipped


def _setup():
    params = _params()
    a = tree.assign(params, [tree.Rule(where=r"attn/q/kernel|mlp/(up|down)/kernel",
                                       then=adapters.lora(2, alpha=4.0))])
    return params, a, adapters.init(a, jax.random.key(0), params)


def test_factored_step_skips_bad_batches_and_counts_them():
    params, a, state = _setup()
    opt = optax.adamw(3e-2, weight_decay=0.1)
    step = jax.jit(factored.make_train_step(a, _loss, opt, return_metrics=True))
    o0 = opt.init(state.trainable)
    batches = _batches()
    t_ref, o_ref, s_ref = _run(step, state.trainable, o0, params, state.frozen, batches)
    bad = _with_bad(_with_bad(batches, _nan_loss_batch), _nan_grad_batch)
    t, o, s = _run(step, state.trainable, o0, params, state.frozen, bad)
    assert s_ref == [0] * 4 and s == [0, 0, 1, 1, 0, 0] and sum(s) == 2
    h.assert_tree_allclose(t, t_ref, **h.EXACT)
    h.assert_tree_allclose(o, o_ref, **h.EXACT)
    assert not _has_nan((t, o))


def test_factored_step_without_skipping_lets_nan_through():
    params, a, state = _setup()
    opt = optax.adam(3e-2)
    step = jax.jit(factored.make_train_step(a, _loss, opt, skip_nonfinite=False,
                                         return_metrics=True))
    t, o, s = _run(step, state.trainable, opt.init(state.trainable), params,
                   state.frozen, _with_bad(_batches(), _nan_loss_batch))
    assert s == [0] * 5 and _has_nan(t) and _has_nan(o)
    # The default signature is unchanged: (trainable, opt_state, loss).
    plain = jax.jit(factored.make_train_step(a, _loss, opt))
    with jax.numpy_dtype_promotion("standard"):
        out = plain(state.trainable, opt.init(state.trainable), params, state.frozen,
                    _batches(1)[0])
    assert len(out) == 3 and np.isfinite(float(jnp.asarray(out[2])))
