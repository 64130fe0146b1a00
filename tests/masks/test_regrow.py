"""SpIEL drop-and-regrow (docs/methods.md#spiel, its invariants)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import masks

_regrow = jax.jit(masks.regrow)


def _ref_regrow(indices, values, cands, scores, n):
    """NumPy transcription of the reference rule (docs/methods.md#spiel)."""
    indices, values = indices.copy(), values.copy()
    slots = np.argsort(np.abs(values), kind="stable")[:n]
    outgoing = indices[slots]
    remaining = set(indices.tolist()) - set(outgoing.tolist())
    valid = np.array([c not in remaining for c in cands])
    vc, vs = cands[valid], np.abs(scores[valid])
    order = np.argsort(-vs, kind="stable")[:min(n, len(vc))]
    incoming = vc[order]
    both = set(incoming.tolist()) & set(outgoing.tolist())
    slots = np.array([s for s in slots if indices[s] not in both], int)
    incoming = np.array([c for c in incoming if c not in both], int)
    slots = slots[:len(incoming)]
    indices[slots] = incoming
    values[slots] = 0.0
    changed = np.zeros(len(indices), bool)
    changed[slots] = True
    return indices, values, changed


def test_hand_built_4x4():
    # A 4x4 matrix, k = 4 active entries.
    idx = jnp.array([0, 5, 10, 15], jnp.int32)
    val = jnp.array([0.9, -0.05, 0.4, 0.01])
    cands = jnp.array([3, 15, 12, 6], jnp.int32)
    scores = jnp.array([-2.0, 9.0, 0.5, 1.0])
    r = _regrow(idx, val, cands, scores, 2)
    # Outgoing: slot 3 (pos 15, |.01|), slot 1 (pos 5, |.05|). Incoming by |score|:
    # 15 (9.0; also outgoing: stays), 3 (2.0). Slot 3 keeps 15; slot 1 gets 3.
    assert r.indices.tolist() == [0, 3, 10, 15]
    assert r.changed.tolist() == [False, True, False, False]
    assert r.values.tolist() == pytest.approx([0.9, 0.0, 0.4, 0.01])
    assert int(r.source[1]) == 0  # candidate 0 is position 3


def test_candidates_already_remaining_are_not_grown():
    idx = jnp.array([1, 2, 3], jnp.int32)
    val = jnp.array([0.1, 0.2, 0.3])
    r = _regrow(idx, val, jnp.array([2, 3, 8], jnp.int32),
                     jnp.array([10.0, 9.0, 1.0]), 1)
    assert r.indices.tolist() == [8, 2, 3]


def test_fewer_valid_candidates_drop_fewer_and_p0_is_identity():
    idx = jnp.array([1, 2, 3, 4], jnp.int32)
    val = jnp.array([0.1, 0.2, 0.3, 0.4])
    r = _regrow(idx, val, jnp.array([3, 4, 9], jnp.int32),
                     jnp.array([5.0, 4.0, 1.0]), 3)
    assert int(r.changed.sum()) == 1 and r.indices.tolist() == [9, 2, 3, 4]
    r0 = _regrow(idx, val, jnp.array([7, 8], jnp.int32), jnp.ones(2), 0)
    assert r0.indices.tolist() == idx.tolist() and not bool(r0.changed.any())
    np.testing.assert_array_equal(np.asarray(r0.values), np.asarray(val))


@pytest.mark.parametrize("seed", range(6))
def test_matches_numpy_reference_and_keeps_invariants(seed):
    rng = np.random.default_rng(seed)
    size, k, c = 64, 12, 12
    idx = np.sort(rng.choice(size, k, replace=False)).astype(np.int32)
    cands = rng.choice(size, c, replace=False).astype(np.int32)
    val = rng.standard_normal(k).astype(np.float32)
    scores = rng.standard_normal(c).astype(np.float32)
    n = int(rng.integers(0, k + 1))
    r = jax.jit(masks.regrow)(idx, val, cands, scores, n)
    ri, rv, rc = _ref_regrow(idx, val, cands, scores, n)
    np.testing.assert_array_equal(np.asarray(r.indices), ri)
    np.testing.assert_array_equal(np.asarray(r.values), rv)
    np.testing.assert_array_equal(np.asarray(r.changed), rc)
    np.testing.assert_array_equal(cands[np.asarray(r.source)][rc], ri[rc])
    # Pruned slots are exactly the smallest |delta| among those that moved.
    assert len(set(np.asarray(r.indices).tolist())) == k


def test_many_cycles_unique_in_range_and_count_constant():
    size, k = 50, 10
    key = jax.random.key(0)
    idx = masks.random_support(key, size, k)
    val = jnp.zeros((k,))
    step = jax.jit(masks.regrow)
    for _ in range(40):
        key, k1, k2, k3 = jax.random.split(key, 4)
        g = jax.random.normal(k1, (size,))
        cands = masks.top_k_candidates(g, k)
        val = val + jax.random.normal(k2, (k,))
        r = step(idx, val, cands, g[cands], jax.random.randint(k3, (), 0, k + 1))
        idx, val = r.indices, r.values
        got = np.asarray(idx)
        assert got.shape == (k,) and len(set(got.tolist())) == k
        assert got.min() >= 0 and got.max() < size


def test_vmapped_over_layers_equals_loop():
    rng = np.random.default_rng(3)
    idx = np.stack([np.sort(rng.choice(30, 6, replace=False)) for _ in range(3)]).astype(np.int32)
    cands = np.stack([rng.choice(30, 6, replace=False) for _ in range(3)]).astype(np.int32)
    val = rng.standard_normal((3, 6)).astype(np.float32)
    sc = rng.standard_normal((3, 6)).astype(np.float32)
    r = jax.vmap(masks.regrow, in_axes=(0, 0, 0, 0, None))(idx, val, cands, sc, 3)
    for i in range(3):
        ri = _regrow(idx[i], val[i], cands[i], sc[i], 3)
        np.testing.assert_array_equal(np.asarray(r.indices[i]), np.asarray(ri.indices))


def test_schedule_values():
    kw = dict(accumulation_steps=5, total_steps=100, initial_rate=0.2)
    assert masks.replace_fraction(5, **kw) == 1.0
    assert masks.replace_fraction(25, **kw) == pytest.approx(0.2 * (1 - 25 / 100))
    assert masks.replace_fraction(45, **kw) == pytest.approx(0.2 * (1 - 45 / 100))
    for c in (5, 25, 45):
        assert masks.replace_fraction(c, policy="cosine", **kw) == pytest.approx(
            0.2 * (1 + np.cos(np.pi * c / 100)) / 2)
    counts = masks.replace_counts(100, reselection_steps=20, **kw)
    # int(100·0.2·(1 − 0.65)) = int(6.999...) = 6 in float64, as in the reference.
    assert counts.tolist() == [100, 15, 11, 6, 3, 0]
    with pytest.raises(ValueError, match="policy must be one of"):
        masks.replace_fraction(5, policy="step", **kw)
