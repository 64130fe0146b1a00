"""LoRA+: the B factor's update is ratio times A's."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import optim
from tests.helpers import EXACT, assert_tree_allclose, f64


class LoRAParams(NamedTuple):  # the adapter layout, found by key path only
    a: jax.Array
    b: jax.Array


def _state():
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": LoRAParams(jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
                                   jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)),
        "stack/kernel": LoRAParams(jnp.ones((2, 4, 2)), jnp.ones((2, 2, 3))),
    }


def test_b_updates_are_ratio_times_adam():
    tr = _state()
    g = jax.tree.map(lambda x: x * 0.5 + 0.1, tr)
    tx = optim.loraplus(1e-2, ratio=16.0, inner=optim.scale_by_adam_hf(eps=1e-8))
    ref = optax.chain(optim.scale_by_adam_hf(eps=1e-8), optax.scale(-1e-2))
    u, _ = tx.update(g, tx.init(tr), tr)
    r, _ = ref.update(g, ref.init(tr), tr)
    for path in tr:
        np.testing.assert_allclose(f64(u[path].a), f64(r[path].a), **EXACT)
        np.testing.assert_allclose(f64(u[path].b), 16.0 * f64(r[path].b), rtol=1e-6)


def test_ratio_is_injectable():
    tr = _state()
    make = optax.inject_hyperparams(optim.loraplus, static_args=("inner",))
    tx = make(learning_rate=1e-2, ratio=4.0, inner=optax.identity())
    plain = optim.loraplus(1e-2, ratio=4.0, inner=optax.identity())
    u, _ = tx.update(tr, tx.init(tr), tr)
    v, _ = plain.update(tr, plain.init(tr), tr)
    assert_tree_allclose(u, v, **EXACT)


def test_raises_without_b_leaf():
    with pytest.raises(ValueError, match=r"'/b'.*w \(2,\)"):
        optim.scale_by_loraplus().init({"w": jnp.ones(2)})
