"""GaLore/FRUGAL default leaf selection: the matrices of the tree's layout, nothing guessed."""

import jax
import jax.numpy as jnp
import optax
import pytest

from peftjax import optim, tree


def _projected(state) -> dict[str, tuple]:
    """``{path: basis shape}`` of the projected leaves of a GaLore/FRUGAL state."""
    flat = jax.tree_util.tree_flatten_with_path(
        state.projector, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    out = {}
    for kp, leaf in flat:
        if isinstance(leaf, optax.MaskedNode):
            continue
        out[tree.canonical(kp)] = tuple(leaf.shape)
    return out


def _attention_tree():
    """An nnx.MultiHeadAttention-shaped tree (embed 16, 4 heads of 8), plus the rest."""
    z = jnp.zeros
    return {
        "embed": {"embedding": z((11, 16))},
        "attn": {"query": {"kernel": z((16, 4, 8)), "bias": z((4, 8))},
                 "out": {"kernel": z((4, 8, 16)), "bias": z((16,))}},
        "dense": {"kernel": z((16, 6)), "bias": z((6,))},
    }


@pytest.mark.parametrize("make", [
    lambda **kw: optim.scale_by_galore(rank=2, update_proj_gap=5, **kw),
    lambda **kw: optim.scale_by_frugal(density=0.25, update_gap=5, **kw),
], ids=["galore", "frugal"])
def test_default_selection_needs_declared_views_and_skips_biases_and_embeddings(make):
    params = _attention_tree()
    # A head-split kernel is not guessed to be 16 stacked (4, 8) matrices.
    with pytest.raises(ValueError, match=r"(?s)attn/out/kernel.*shape \(4, 8, 16\).*\n.*"
                       r"DimensionNumbers\(reduction_axis=\(0, 1\), output_axis=2\)"):
        make().init(params)
    st = make(dimension_numbers=tree.dims.multi_head_attention()).init(params)
    proj = _projected(st)
    # The kernels, each one matrix: query (16, 32), out (32, 16), dense (16, 6);
    # not the (heads, head_dim) bias, not the embedding table.
    assert set(proj) == {"attn/query/kernel", "attn/out/kernel", "dense/kernel"}
    assert all(shape[0] == 1 for shape in proj.values())  # one slice each


def test_stacked_layers_project_per_layer_and_skip_stacked_vectors():
    z = jnp.zeros
    params = {"layers": {"q": {"kernel": z((3, 6, 8)), "bias": z((3, 8))},
                         "norm": {"scale": z((3, 6))}},
              "embed_tokens": {"embedding": z((20, 6))},
              "lm_head": {"kernel": z((6, 20))}}
    st = optim.scale_by_galore(rank=2, update_proj_gap=5).init(params)
    proj = _projected(st)
    # std side rule on (in=6, out=8): project the input axis, basis (S, in, r).
    assert proj == {"layers/q/kernel": (3, 6, 2), "lm_head/kernel": (1, 6, 2)}
    # Moments: projected leaves are low-rank per layer, the rest full-size.
    mu = tree.leaves_by_path(st.inner_state.mu)
    assert mu["layers/q/kernel"].shape == (3, 2, 8)
    assert mu["layers/q/bias"].shape == (3, 8)
    assert mu["embed_tokens/embedding"].shape == (20, 6)


def test_explicit_selections_keep_working():
    params = _attention_tree()
    # A mapping names what it wants projected (the embedding too); other
    # paths follow the default.
    st = optim.scale_by_galore(rank=2, update_proj_gap=5, dimension_numbers={
        "embed/embedding": tree.dims.dense(),
        "attn/query/kernel": tree.dims.head_split(),
        "attn/out/kernel": None,
    }).init(params)
    assert set(_projected(st)) == {"embed/embedding", "attn/query/kernel", "dense/kernel"}
    # A callable decides for every leaf.
    st = optim.scale_by_galore(
        rank=2, update_proj_gap=5,
        dimension_numbers=lambda p, x: tree.dims.dense() if p == "attn/query/bias" else None,
    ).init(params)
    assert set(_projected(st)) == {"attn/query/bias"}
    # A Layout view that names a bias asks for it.
    lay = tree.Layout(views={r"attn/query/bias": tree.dims.dense(),
                             r".*query/kernel": tree.dims.head_split(),
                             r".*out/kernel": tree.dims.head_merge()})
    st = optim.scale_by_galore(rank=2, update_proj_gap=5, dimension_numbers=lay).init(params)
    assert "attn/query/bias" in _projected(st)
