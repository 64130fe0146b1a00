"""A state type outside peftjax places its leaves by the roles it declares.

Expected specs are derived by hand from the module rule of
``peftjax.shard._derive`` (as in ``test_specs.py``): a derived axis keeps its
base axis's mesh axes, mesh axes of a missing (projected) axis move to the
first axis they divide (full-size, then rank, then batch).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax import optim, shard, tree

MESH = AbstractMesh(
    (2, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3
)
R = tree.StateRole
PARAMS = {
    "w": jax.ShapeDtypeStruct((16, 32), jnp.float32),
    "s": {"values": jax.ShapeDtypeStruct((8,), jnp.float32)},
}
BASE = {"w": P("fsdp", "tensor"), "s": {"values": P("tensor")}}


def specs(tree_):
    return jax.tree.map(
        lambda s: s.spec, tree_, is_leaf=lambda x: isinstance(x, NamedSharding)
    )


class ThirdPartyState(NamedTuple):
    count: Any
    mu: Any
    low: Any
    basis: Any
    slots: Any
    key: Any
    state_roles = {"count": R.REPLICATED, "mu": R.LIKE_PARAMS, "low": R.LIKE_PARAMS,
                   "basis": R.PROJECTOR, "slots": R.SPARSE_SLOTS, "key": R.REPLICATED}


class Undeclared(NamedTuple):
    count: Any
    mu: Any
    low: Any
    basis: Any
    slots: Any
    key: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Wrapper:
    steps: Any
    inner: Any
    state_roles = {"steps": R.REPLICATED, "inner": R.LIKE_PARAMS}


def _fields():
    f = jnp.float32
    return dict(
        count=jax.ShapeDtypeStruct((), jnp.int32),
        mu={"w": jax.ShapeDtypeStruct((16, 32), f)},
        low={"w": jax.ShapeDtypeStruct((4, 32), f)},  # in projected to r = 4
        # a two-sided basis: (S, in, r) at w/0, (S, out, r) at w/1
        basis={"w": (jax.ShapeDtypeStruct((1, 16, 4), f),
                     jax.ShapeDtypeStruct((1, 32, 4), f))},
        slots={"s": jax.ShapeDtypeStruct((8,), f),  # aligned with s/values
               "t": jax.ShapeDtypeStruct((8,), f)},  # no t/values: replicated
        key=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )


def test_a_declared_third_party_state_is_placed_by_its_roles():
    st = ThirdPartyState(**_fields())
    got = specs(shard.state_shardings(MESH, st, PARAMS, BASE))
    assert got.count == P() and got.key == P()
    assert got.mu["w"] == P("fsdp", "tensor")
    # (r, 32): the out axis keeps tensor, fsdp (from the projected in) joins it
    assert got.low["w"] == P(None, ("tensor", "fsdp"))
    # (S, in, r): in keeps fsdp, tensor joins it; (S, out, r): out keeps
    # tensor, fsdp joins it
    assert got.basis["w"] == (P(None, ("fsdp", "tensor"), None),
                              P(None, ("tensor", "fsdp"), None))
    assert got.slots["s"] == P("tensor") and got.slots["t"] == P()
    # The declaration is what places them: the same leaves undeclared are
    # matched by path suffix, find no parameter and are replicated.
    plain = specs(shard.state_shardings(MESH, Undeclared(**_fields()), PARAMS, BASE))
    assert plain.basis["w"] == (P(), P()) and plain.slots["s"] == P()
    assert plain.mu == got.mu and plain.low == got.low


def test_declared_states_nest_in_chains_and_in_declared_fields():
    inner = ThirdPartyState(**_fields())
    wrapped = Wrapper(steps=jax.ShapeDtypeStruct((), jnp.int32),
                      inner=(inner, optax.ScaleByAdamState(
                          count=jax.ShapeDtypeStruct((), jnp.int32),
                          mu={"w": jax.ShapeDtypeStruct((16, 32), jnp.float32)},
                          nu={"w": jax.ShapeDtypeStruct((16, 32), jnp.float32)})))
    got = specs(shard.state_shardings(MESH, (optax.EmptyState(), wrapped),
                                      PARAMS, BASE))[1]
    assert got.steps == P()
    declared, adam = got.inner
    assert declared.basis["w"][0] == P(None, ("fsdp", "tensor"), None)
    assert declared.slots["s"] == P("tensor") and declared.count == P()
    assert adam.mu["w"] == P("fsdp", "tensor") and adam.count == P()


def test_every_optim_state_declares_its_roles():
    names = [n for n in optim.__all__ if n.endswith("State")]
    assert names
    for n in names:
        cls = getattr(optim, n)
        roles = tree.state_roles(cls(*[None] * len(cls._fields)))
        assert roles is not None and list(roles) == list(cls._fields), n
        assert roles[cls._fields[0]] is R.REPLICATED, n  # count first, replicated


def test_train_spiel_state_follows_the_sparse_values_by_its_declaration():
    from peftjax import adapters, train

    params = {"w": jax.ShapeDtypeStruct((2, 16, 32), jnp.float32)}
    a = tree.assign(params, [tree.Rule(where="w", then=adapters.sparse_delta(k=8))],
                    layout=tree.stacked("w"))
    state = jax.eval_shape(lambda p: adapters.init(a, jax.random.key(0), p), params)
    base = {"w": P("data", "fsdp", None)}
    t_sh = shard.adapter_shardings(MESH, a, params, base, state).trainable
    k = state.frozen["w"].indices.shape
    sp = train.SpIELState(
        count=jax.ShapeDtypeStruct((), jnp.int32),
        phase=jax.ShapeDtypeStruct((), jnp.bool_),
        samples=jax.ShapeDtypeStruct((), jnp.float32),
        candidates={"w": jax.ShapeDtypeStruct(k, jnp.int32)},
        grad_sum={"w": jax.ShapeDtypeStruct(k, jnp.float32)},
        gradsq_sum={"w": jax.ShapeDtypeStruct(k, jnp.float32)},
    )
    assert tree.state_roles(sp)["grad_sum"] is R.SPARSE_SLOTS
    got = specs(shard.state_shardings(MESH, sp, state.trainable, t_sh))
    # (L, k): data stays on the layer axis, fsdp (from the matrix) moves to k
    assert got.candidates["w"] == got.grad_sum["w"] == P("data", "fsdp")
    assert got.gradsq_sum["w"] == P("data", "fsdp")
    assert got.count == got.phase == got.samples == P()
