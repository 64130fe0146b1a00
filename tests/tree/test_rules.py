"""Rules: fullmatch regexes, first match wins, unused rules raise."""

import jax.numpy as jnp
import optax
import pytest

from peftjax import tree


def _params():
    return {
        "attn": {"q": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 4))}},
        "mlp": {"up": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}},
        "norm": {"scale": jnp.ones(4)},
    }


def test_fullmatch_not_search():
    a = tree.assign(_params(), [tree.Rule(where="q/kernel", then=1)],
                    allow_unused=True)
    assert a == {}  # "q/kernel" does not fullmatch "attn/q/kernel"
    a = tree.assign(_params(), [tree.Rule(where=".*q/kernel", then=1)])
    assert a == {"attn/q/kernel": 1}


def test_first_match_wins_and_none_excludes():
    rules = [
        tree.Rule(where=r"attn/v/kernel", then=None),
        tree.Rule(where=r".*kernel", then="lora"),
    ]
    assert tree.assign(_params(), rules) == {
        "attn/q/kernel": "lora", "mlp/up/kernel": "lora"}


def test_unused_rule_lists_closest_paths():
    with pytest.raises(ValueError) as e:
        tree.assign(_params(), [tree.Rule(where=r"attn/k/kernel", then=1)])
    msg = str(e.value)
    assert "attn/k/kernel" in msg and "attn/q/kernel" in msg
    assert "allow_unused" in msg


def test_predicates_compose_and_are_hashable():
    pred = tree.all_of(r".*kernel", tree.ndim_at_least(2),
                       tree.not_(tree.shape_is((4, 8))))
    hash(pred)
    assert "all_of" in repr(pred)
    a = tree.assign(_params(), [tree.Rule(where=pred, then=True)])
    assert sorted(a) == ["attn/q/kernel", "attn/v/kernel"]
    a = tree.assign(_params(), [tree.Rule(where=tree.any_of("norm/scale",
                                                            tree.dtype_is(jnp.int8)),
                                          then=True)])
    assert list(a) == ["norm/scale"]


def test_labels_for_optax_partition():
    params = _params()
    lab = tree.labels(params, [tree.Rule(where=r"attn/.*", then="adam")],
                      default="frozen")
    assert lab["attn"]["q"]["kernel"] == "adam"
    assert lab["mlp"]["up"]["bias"] == "frozen"
    opt = optax.partition({"adam": optax.adam(1e-3), "frozen": optax.set_to_zero()},
                          lab)
    state = opt.init(params)
    assert state is not None
    with pytest.raises(ValueError, match="no default label"):
        tree.labels(params, [tree.Rule(where=r"attn/.*", then="adam")])
    with pytest.raises(TypeError, match="must be strings"):
        tree.labels(params, [tree.Rule(where=r"attn/.*", then=3)], default="x")


def test_mask_for_optax_masked():
    m = tree.mask(_params(), [tree.Rule(where=r".*bias", then=True)])
    assert m["mlp"]["up"]["bias"] is True and m["norm"]["scale"] is False
    with pytest.raises(TypeError, match="mask payloads"):
        tree.mask(_params(), [tree.Rule(where=r".*bias", then="yes")])


def test_rule_validation():
    with pytest.raises(ValueError, match="invalid regex"):
        tree.Rule(where="(", then=1)
    with pytest.raises(TypeError, match="regex string or a callable"):
        tree.Rule(where=3, then=1)
    with pytest.raises(TypeError):
        tree.Rule(".*", 1)  # keyword-only
    with pytest.raises(TypeError, match="sequence of Rule"):
        tree.assign(_params(), ".*")


def test_describe_counts_and_totals():
    params = _params()
    text = tree.describe({"mlp/up/kernel": "adam", "norm/scale": "frozen"}, params)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "view", "payload", "trainable"]
    row = [ln for ln in lines if ln.startswith("mlp/up/kernel")][0]
    assert row.split()[-1] == "32"
    assert lines[-1] == ("5 leaves, 76 parameters; trainable params: 32 || all params: 76 "
                         "|| trainable%: 42.1053")
    with pytest.raises(ValueError, match="not in params"):
        tree.describe({"nope": 1}, params)


def test_describe_shows_matrix_views_and_errors_name_the_path():
    from peftjax import adapters

    p = {"attn": {"query": {"kernel": jnp.ones((16, 4, 8)), "bias": jnp.ones((4, 8))}},
         "layers": {"w": jnp.ones((3, 4, 5)), "b": jnp.ones((3, 5))},
         "dense": {"kernel": jnp.ones((8, 8))}}
    lay = tree.dims.multi_head_attention()
    a = tree.assign(p, [tree.Rule(where=r".*kernel|layers/w", then=adapters.lora(2))],
                    layout=lay)
    rows = {ln.split()[0]: ln for ln in tree.describe(a, p).splitlines()[1:-1]}
    assert "(16, 32)" in rows["attn/query/kernel"]  # (embed, heads·head_dim)
    assert rows["attn/query/kernel"].split()[-1] == str(2 * (16 + 32))
    assert "(3, 4, 5)" in rows["layers/w"]  # (L, in, out): 3 matrices (4, 5)
    assert rows["layers/w"].split()[-1] == str(3 * 2 * (4 + 5))
    # Labels get the layout's view; a head-split bias is not a matrix.
    text = tree.describe({"attn/query/kernel": "galore", "attn/query/bias": "adam"}, p,
                         layout=lay)
    rows = {ln.split()[0]: ln for ln in text.splitlines()[1:-1]}
    assert "float32  (16, 32)  'galore'" in rows["attn/query/kernel"]
    assert "float32  -" in rows["attn/query/bias"]
    # Every error names the path.
    with pytest.raises(ValueError, match=r"describe: 'dense/kernel' \(shape \(8, 8\).*"
                       r"rank=9 exceeds min\(in, out\)=8"):
        tree.describe({"dense/kernel": adapters.lora(9)}, p)
    with pytest.raises(ValueError, match=r"describe: attn/query/kernel: shape \(16, 4, 8\)"):
        tree.describe({"attn/query/kernel": adapters.lora(2)}, p)
