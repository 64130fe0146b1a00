"""``constrain_scan_carries``: same values and gradients, carries constrained."""

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import shard
from tests import helpers as h

MESH = shard.make_mesh(devices=jax.devices()[:1])


def _model(x, w, v):
    @jax.jit
    def inner(h_, vi):  # a scan inside a jit inside a scan
        return jax.lax.scan(lambda c, u: (jnp.sin(c * u[None, :]), None), h_, vi)[0]

    def layer(h_, wv):
        wi, vi = wv
        return inner(jnp.tanh(h_ @ wi), vi), jnp.sum(h_)

    h_, sums = jax.lax.scan(layer, x, (w, v))
    return jnp.sum(h_**2) + jnp.sum(sums)


def _count(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for p in eqn.params.values():
            sub = getattr(p, "jaxpr", None)
            if sub is not None:
                n += _count(getattr(sub, "jaxpr", sub), name)
    return n


def test_values_and_gradients_unchanged_and_carries_constrained():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 3, 3)) * 0.5, jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
    pinned = shard.constrain_scan_carries(_model, MESH, batch_size=4)
    h.assert_tree_allclose(pinned(x, w, v), _model(x, w, v), **h.EXACT)
    h.assert_tree_allclose(
        jax.grad(pinned, argnums=(0, 1))(x, w, v),
        jax.grad(_model, argnums=(0, 1))(x, w, v),
        **h.EXACT,
    )
    assert _count(jax.make_jaxpr(_model)(x, w, v).jaxpr, "sharding_constraint") == 0
    # outer carry (4, 3): at entry and per iteration; inner carry (4, 3) likewise
    got = _count(jax.make_jaxpr(pinned)(x, w, v).jaxpr, "sharding_constraint")
    assert got == 6
    other = shard.constrain_scan_carries(_model, MESH, batch_size=7)
    assert _count(jax.make_jaxpr(other)(x, w, v).jaxpr, "sharding_constraint") == 0
