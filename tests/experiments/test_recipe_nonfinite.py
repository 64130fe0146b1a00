"""The recipe's loop skips non-finite steps and stops after N of them in a row."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, tree
from tests import helpers as h
from tests.experiments.conftest import ROOT


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location(
        "_recipe", os.path.join(ROOT, "experiments", "_recipe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Batches:
    """The loop's view of ``data.Batches``: ``iterate(start, stop)``."""

    def __init__(self, batches):
        self.batches = batches

    def iterate(self, start, stop):
        for i in range(start, stop):
            yield i, self.batches[i]


def _batch(rng, poison=0.0):
    return {"x": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
            "segment_ids": np.ones((4, 6), np.int32),
            "poison": jnp.asarray(poison, jnp.float32)}


def _loss(p, batch):
    y = jnp.tanh(batch["x"] @ p["w"]) @ p["v"]
    return jnp.mean(y ** 2) * jnp.exp(batch["poison"])  # NaN poison: NaN loss and grads


def _setup(recipe):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.lora(2, alpha=4.0))])
    st = adapters.init(a, jax.random.key(0), params)
    return recipe.Setup(
        trainable=st.trainable, static=(params, st.frozen),
        to_params=lambda t, s: adapters.materialize(a, s[0], t, s[1]),
        optimizer=optax.adam(5e-2), export=lambda t, s: t, describe="")


def _optim(recipe, steps):
    # A constant learning rate: the runs with and without the bad batch have
    # different lengths but must see the same rate at each update.
    return recipe.OptimConfig(lr=1.0, total_steps=steps, schedule="linear",
                              end_lr_ratio=1.0)


def test_a_nan_batch_is_skipped_and_logged(recipe, tmp_path):
    setup = _setup(recipe)
    rng = np.random.default_rng(1)
    clean = [_batch(rng) for _ in range(5)]
    bad = clean[:2] + [_batch(rng, jnp.nan)] + clean[2:]
    run = recipe.trainer(setup, _loss, _optim(recipe, 5))
    kw = dict(setup=setup, run=run, key=jax.random.key(0), progress=False)
    with jax.numpy_dtype_promotion("standard"):
        ref = recipe.train(optim=_optim(recipe, 5), batches=_Batches(clean), **kw)
        log = str(tmp_path / "metrics.jsonl")
        got = recipe.train(optim=_optim(recipe, 6), batches=_Batches(bad), log_path=log,
                           **kw)
    assert ref.skipped == 0 and got.skipped == 1
    h.assert_tree_allclose(got.trainable, ref.trainable, **h.EXACT)
    h.assert_tree_allclose(got.opt_state, ref.opt_state, **h.EXACT)
    with open(log, encoding="utf-8") as f:
        rows = [json.loads(r) for r in f]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0, 0]


def test_the_loop_stops_after_n_skips_in_a_row(recipe):
    setup = _setup(recipe)
    rng = np.random.default_rng(2)
    batches = [_batch(rng)] + [_batch(rng, jnp.nan) for _ in range(5)]
    optim = _optim(recipe, 6)
    run = recipe.trainer(setup, _loss, optim)
    kw = dict(setup=setup, run=run, optim=optim, batches=_Batches(batches),
              key=jax.random.key(0), progress=False)
    with jax.numpy_dtype_promotion("standard"):
        with pytest.raises(recipe.TooManySkippedSteps,
                           match=r"3 steps in a row \(steps 2 to 4\) had a non-finite "
                                 r"loss or gradient .* the state is the one after step 1"):
            recipe.train(max_skipped_in_a_row=3, **kw)
        with pytest.raises(ValueError, match="max_skipped_in_a_row must be >= 1"):
            recipe.train(max_skipped_in_a_row=0, **kw)
