"""The recipe's training (``start`` + ``train.fit``) skips non-finite steps and
stops after N of them in a row (the demo's ``--max_skipped_in_a_row``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, train, tree
from tests import helpers as h


def _batch(rng, poison=0.0):
    return {"x": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
            "segment_ids": np.ones((4, 6), np.int32),
            "poison": jnp.asarray(poison, jnp.float32)}


def _loss(p, batch):
    y = jnp.tanh(batch["x"] @ p["w"]) @ p["v"]
    return jnp.mean(y ** 2) * jnp.exp(batch["poison"])  # NaN poison: NaN loss and grads


def _run(recipe):
    """LoRA on ``w`` through the recipe (``start``): a fresh trainer and state."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2, alpha=4.0))])
    setup = recipe.Setup(params, optax.adam(5e-2), "", adapters=a)
    return recipe.start(setup, _loss, recipe.OptimConfig(lr=1.0, total_steps=6),
                        jax.random.key(0))


def test_a_nan_batch_is_skipped_and_logged(recipe, tmp_path):
    rng = np.random.default_rng(1)
    clean = [_batch(rng) for _ in range(5)]
    bad = clean[:2] + [_batch(rng, jnp.nan)] + clean[2:]
    with jax.numpy_dtype_promotion("standard"):
        run = _run(recipe)
        ref = train.fit(run.step, run.state, clean, steps=5, progress=False)
        log = str(tmp_path / "metrics.jsonl")
        run = _run(recipe)
        got = train.fit(run.step, run.state, bad, steps=6, log_path=log, progress=False)
    assert ref.skipped == 0 and got.skipped == 1
    # the skipped step changed neither the adapters nor the optimizer state
    h.assert_tree_allclose(got.state.trainable, ref.state.trainable, **h.EXACT)
    h.assert_tree_allclose(got.state.opt_state, ref.state.opt_state, **h.EXACT)
    with open(log, encoding="utf-8") as f:
        rows = [json.loads(r) for r in f]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0, 0]


def test_the_loop_stops_after_n_skips_in_a_row(recipe):
    rng = np.random.default_rng(2)
    batches = [_batch(rng)] + [_batch(rng, jnp.nan) for _ in range(5)]
    with jax.numpy_dtype_promotion("standard"):
        run = _run(recipe)
        with pytest.raises(train.TooManySkippedSteps,
                           match=r"3 steps in a row \(steps 2 to 4\) had a non-finite "
                                 r"loss or gradient .* those after step 1"):
            train.fit(run.step, run.state, batches, steps=6, progress=False,
                      max_skipped_in_a_row=3)
        with pytest.raises(ValueError, match="max_skipped_in_a_row must be an int >= 1"):
            train.fit(run.step, run.state, batches, steps=6, progress=False,
                      max_skipped_in_a_row=0)
