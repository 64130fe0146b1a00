"""Matrix views never guess: declared layouts, Flax presets, one view for every consumer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, factored, tree
from tests import helpers as h

EMBED, HEADS, HEAD_DIM = 32, 4, 8  # the nnx.MultiHeadAttention


def _nnx_mha():
    from flax import nnx

    m = nnx.MultiHeadAttention(num_heads=HEADS, in_features=EMBED, qkv_features=EMBED,
                               decode=False, rngs=nnx.Rngs(0))
    return m, nnx.to_pure_dict(nnx.state(m, nnx.Param))


def close(got, want):
    np.testing.assert_allclose(h.f64(got), h.f64(want), **h.MATMUL_F32)


def _randomize(state, key):
    """Non-zero b so that the adapter delta is visible."""
    return jax.tree.map(
        lambda x: jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype), state)


def test_nnx_attention_kernel_is_not_read_as_stacked_layers():
    _, p = _nnx_mha()
    rules = [tree.Rule(where=r".*query/kernel", then=adapters.lora(4))]
    with pytest.raises(ValueError) as e:
        tree.assign(p, rules)
    msg = str(e.value)
    assert "query/kernel: shape (32, 4, 8)" in msg
    assert "DimensionNumbers(reduction_axis=0, output_axis=(1, 2))" in msg
    assert "DimensionNumbers(reduction_axis=(0, 1), output_axis=2)" in msg
    assert "DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=0)" in msg


@pytest.mark.parametrize("how", ["layout", "per_rule"])
def test_nnx_attention_lora_counts_and_materializes(how):
    m, p = _nnx_mha()
    if how == "layout":
        a = tree.assign(p, [tree.Rule(where=r".*query/kernel", then=adapters.lora(4))],
                        layout=tree.dims.multi_head_attention())
    else:
        a = tree.assign(p, [tree.Rule(where=r".*query/kernel", then=adapters.lora(
            4, dimension_numbers=tree.dims.head_split()))])
    st = adapters.init(a, jax.random.key(0), p)
    assert adapters.num_trainable(st.trainable) == 4 * (EMBED + HEADS * HEAD_DIM) == 256
    t = _randomize(st.trainable, jax.random.key(1))
    w = np.asarray(p["query"]["kernel"], np.float64)
    A = np.asarray(t["query/kernel"].a, np.float64)
    B = np.asarray(t["query/kernel"].b, np.float64)
    assert A.shape == (EMBED, 4) and B.shape == (4, HEADS * HEAD_DIM)
    s = 8.0 / 4  # lora's default alpha = 8, scaling alpha/r
    want = (w.reshape(EMBED, HEADS * HEAD_DIM) + s * A @ B).reshape(EMBED, HEADS, HEAD_DIM)
    got = adapters.materialize(a, p, t, st.frozen)
    close(got["query"]["kernel"], want)
    close(adapters.fold(a, p, t, st.frozen)["query"]["kernel"], want)
    # The factored path sees the same view: the NNX layer's output equals the
    # one with the materialised kernel.
    from flax import nnx

    gdef = nnx.graphdef(m)
    x = jax.random.normal(jax.random.key(2), (2, 3, EMBED))

    def run(params, x):
        return nnx.merge(gdef, params)(x)

    y_fac = factored.transform(run, a, t, st.frozen)(p, x)
    y_mat = run(got, x)
    # Sums over features that partly cancel, in two association orders:
    # relative to the output's scale (MATMUL_F32's rtol), as tests/exec does.
    scale = float(jnp.max(jnp.abs(y_mat)))
    np.testing.assert_allclose(h.f64(y_fac), h.f64(y_mat), rtol=h.MATMUL_F32["rtol"],
                               atol=h.MATMUL_F32["rtol"] * scale)


def test_linen_attention_preset():
    from flax import linen as nn

    mod = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=EMBED)
    x = jnp.ones((1, 3, EMBED))
    p = mod.init(jax.random.key(0), x, x)["params"]
    a = tree.assign(p, [tree.Rule(where=r"(query|key|value|out)/kernel",
                                  then=adapters.lora(2))],
                    layout=tree.dims.multi_head_attention())
    st = adapters.init(a, jax.random.key(0), p)
    assert {k: v.a.shape for k, v in st.trainable.items()} == {
        "query/kernel": (EMBED, 2), "key/kernel": (EMBED, 2), "value/kernel": (EMBED, 2),
        "out/kernel": (HEADS * HEAD_DIM, 2)}
    assert st.trainable["out/kernel"].b.shape == (2, EMBED)


def test_conv_linear_general_einsum_presets():
    from flax import nnx

    rngs = nnx.Rngs(0)
    p = {
        "conv": nnx.to_pure_dict(nnx.state(nnx.Conv(4, 8, (3, 3), rngs=rngs), nnx.Param)),
        "lg": nnx.to_pure_dict(nnx.state(nnx.LinearGeneral((4, 8), 16, axis=(-2, -1),
                                                           rngs=rngs), nnx.Param)),
        "ein": nnx.to_pure_dict(nnx.state(nnx.Einsum("btd,dhk->bthk", (16, 4, 8),
                                                     rngs=rngs), nnx.Param)),
    }
    with pytest.raises(ValueError, match=re.escape(
            "DimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3) for a 2-D conv")):
        tree.assign(p, [tree.Rule(where="conv/kernel", then=adapters.lora(2))])
    rules = [
        tree.Rule(where="conv/kernel",
                  then=adapters.lora(2, dimension_numbers=tree.dims.conv())),
        tree.Rule(where="lg/kernel",
                  then=adapters.lora(2, dimension_numbers=tree.dims.linear_general(n_in=2))),
        tree.Rule(where="ein/kernel", then=adapters.lora(
            2, dimension_numbers=tree.dims.einsum("btd,dhk->bthk"))),
    ]
    st = adapters.init(tree.assign(p, rules), jax.random.key(0), p)
    shapes = {k: (v.a.shape, v.b.shape) for k, v in st.trainable.items()}
    assert shapes == {"conv/kernel": ((36, 2), (2, 8)), "lg/kernel": ((32, 2), (2, 16)),
                      "ein/kernel": ((16, 2), (2, 32))}


def test_stacked_declaration_and_the_scanned_convention():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    blocks = {"blocks": {"w": w, "b": jnp.zeros((3, 5))}, "head": jnp.ones((5, 2))}
    rule = [tree.Rule(where=r"blocks/w", then=adapters.lora(2))]
    with pytest.raises(ValueError, match=r"blocks/w: shape \(3, 4, 5\)"):
        tree.assign(blocks, rule)
    a = tree.assign(blocks, rule, layout=tree.stacked("blocks"))
    assert a["blocks/w"].dimension_numbers == tree.dims.stacked()
    st = adapters.init(a, jax.random.key(0), blocks)
    t = _randomize(st.trainable, jax.random.key(1))
    got = adapters.materialize(a, blocks, t, st.frozen)["blocks"]["w"]
    s = 8.0 / 2
    for i in range(3):  # one independent matrix per layer
        want = np.asarray(w[i], np.float64) + s * np.asarray(t["blocks/w"].a[i], np.float64
                                                             ) @ np.asarray(t["blocks/w"].b[i])
        close(got[i], want)
    # peftjax's scanned layout (what stack_layers gives) needs no declaration.
    scanned = tree.stack_layers({"layers": {0: {"w": w[0]}, 1: {"w": w[1]}}})
    a2 = tree.assign(scanned, [tree.Rule(where="layers/w", then=adapters.lora(2))])
    assert a2["layers/w"].dimension_numbers == tree.dims.stacked()
    # ... but a `layers` module that is not stacked (leading sizes differ) is not
    # taken as scanned, and its 3-D kernel raises with a note saying why.
    mha = {"layers": {"query": {"kernel": jnp.ones((16, 4, 8)), "bias": jnp.ones((4, 8))}}}
    with pytest.raises(ValueError, match="not taken as peftjax's scanned layout"):
        tree.assign(mha, [tree.Rule(where=r".*query/kernel", then=adapters.lora(2))])
    with pytest.raises(ValueError, match="declared stacked, but"):
        tree.assign(mha, [tree.Rule(where=r".*query/kernel", then=adapters.lora(2))],
                    layout=tree.stacked("layers"))
    # A stacked bias is not a matrix per layer.
    with pytest.raises(ValueError, match=r"blocks/b.*not a matrix per layer"):
        tree.assign(blocks, [tree.Rule(where="blocks/b", then=adapters.lora(1))],
                    layout=tree.stacked("blocks"))


def test_stacked_attention_layout_shifts_views_past_the_layer_axis():
    p = {"blocks": {"attn": {"query": {"kernel": jnp.ones((2, 16, 4, 8))},
                             "out": {"kernel": jnp.ones((2, 4, 8, 16))}}}}
    lay = tree.stacked("blocks") | tree.dims.multi_head_attention()
    a = tree.assign(p, [tree.Rule(where=r".*kernel", then=adapters.lora(2))], layout=lay)
    assert a["blocks/attn/query/kernel"].dimension_numbers == tree.DimensionNumbers(
        1, (2, 3), batch_axis=0)
    assert a["blocks/attn/out/kernel"].dimension_numbers == tree.DimensionNumbers(
        (1, 2), 3, batch_axis=0)
    st = adapters.init(a, jax.random.key(0), p)
    assert st.trainable["blocks/attn/query/kernel"].a.shape == (2, 16, 2)
    assert st.trainable["blocks/attn/out/kernel"].b.shape == (2, 2, 16)


def test_layout_validation():
    with pytest.raises(TypeError, match="layer axis counts|axes"):
        tree.Layout(stacked={"layers": "1"})
    with pytest.raises(TypeError, match="DimensionNumbers"):
        tree.Layout(views={"a": (0, 1)})
    with pytest.raises(TypeError, match="peftjax.tree.Layout"):
        tree.assign({"w": jnp.ones((2, 2))}, [tree.Rule(where="w", then="x")],
                    layout={"layers": 1})


def test_bind_gives_each_leaf_its_view_and_the_resolved_matrix():
    p = {"layers": {"q": {"kernel": jnp.arange(24.0).reshape(2, 4, 3)},
                    "norm": {"scale": jnp.ones((2, 4))}},
         "head": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))},
         "conv": {"kernel": jnp.ones((3, 3, 4, 5))},
         "embed": {"embedding": jnp.ones((7, 4))}}
    v = tree.bind(None, p)
    assert isinstance(v, tree.Views)
    assert v.layer_axes == {"layers/q/kernel": 1, "layers/norm/scale": 1}
    q = v.view("layers/q/kernel")
    assert q == tree.DimensionNumbers(1, 2, batch_axis=0)
    assert v.view("layers/norm/scale") is None  # (L, d): not a matrix per layer
    assert v.view("head/kernel") == tree.DimensionNumbers(0, 1)
    assert v.view("head/bias") is None
    # matrix_view leaves embedding tables out unless a views entry names them.
    assert v.view("embed/embedding") == tree.DimensionNumbers(0, 1)
    assert v.matrix_view("embed/embedding") is None
    with pytest.raises(ValueError, match=r"conv/kernel.*\(3, 3, 4, 5\)"):
        v.view("conv/kernel")
    r = tree.resolve(q, p["layers"]["q"]["kernel"].shape, path="layers/q/kernel")
    assert isinstance(r, tree.ResolvedDims)
    assert (r.batch_shape, r.n_in, r.n_out) == ((2,), 4, 3)
    m = tree.to_matrix(p["layers"]["q"]["kernel"], r)
    np.testing.assert_array_equal(m, np.arange(24.0).reshape(2, 4, 3))
    with pytest.raises(TypeError, match="peftjax.tree.Layout"):
        tree.bind({"layers": 1}, p)
    # A declared container whose leaves disagree on the layer axis is an error.
    with pytest.raises(ValueError, match="blocks"):
        tree.bind(tree.stacked("blocks"), {"blocks": {"a": jnp.ones((2, 3, 3)),
                                                     "b": jnp.ones((3, 3, 3))}})
