"""GaLore/FRUGAL refresh placement options: same numbers, one SVD call per slice.

``refresh_batch_size`` and ``refresh_sharding`` only change where the
per-slice SVDs run, so on one device every update equals the default batched
refresh bit for bit (each slice's SVD is the same LAPACK call on the same
matrix). The 8-device behaviour is in ``test_sharded.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax import optim, shard, tree
from tests import helpers as h

MESH = shard.make_mesh(devices=jax.devices()[:1])


def _grads(n=4):
    rng = np.random.default_rng(0)
    return [
        {
            "s": jnp.asarray(rng.standard_normal((3, 6, 8)), jnp.float32),
            "w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
        }
        for _ in range(n)
    ]


def _run(tx, grads):
    state = tx.init(grads[0])
    step = jax.jit(tx.update)
    out = []
    with jax.numpy_dtype_promotion("standard"):
        for g in grads:
            u, state = step(g, state)
            out.append(u)
    return out, state


STACKED = tree.stacked("s")  # "s" is (L, in, out); nothing guesses it
MAKERS = {
    "galore": lambda **kw: optim.scale_by_galore(rank=2, update_proj_gap=2,
                                                 dimension_numbers=STACKED, **kw),
    "galore_full": lambda **kw: optim.scale_by_galore(
        rank=2, update_proj_gap=2, proj_type="full", dimension_numbers=STACKED, **kw
    ),
    "frugal": lambda **kw: optim.scale_by_frugal(density=0.5, update_gap=2,
                                                 dimension_numbers=STACKED, **kw),
}
_REFERENCE = {}


@pytest.mark.parametrize(
    "name, option",
    [
        ("galore", dict(refresh_batch_size=2)),
        ("galore_full", dict(refresh_sharding=shard.refresh_sharding(MESH))),
        ("frugal", dict(refresh_batch_size=1)),
    ],
)
def test_refresh_options_give_identical_updates(name, option):
    grads = _grads()
    if name not in _REFERENCE:
        _REFERENCE[name] = _run(MAKERS[name](), grads)
    want, s_want = _REFERENCE[name]
    got, s_got = _run(MAKERS[name](**option), grads)
    h.assert_tree_allclose(got, want, **h.EXACT)
    h.assert_tree_allclose(s_got.projector, s_want.projector, **h.EXACT)


def test_refresh_options_are_validated():
    with pytest.raises(
        ValueError, match="refresh_batch_size must be None or a positive"
    ):
        optim.galore(1e-3, refresh_batch_size=0)
    with pytest.raises(TypeError, match="refresh_sharding must be a jax.sharding"):
        optim.galore(1e-3, refresh_sharding=P("fsdp"))
    with pytest.raises(ValueError, match="must shard only the slice axis"):
        optim.galore(1e-3, refresh_sharding=NamedSharding(MESH, P(None, "fsdp")))
    with pytest.raises(ValueError, match="not both"):
        optim.frugal(
            1e-3, refresh_batch_size=1, refresh_sharding=shard.refresh_sharding(MESH)
        )
    with pytest.raises(ValueError, match="stagger already refreshes one slice"):
        optim.galore(1e-3, stagger=True, refresh_batch_size=1)
    with pytest.raises(ValueError, match="blocks.*runs no SVD"):
        optim.frugal(1e-3, projector=optim.blocks(), refresh_batch_size=1)
