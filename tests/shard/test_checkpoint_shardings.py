"""``checkpoint.restore(..., shardings=...)`` on one device.

The 8-device save on (2, 4) and restore on (8, 1) / (1, 1) is in test_sharded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax import shard
from peftjax.io import checkpoint
from tests import helpers as h

MESH = shard.make_mesh(devices=jax.devices()[:1])


def _state():
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    return {
        "opt": optax.adam(1e-3).init(params),
        "params": params,
        "key": jax.random.key(3),
        "step": 7,
    }


def test_restore_places_arrays_and_keys_on_the_given_shardings(tmp_path):
    state = _state()
    checkpoint.save(tmp_path, 7, state)
    like = jax.tree.map(lambda x: x, _state())
    rep = shard.replicated(MESH)
    sh = {
        "opt": rep,
        "params": {"w": NamedSharding(MESH, P("fsdp")), "b": None},
        "key": rep,
        "step": None,
    }
    got = checkpoint.restore(tmp_path, like, shardings=sh)
    h.assert_tree_allclose(got["params"], state["params"], **h.EXACT)
    assert got["params"]["w"].sharding.spec == P("fsdp")
    assert got["opt"][0].mu["w"].sharding == rep
    assert isinstance(got["key"].sharding, NamedSharding)
    np.testing.assert_array_equal(
        jax.random.key_data(got["key"]), jax.random.key_data(state["key"])
    )
    assert got["step"] == 7
    one = checkpoint.restore(tmp_path, like, shardings=rep)
    assert one["params"]["b"].sharding == rep


def test_restore_rejects_shardings_that_do_not_fit(tmp_path):
    checkpoint.save(tmp_path, 0, {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="tree prefix of `like`"):
        checkpoint.restore(tmp_path, {"w": jnp.ones(2)}, shardings={"v": None})
    with pytest.raises(TypeError, match="expected a jax.sharding.Sharding or None"):
        checkpoint.restore(tmp_path, {"w": jnp.ones(2)}, shardings={"w": P()})
