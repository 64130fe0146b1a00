"""Specs from rules and derived shardings, checked on abstract meshes (one process).

Every expected spec is derived by hand from the module rule of
``peftjax.shard._derive``: a derived axis keeps its base axis's mesh axes,
mesh axes of a missing (projected) axis move to the first axis they divide
(full-size, then rank/k, then batch), and what fits nowhere warns.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from peftjax import adapters, masks, optim, shard, train, tree
from peftjax.tree import DimensionNumbers, Rule

MESH = AbstractMesh(
    (2, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3
)
F32 = jnp.float32


def sds(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def specs(tree_):
    return jax.tree.map(
        lambda s: s.spec, tree_, is_leaf=lambda x: isinstance(x, NamedSharding)
    )


# ----------------------------------------------------------------- meshes


def test_make_mesh_and_batch_sharding():
    mesh = shard.make_mesh(devices=jax.devices()[:1])
    assert mesh.axis_names == shard.AXES
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert shard.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    assert shard.replicated(mesh).spec == P()
    with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x tensor=1 = 2 devices"):
        shard.make_mesh(data=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="fsdp must be a positive int"):
        shard.make_mesh(fsdp=0)


# ----------------------------------------------------------------- base rules


def test_matrix_spec_resolves_through_dimension_numbers():
    m = shard.MatrixSpec(inputs="fsdp", outputs="tensor", batch="data")
    assert m.resolve((8, 16)) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="no default matrix view"):
        m.resolve((4, 8, 16))  # not guessed to be stacked layers
    stacked = m.with_dimension_numbers(tree.dims.stacked())
    assert stacked.resolve((4, 8, 16)) == P("data", "fsdp", "tensor")
    head = shard.MatrixSpec(
        inputs="fsdp", outputs="tensor", dimension_numbers=DimensionNumbers(0, (1, 2))
    )
    assert head.resolve((8, 4, 2)) == P("fsdp", "tensor", None)  # major output axis
    with pytest.raises(ValueError, match=r"norm/scale.*\(8,\)"):
        m.resolve((8,), path="norm/scale")
    with pytest.raises(ValueError, match="no default matrix view"):
        m.resolve((2, 2, 2, 2), path="conv")
    with pytest.raises(TypeError, match="MatrixSpec.inputs"):
        shard.MatrixSpec(inputs=3)


def _llama_like():
    return {
        "embed_tokens": {"embedding": sds(64, 16)},
        "layers": {
            "self_attn": {
                "q_proj": {"kernel": sds(2, 16, 32)},
                "o_proj": {"kernel": sds(2, 32, 16)},
            },
            "mlp": {"down_proj": {"kernel": sds(2, 32, 16)}},
            "input_layernorm": {"scale": sds(2, 16)},
        },
        "norm": {"scale": sds(16)},
    }


def test_transformer_rules_column_row_embedding_and_replicated_rest():
    got = shard.param_specs(_llama_like(), shard.transformer_rules())
    assert got["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert got["layers"]["self_attn"]["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert got["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert got["embed_tokens"]["embedding"] == P(("tensor", "fsdp"), None)
    assert (
        got["norm"]["scale"] == P() and got["layers"]["input_layernorm"]["scale"] == P()
    )


def test_param_specs_first_match_none_and_errors():
    params = {"a": sds(8, 8), "b": sds(8, 8), "c": sds(8)}
    rules = [
        Rule(where="a", then=P("tensor")),
        Rule(where="a|b", then=P("fsdp")),
        Rule(where="c", then=None),
    ]
    assert shard.param_specs(params, rules) == {
        "a": P("tensor"),
        "b": P("fsdp"),
        "c": P(),
    }
    with pytest.raises(ValueError, match="matched no path"):
        shard.param_specs(params, [Rule(where="zz", then=P())])
    with pytest.raises(
        ValueError, match=r"'c' \(shape \(8,\), dtype float32\) has rank 1"
    ):
        shard.param_specs(params, [Rule(where="c", then=P("fsdp", None))])
    with pytest.raises(TypeError, match=r"'a' .*payload 'fsdp' of type str"):
        shard.param_specs(params, [Rule(where="a", then="fsdp")])
    with pytest.raises(ValueError, match=r"'c' \(shape \(8,\).*MatrixSpec targets"):
        shard.param_specs(params, [Rule(where="c", then=shard.MatrixSpec())])


def test_named_shardings_validates_divisibility_and_axes():
    params = {"w": sds(6, 8, dtype=jnp.bfloat16)}
    with pytest.raises(
        ValueError,
        match=r"'w' \(shape \(6, 8\), dtype bfloat16\).*size 6 "
        r"over \('tensor',\) \(4 devices\)",
    ):
        shard.param_shardings(MESH, params, [Rule(where="w", then=P("tensor"))])
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        shard.named_shardings(MESH, params, {"w": P("model")})
    with pytest.raises(ValueError, match="uses mesh axis 'fsdp' twice"):
        shard.named_shardings(MESH, params, {"w": P("fsdp", "fsdp")})
    ok = shard.param_shardings(MESH, params, [Rule(where="w", then=P(None, "tensor"))])
    assert ok["w"].spec == P(None, "tensor")


# ----------------------------------------------------------------- adapters


def _adapter_shardings(params, rules, base_specs, layout=None):
    a = tree.assign(params, rules, layout=layout)
    state = jax.eval_shape(lambda p: adapters.init(a, jax.random.key(0), p), params)
    return shard.adapter_shardings(MESH, a, params, base_specs, state)


def test_lora_dora_lora_xs_fields_follow_their_axes():
    params = {"q": sds(16, 32), "s": sds(2, 16, 32), "d": sds(16, 32), "x": sds(16, 32)}
    base = {
        "q": P("fsdp", "tensor"),
        "s": P("data", "fsdp", "tensor"),
        "d": P(None, "tensor"),
        "x": P("fsdp", None),
    }
    got = _adapter_shardings(
        params,
        [
            Rule(where="q|s", then=adapters.lora(4)),
            Rule(where="d", then=adapters.dora(4)),
            Rule(where="x", then=adapters.lora_xs(4)),
        ],
        base,
        layout=tree.stacked("s"),
    )
    t, f = specs(got.trainable), specs(got.frozen)
    # a keeps the input axis's fsdp and takes the output axis's tensor (16 % 8 == 0)
    assert (t["q"].a, t["q"].b) == (
        P(("fsdp", "tensor"), None),
        P(None, ("tensor", "fsdp")),
    )
    assert (t["s"].a, t["s"].b) == (
        P("data", ("fsdp", "tensor"), None),
        P("data", None, ("tensor", "fsdp")),
    )
    # DoRA on an output-sharded base: tensor moves from the missing out axis to in
    assert (t["d"].a, t["d"].b, t["d"].magnitude) == (
        P("tensor", None),
        P(None, "tensor"),
        P("tensor"),
    )
    # LoRA-XS: the r x r core takes fsdp (r = 4 divisible by 2); a keeps it on
    # in, b moves it to out
    assert t["x"].core == P("fsdp", None)
    assert (f["x"].a, f["x"].b) == (P("fsdp", None), P(None, "fsdp"))


def test_stacked_without_factored_form_and_shared_arrays():
    # HiRA has no factored form by default: the stacked view still comes from
    # the adapter; VB-LoRA's bank lives once under SHARED and is replicated
    params = {"s": sds(2, 16, 32), "q": sds(16, 32)}
    got = _adapter_shardings(
        params,
        [Rule(where="s", then=adapters.hira(4)),
         Rule(where="q", then=adapters.vblora(2, num_vectors=8, vector_length=8))],
        {"s": P("data", "fsdp", "tensor"), "q": P("fsdp", "tensor")},
        layout=tree.stacked("s"),
    )
    t = specs(got.trainable)
    assert t["s"].a == P("data", ("fsdp", "tensor"), None)
    assert jax.tree.leaves(t[adapters.SHARED]) == [P()]


def test_sparse_values_and_indices_put_the_base_axes_on_k():
    params = {"w": sds(2, 16, 32)}
    base = {"w": P("data", "fsdp", "tensor")}
    got = _adapter_shardings(
        params, [Rule(where="w", then=adapters.sparse_delta(k=24))], base,
        layout=tree.stacked("w"),
    )
    assert specs(got.trainable)["w"].values == P("data", ("fsdp", "tensor"))
    assert specs(got.frozen)["w"].indices == P("data", ("fsdp", "tensor"))


def test_a_leaf_that_cannot_follow_its_base_warns():
    params = {"w": sds(16, 32)}
    with pytest.warns(
        shard.ShardingFallbackWarning,
        match=r"'w' field '(values|indices)': shape \(3,\).*\['fsdp', "
        r"'tensor'\]",
    ):
        got = _adapter_shardings(
            params,
            [Rule(where="w", then=adapters.sparse_delta(k=3))],
            {"w": P("fsdp", "tensor")},
        )
    assert specs(got.trainable)["w"].values == P(None)


# ----------------------------------------------------------------- optimizer states


def test_adam_moments_take_the_params_specs():
    params = {"w": sds(16, 32), "b": sds(32)}
    base = {"w": P("fsdp", "tensor"), "b": P("tensor")}
    st = jax.eval_shape(optax.adamw(1e-3).init, params)
    got = specs(shard.state_shardings(MESH, st, params, base))
    assert got[0].mu == base and got[0].nu == base and got[0].count == P()


@pytest.mark.parametrize(
    "proj_type, mu, basis",
    [
        # (16, 32): std projects the smaller input axis -> mu (r, 32), basis (S, 16, r)
        ("std", P(None, ("tensor", "fsdp")), P(None, ("fsdp", "tensor"), None)),
        # left projects the output axis -> mu (16, r), basis (S, 32, r)
        ("left", P(("fsdp", "tensor"), None), P(None, ("tensor", "fsdp"), None)),
    ],
)
def test_galore_moments_and_bases_follow_the_surviving_axis(proj_type, mu, basis):
    params = {"w": sds(16, 32), "b": sds(32)}
    base = {"w": P("fsdp", "tensor"), "b": P()}
    tx = optim.galore(1e-3, rank=4, proj_type=proj_type)
    st = jax.eval_shape(tx.init, params)
    got = specs(shard.state_shardings(MESH, st, params, base))[0]
    assert got.inner_state.mu["w"] == mu and got.inner_state.nu["w"] == mu
    assert got.projector["w"] == basis
    assert got.count == P() and got.key == P()


def test_galore_full_and_stacked_and_frugal_coordinates():
    params = {"s": sds(2, 16, 32)}
    base = {"s": P("data", "fsdp", "tensor")}
    lay = tree.stacked("s")
    st = jax.eval_shape(optim.galore(1e-3, rank=4, proj_type="full",
                                     dimension_numbers=lay).init, params)
    got = specs(shard.state_shardings(MESH, st, params, base, dimension_numbers=lay))[0]
    # (L, r, r) moments keep data on L; fsdp and tensor land on the r axes
    assert got.inner_state.mu["s"] == P("data", "fsdp", "tensor")
    assert got.projector["s"] == (
        P("data", ("fsdp", "tensor"), None),
        P("data", ("tensor", "fsdp"), None),
    )
    tx = optim.frugal(
        1e-3, density=0.25, projector=optim.coordinates(), proj_type="right",
        dimension_numbers=lay,
    )
    st = jax.eval_shape(tx.init, params)
    # indices (S, r=4): data on S; fsdp fits r, tensor (4) then fits nowhere
    with pytest.warns(
        shard.ShardingFallbackWarning, match=r"projector of 's'.*'tensor'"
    ):
        got = specs(shard.state_shardings(MESH, st, params, base, dimension_numbers=lay))[0]
    assert got.projector["s"] == P("data", "fsdp")
    assert got.inner_state.mu["s"] == P("data", None, ("tensor", "fsdp"))


def test_spiel_state_follows_the_sparse_values():
    params = {"w": sds(2, 16, 32)}
    a = tree.assign(params, [Rule(where="w", then=adapters.sparse_delta(k=8))],
                    layout=tree.stacked("w"))
    state = jax.eval_shape(lambda p: adapters.init(a, jax.random.key(0), p), params)
    base = {"w": P("data", "fsdp", None)}
    t_sh = shard.adapter_shardings(MESH, a, params, base, state).trainable
    t = train.trainer(lambda p, b: jnp.sum(p["w"]), optim.sft_adamw(0.1), adapters=a,
                      sparse=masks.spiel_selector(total_steps=10))
    sp = jax.eval_shape(lambda p: t.init(jax.random.key(0), p), params).opt_state[1]
    got = specs(shard.state_shardings(MESH, sp, state.trainable, t_sh))
    assert got.candidates["w"] == got.grad_sum["w"] == P("data", "fsdp")
    assert got.count == P() and got.phase == P()


def test_shardings_must_cover_params():
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        shard.state_shardings(MESH, {}, {"w": sds(4), "b": sds(4)}, {"w": P()})


def test_sharding_table_reports_per_device_bytes():
    params = {"w": sds(16, 32)}
    sh = {"w": NamedSharding(MESH, P("fsdp", "tensor"))}
    text = shard.sharding_table(params, sh)
    assert "2,048 bytes, 256 bytes per device" in text  # 16*32*4 / (2*4)
    keyed = shard.sharding_table({"k": jax.random.key(0)}, {"k": P()})
    assert "uint32" in keyed and "8 bytes, 8 bytes per device" in keyed
