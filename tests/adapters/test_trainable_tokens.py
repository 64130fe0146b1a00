"""Trainable tokens (adapters.trainable_tokens): selected rows of a table, tied heads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, factored, train, tree
from tests import helpers as h

# The contract suite's indices: below every input size it uses (4, 5, 6),
# not sorted (the values' rows follow token_indices' order).
CONTRACT_INDICES = (3, 1)
V, D = 12, 4


def ref_trainable_tokens(w, t, f, indices=CONTRACT_INDICES):
    """float64 reference: rows ``indices`` of ``w`` replaced by ``t.values``."""
    out = h.f64(w).copy()
    out[list(indices)] = h.f64(t.values)
    return out


def _table(seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((V, D)), dtype)


def _tied_lm(p, ids):
    """A one-table language model: lookup, a nonlinearity, the tied head."""
    e = p["embed"]["embedding"]
    x = jnp.tanh(e[ids] @ p["mix"]["kernel"])
    return x @ e.T


def test_rows_replaced_as_peft_index_copy(getkey):
    w = _table()
    ad = adapters.trainable_tokens([7, 2, 9])
    t, f = ad.init(getkey(), w)
    assert f is None and t.values.shape == (3, D)
    np.testing.assert_array_equal(np.asarray(t.values), np.asarray(w)[[7, 2, 9]])
    np.testing.assert_array_equal(np.asarray(ad.apply(w, t, f)), np.asarray(w))
    vals = jnp.asarray(np.random.default_rng(1).standard_normal((3, D)), jnp.float32)
    got = ad.apply(w, adapters.TrainableTokensParams(vals), f)
    want = np.asarray(w).copy()  # torch's W.index_copy(0, [7, 2, 9], vals)
    want[7], want[2], want[9] = np.asarray(vals)
    np.testing.assert_array_equal(np.asarray(got), want)  # a copy, no arithmetic
    assert dict(ad.hyperparameters) == {"token_indices": (7, 2, 9), "init_weights": True}
    assert dict(adapters.trainable_tokens(np.array([7, 2, 9])).hyperparameters) == dict(
        ad.hyperparameters)  # a tokenizer's id array
    assert ad.factored is None and ad.num_trainable(w) == 3 * D


def test_init_weights_false_is_standard_normal(getkey):
    ad = adapters.trainable_tokens(list(range(0, 64, 2)), init_weights=False)
    t, _ = ad.init(getkey(), jnp.zeros((64, 128), jnp.bfloat16))
    v = h.f64(t.values)
    assert t.values.dtype == jnp.float32 and v.shape == (32, 128)
    # 4096 draws: mean within 4 standard errors, std within 5 %
    assert abs(v.mean()) < 4 / 64 and abs(v.std() - 1) < 0.05


def test_tied_head_sees_the_same_rows_and_training_touches_only_them(getkey):
    """One shared table for the lookup and the head: both see the trained rows;
    a training step moves exactly the selected rows, the others stay bit-identical."""
    rng = np.random.default_rng(3)
    params = {"embed": {"embedding": _table(4)},
              "mix": {"kernel": jnp.asarray(rng.standard_normal((D, D)), jnp.float32)}}
    idx = [5, 0, 11]
    a = tree.assign(params, [tree.Rule(where="embed/embedding",
                                       then=adapters.trainable_tokens(idx))])
    ids = jnp.asarray([[5, 1, 11, 3], [0, 0, 7, 5]])
    tgt = jnp.asarray([[1, 11, 3, 0], [0, 7, 5, 2]])
    state = adapters.init(a, getkey(), params)
    vals = h.f64(state.trainable["embed/embedding"].values) + rng.standard_normal((3, D))
    trained = {"embed/embedding": adapters.TrainableTokensParams(jnp.asarray(vals, jnp.float32))}
    got = _tied_lm(adapters.materialize(a, params, trained, state.frozen), ids)
    e = h.f64(params["embed"]["embedding"]).copy()
    e[idx] = vals
    want = np.tanh(e[np.asarray(ids)] @ h.f64(params["mix"]["kernel"])) @ e.T
    np.testing.assert_allclose(h.f64(got), want, **h.MATMUL_F32)
    base = _tied_lm(params, ids)
    assert np.abs(want - h.f64(base)).max() > 0.5  # the head moved too

    def loss(p, batch):
        logits = _tied_lm(p, batch[0])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][..., None], -1))

    # the default (factored) step: no factored form, so the table is
    # materialised, loudly, once
    t = train.trainer(loss, optax.adam(0.1), adapters=a)
    st = t.init(getkey(), params)
    before = np.asarray(t.params(st, params)["embed"]["embedding"])
    losses = []
    with pytest.warns(factored.FactoredFallbackWarning, match="embed/embedding"):
        st, m = t.step(st, (ids, tgt), params)
    losses.append(float(m["loss"]))
    for _ in range(2):
        st, m = t.step(st, (ids, tgt), params)
        losses.append(float(m["loss"]))
    after = np.asarray(t.params(st, params)["embed"]["embedding"])
    assert losses[-1] < losses[0]
    assert sorted(st.trainable) == ["embed/embedding"]
    assert st.trainable["embed/embedding"].values.shape == (3, D)
    rest = np.setdiff1d(np.arange(V), idx)
    np.testing.assert_array_equal(after[rest], before[rest])  # untouched rows: copies
    assert np.all(np.abs(after[idx] - before[idx]).max(-1) > 1e-3)


def test_untied_head_kernel_through_a_transposed_view(getkey):
    head = jnp.asarray(np.random.default_rng(2).standard_normal((D, V)), jnp.float32)
    ad = adapters.trainable_tokens(
        [4, 10], dimension_numbers=tree.DimensionNumbers(reduction_axis=-1, output_axis=-2))
    t, f = ad.init(getkey(), head)
    assert t.values.shape == (2, D)
    t = adapters.TrainableTokensParams(t.values * -2.0)
    want = h.f64(head).copy()
    want[:, [4, 10]] = h.f64(t.values).T  # torch's lm_head rows = Flax columns
    np.testing.assert_array_equal(h.f64(ad.apply(head, t, f)), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fold_unfold_exact_stacked(dtype, getkey):
    params = {"tables": jnp.asarray(np.random.default_rng(5).standard_normal((2, V, D)), dtype)}
    a = tree.assign(params, [tree.Rule(where="tables", then=adapters.trainable_tokens(
        [1, 6], dimension_numbers=tree.dims.stacked()))])
    state = adapters.init(a, getkey(), params)
    trained = jax.tree.map(lambda v: v * 3.0 + 0.5, state.trainable)
    merged, aux = adapters.fold(a, params, trained, state.frozen, return_aux=True)
    np.testing.assert_array_equal(h.f64(merged["tables"][:, [1, 6]]),
                                  h.f64(trained["tables"].values.astype(dtype)))
    back = adapters.unfold(a, merged, trained, state.frozen, aux=aux)
    h.assert_tree_allclose(back, params, **h.EXACT)
    with pytest.raises(TypeError, match="needs the aux"):
        adapters.unfold(a, merged, trained, state.frozen)
    with pytest.raises(ValueError, match="unfold needs the aux"):
        a["tables"].unapply(merged["tables"], trained["tables"], None, None)


@pytest.mark.parametrize("indices,err,match", [
    ([], ValueError, "token_indices is empty"),
    ([3, 1, 3], ValueError, r"repeats \[3\]"),
    ([2, -1], ValueError, "must be >= 0, got -1"),
    ([1.0], TypeError, "must hold ints, got 1.0"),
    ("abc", TypeError, "sequence of ints"),
    (np.zeros((2, 2), np.int32), TypeError, "sequence of ints"),
])
def test_bad_indices(indices, err, match):
    with pytest.raises(err, match=match):
        adapters.trainable_tokens(indices)


def test_out_of_range_and_shape_errors(getkey):
    with pytest.raises(ValueError, match=r"token index 12 is out of range for a "
                                         r"table of 12 rows \(matrix view \(12, 4\)"):
        adapters.trainable_tokens([0, 12]).init(getkey(), _table())
    ad = adapters.trainable_tokens([0, 2])
    with pytest.raises(ValueError, match=r"values have shape \(3, 4\), expected \(2, 4\)"):
        ad.apply(_table(), adapters.TrainableTokensParams(jnp.zeros((3, D))), None)
    with pytest.raises(TypeError, match="param_dtype must be floating"):
        adapters.trainable_tokens([0], param_dtype=jnp.int32)
