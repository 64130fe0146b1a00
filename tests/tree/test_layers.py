"""stack_layers / unstack_layers convert layouts exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h


def _unrolled(n=3, key_type=int):
    rng = np.random.default_rng(0)
    return {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)},
        "layers": {
            key_type(i): {
                "attn": {"q": {"kernel": jnp.asarray(rng.standard_normal((4, 4)),
                                                     jnp.float32)}},
                "norm": {"scale": jnp.asarray(rng.standard_normal(4), jnp.bfloat16)},
            }
            for i in range(n)
        },
    }


@pytest.mark.parametrize("key_type", [int, str])
def test_nested_round_trip_is_exact(key_type):
    p = _unrolled(key_type=key_type)
    s = tree.stack_layers(p)
    assert tree.paths(s) == ["embed/embedding", "layers/attn/q/kernel",
                             "layers/norm/scale"]
    assert s["layers"]["attn"]["q"]["kernel"].shape == (3, 4, 4)
    assert s["layers"]["norm"]["scale"].dtype == jnp.bfloat16
    back = tree.unstack_layers(s, index_type=key_type)
    h.assert_tree_allclose(back, p, **h.EXACT)
    assert tree.paths(back) == tree.paths(p)


def test_adapter_state_round_trip_and_equivalent_materialize():
    p = _unrolled()
    rule = [tree.Rule(where=r"layers/(\d+/)?attn/q/kernel", then=adapters.lora(2))]
    a_unrolled = tree.assign(p, rule)
    st = adapters.init(a_unrolled, jax.random.key(0), p)
    st = st._replace(trainable=jax.tree.map(lambda x: x + 0.1, st.trainable))
    stacked = tree.stack_layers(st.trainable)
    assert list(stacked) == ["layers/attn/q/kernel"]
    assert stacked["layers/attn/q/kernel"].a.shape == (3, 4, 2)
    h.assert_tree_allclose(tree.unstack_layers(stacked), st.trainable, **h.EXACT)
    # Materialising the scanned layout equals the unrolled one, per layer.
    ps = tree.stack_layers(p)
    a_stacked = tree.assign(ps, rule)
    m_s = adapters.materialize(a_stacked, ps, stacked,
                               tree.stack_layers(st.frozen))
    m_u = adapters.materialize(a_unrolled, p, *st)
    h.assert_tree_allclose(tree.unstack_layers(m_s), m_u, **h.EXACT)


def test_errors():
    p = _unrolled()
    p["layers"][1]["attn"]["q"]["kernel"] = jnp.ones((4, 5))
    with pytest.raises(ValueError, match="layer 1"):
        tree.stack_layers(p)
    with pytest.raises(ValueError, match="expected 0..1"):
        tree.stack_layers({"layers": {0: {"w": jnp.ones(1)}, 2: {"w": jnp.ones(1)}}})
    with pytest.raises(ValueError, match="no subtree"):
        tree.stack_layers({"blocks": {}})
    with pytest.raises(ValueError, match="leading sizes"):
        tree.unstack_layers({"layers": {"a": jnp.ones((2, 1)), "b": jnp.ones((3, 1))}})
