"""Merge methods against hand-computed examples (docs/methods.md#model-merging)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, merge, tree
from tests import helpers as h


def _t(*v):
    return jnp.asarray(v, jnp.float32)


def _base():
    return {"w": jnp.zeros(4, jnp.float32), "b": jnp.zeros(3, jnp.float32),
            "ids": jnp.arange(3, dtype=jnp.int32)}


def _model(w, b=(0.0, 0.0, 0.0)):
    return {"w": _t(*w), "b": _t(*b), "ids": jnp.arange(3, dtype=jnp.int32)}


class TestTaskArithmetic:
    def test_one_task_returns_finetuned_and_zero_scale_returns_base(self):
        base = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)),
                                 jnp.bfloat16)}
        ft = {"w": base["w"] + jnp.asarray(0.5, jnp.bfloat16)}
        out = merge.task_arithmetic(base, [ft])
        assert out["w"].dtype == jnp.bfloat16
        h.assert_tree_allclose(out, ft, **h.BF16)
        h.assert_tree_allclose(merge.task_arithmetic(base, [ft], scale=0.0), base,
                               **h.EXACT)

    def test_weights_negation_and_normalize(self):
        base = _base()
        m1, m2 = _model([1, 2, 3, 4]), _model([2, 0, 0, 2])
        out = merge.task_arithmetic(base, [m1, m2], weights=[1.0, -1.0])
        np.testing.assert_array_equal(np.asarray(out["w"]), [-1, 2, 3, 2])
        out = merge.task_arithmetic(base, [m1, m2], weights=[1.0, 3.0], normalize=True)
        np.testing.assert_allclose(h.f64(out["w"]), [1.75, 0.5, 0.75, 2.5],
                                   **h.ELEMENTWISE_F32)
        np.testing.assert_array_equal(np.asarray(out["ids"]), [0, 1, 2])

    def test_rules_select_leaves(self):
        base = _base()
        out = merge.task_arithmetic(base, [_model([1, 1, 1, 1], [5, 5, 5])],
                                    rules=[tree.Rule(where="w", then=True)])
        np.testing.assert_array_equal(np.asarray(out["w"]), [1, 1, 1, 1])
        np.testing.assert_array_equal(np.asarray(out["b"]), [0, 0, 0])


class TestTies:
    def test_three_task_hand_example(self):
        # sums [-1, -2, 0, 0] -> signs [-, -, +, +]; agreeing means:
        # [-3/1, (-2-1)/2, (0.5+0.5)/2, 2/1]
        base = _base()
        ms = [_model([1, -2, 0.5, 0]), _model([-3, -1, 0.5, 2]), _model([1, 1, -1, -2])]
        out = merge.ties(base, ms, density=1.0, rules=[tree.Rule(where="w", then=True)])
        np.testing.assert_allclose(h.f64(out["w"]), [-3, -1.5, 0.5, 2],
                                   **h.ELEMENTWISE_F32)

    def test_density_one_single_model_and_zero_ignored(self):
        base = _base()
        m = _model([1, -2, 0, 4], [1, 2, 3])
        h.assert_tree_allclose(merge.ties(base, [m], density=1.0), m, **h.EXACT)
        # Disjoint mean ignores zeros: (4 + 0) -> 4, not 2.
        out = merge.ties(base, [_model([4, 0, 0, 0]), _model([0, 0, 0, 0])],
                         density=1.0)
        np.testing.assert_array_equal(np.asarray(out["w"]), [4, 0, 0, 0])

    def test_opposite_equal_entries_tie_goes_positive(self):
        out = merge.ties(_base(), [_model([1, 0, 0, 0]), _model([-1, 0, 0, 0])],
                         density=1.0)
        np.testing.assert_array_equal(np.asarray(out["w"]), [1, 0, 0, 0])

    def test_per_tensor_vs_global_trimming(self):
        v = {"big": _t(10, 9, 8, 7), "small": _t(0.4, 0.3, 0.2, 0.1)}
        per = merge.trim(v, 0.5)
        np.testing.assert_array_equal(np.asarray(per["big"]), [10, 9, 0, 0])
        np.testing.assert_array_equal(np.asarray(per["small"]), _t(0.4, 0.3, 0, 0))
        glob = merge.trim(v, 0.5, mode=merge.Trim.GLOBAL)
        np.testing.assert_array_equal(np.asarray(glob["big"]), [10, 9, 8, 7])
        np.testing.assert_array_equal(np.asarray(glob["small"]), [0, 0, 0, 0])

    def test_jittable(self):
        base = _base()
        ms = [_model([1, -2, 0.5, 0]), _model([-3, -1, 0.5, 2])]
        f = jax.jit(functools.partial(merge.ties, density=0.5))
        h.assert_tree_allclose(f(base, ms), merge.ties(base, ms, density=0.5),
                               **h.EXACT)


class TestDare:
    def test_density_one_is_task_arithmetic(self):
        ms = [_model([1, 2, 3, 4]), _model([0, 1, 0, 1])]
        out = merge.dare(_base(), ms, density=1.0, key=jax.random.key(0))
        h.assert_tree_allclose(out, merge.task_arithmetic(_base(), ms), **h.EXACT)

    def test_drop_rate_survivors_and_unbiasedness(self):
        tau = {"w": jnp.asarray(np.random.default_rng(1).uniform(1, 2, 20000),
                                jnp.float32)}
        out = merge.drop_and_rescale(tau, 0.3, jax.random.key(4))["w"]
        kept = np.asarray(out) != 0
        assert abs(kept.mean() - 0.3) < 0.015  # 20000 draws: > 4 sigma
        np.testing.assert_allclose(h.f64(out)[kept], h.f64(tau["w"])[kept] / 0.3,
                                   **h.ELEMENTWISE_F32)
        small = {"w": _t(1.0, -2.0, 3.0)}
        keys = jax.random.split(jax.random.key(0), 4000)
        draws = jax.vmap(lambda k: merge.drop_and_rescale(small, 0.5, k)["w"])(keys)
        # Monte-Carlo mean of 4000 draws: std of the mean <= 3/sqrt(4000) ~ 0.05.
        np.testing.assert_allclose(h.f64(draws.mean(0)), [1, -2, 3], atol=0.2)

    def test_dare_ties_and_seeded(self):
        ms = [_model([1, -2, 0.5, 0]), _model([-3, -1, 0.5, 2])]
        a = merge.dare(_base(), ms, density=0.5, key=jax.random.key(2),
                       combine=merge.Combine.TIES)
        b = merge.dare(_base(), ms, density=0.5, key=jax.random.key(2),
                       combine=merge.Combine.TIES)
        h.assert_tree_allclose(a, b, **h.EXACT)


class TestBreadcrumbs:
    def test_hand_row(self):
        row = _t(10, 5, 4, 3, 2, 1, 0.5, 0.1, 0.05, 0.01)
        mask = merge.breadcrumb_mask(row, density=0.3, gamma=0.1)
        np.testing.assert_array_equal(np.asarray(row)[np.asarray(mask)], [5, 4, 3])

    def test_per_row_counts(self):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 40)), jnp.float32)
        mask = merge.breadcrumb_mask(x, density=0.15, gamma=0.05)
        np.testing.assert_array_equal(np.asarray(mask).sum(-1), [6] * 7)
        # The two largest |x| of each row (int(40 * 0.05) = 2) are dropped.
        top2 = np.argsort(-np.abs(np.asarray(x)), axis=-1)[:, :2]
        assert not np.take_along_axis(np.asarray(mask), top2, -1).any()

    def test_merge_and_scalar_untouched(self):
        base = {"w": jnp.zeros((1, 4)), "s": jnp.zeros(())}
        ft = {"w": _t(4, 3, 2, 1)[None], "s": jnp.asarray(2.0)}
        out = merge.breadcrumbs(base, [ft], density=0.5, gamma=0.25, scale=0.5)
        np.testing.assert_array_equal(np.asarray(out["w"]), [[0, 1.5, 1.0, 0]])
        assert float(out["s"]) == 1.0


class TestModelStock:
    def _ft(self, vecs):
        return [{"w": jnp.asarray(v, jnp.float32) + 1.0} for v in vecs]

    def test_identical_orthogonal_and_sixty_degrees(self):
        base = {"w": jnp.ones(3)}
        same = self._ft([[1, 2, 3], [1, 2, 3]])
        h.assert_tree_allclose(merge.model_stock(base, same), same[0], **h.MATMUL_F32)
        orth = self._ft([[1, 0, 0], [0, 1, 0]])
        h.assert_tree_allclose(merge.model_stock(base, orth), base, **h.MATMUL_F32)
        s3 = math.sqrt(3.0)
        vecs = np.array([[1, 0, 0], [0.5, s3 / 2, 0], [0.5, s3 / 6, math.sqrt(6) / 3]])
        out = merge.model_stock(base, self._ft(vecs))
        # N = 3, cos = 0.5: t = 1.5 / 2 = 0.75.
        np.testing.assert_allclose(h.f64(out["w"]), 1.0 + 0.75 * vecs.mean(0),
                                   **h.MATMUL_F32)

    def test_needs_two_models(self):
        with pytest.raises(ValueError, match="at least 2"):
            merge.model_stock({"w": jnp.ones(2)}, [{"w": jnp.ones(2)}])


class TestLines:
    def test_factors_pinned_on_four_layers_both_layouts(self):
        alpha, beta = 0.1, 0.9
        want = [0.1, 0.4, 0.7, 1.0]
        np.testing.assert_allclose(merge.layer_scales(4, alpha, beta), want)
        base = {"embed": jnp.zeros(2), "layers": {str(i): {"w": jnp.zeros(2)}
                                                  for i in range(4)}}
        ft = jax.tree.map(lambda x: x + 1.0, base)
        out = merge.lines(base, [ft], alpha=alpha, beta=beta)
        got = [float(out["layers"][str(i)]["w"][0]) for i in range(4)]
        np.testing.assert_allclose(got, want, **h.ELEMENTWISE_F32)
        assert float(out["embed"][0]) == pytest.approx(alpha)
        stacked = tree.stack_layers(base)
        out_s = merge.lines(stacked, [jax.tree.map(lambda x: x + 1.0, stacked)],
                            alpha=alpha, beta=beta, other_scale=1.0)
        np.testing.assert_allclose(h.f64(out_s["layers"]["w"][:, 0]), want,
                                   **h.ELEMENTWISE_F32)
        assert float(out_s["embed"][0]) == 1.0


class TestAdapterArithmetic:
    def _lora(self, seed, rank, shape=(6, 5)):
        rng = np.random.default_rng(seed)
        return {"q": adapters.LoRAParams(
            jnp.asarray(rng.standard_normal(shape[:-1] + (rank,)), jnp.float32),
            jnp.asarray(rng.standard_normal(shape[:-2] + (rank, shape[-1])),
                        jnp.float32))}

    def _dense(self, ts, scalings, weights):
        return sum(w * s * h.f64(t["q"].a) @ h.f64(t["q"].b)
                   for t, s, w in zip(ts, scalings, weights, strict=True))

    def test_concatenate_is_exact(self):
        ts = [self._lora(0, 2), self._lora(1, 3)]
        out = merge.adapters.concatenate(ts, scalings=[2.0, 0.5], weights=[1.0, -1.0])
        assert out["q"].a.shape == (6, 5) and out["q"].b.shape == (5, 5)
        np.testing.assert_allclose(h.f64(out["q"].a) @ h.f64(out["q"].b),
                                   self._dense(ts, [2.0, 0.5], [1.0, -1.0]),
                                   **h.MATMUL_F32)

    def test_svd_full_rank_exact_and_truncation(self):
        ts = [self._lora(0, 2), self._lora(1, 2)]
        want = self._dense(ts, [1.0, 1.0], [1.0, 1.0])
        full = merge.adapters.svd_refactor(ts, rank=4, scalings=[1.0, 1.0])
        np.testing.assert_allclose(h.f64(full["q"].a) @ h.f64(full["q"].b), want,
                                   **h.MATMUL_F32)
        r2 = merge.adapters.svd_refactor(ts, rank=2, scalings=[1.0, 1.0])
        u, s, vt = np.linalg.svd(want)
        np.testing.assert_allclose(h.f64(r2["q"].a) @ h.f64(r2["q"].b),
                                   (u[:, :2] * s[:2]) @ vt[:2], **h.MATMUL_F32)
        stacked = merge.adapters.svd_refactor([self._lora(3, 2, (3, 6, 5))], rank=2,
                                              scalings=[1.0])
        assert stacked["q"].a.shape == (3, 6, 2)

    def test_linear_single_adapter_exact_and_rank_check(self):
        t = self._lora(0, 2)
        out = merge.adapters.linear([t], scalings=[2.0], weights=[0.25])
        np.testing.assert_allclose(h.f64(out["q"].a) @ h.f64(out["q"].b),
                                   self._dense([t], [2.0], [0.25]), **h.MATMUL_F32)
        with pytest.raises(ValueError, match="ranks"):
            merge.adapters.linear([t, self._lora(1, 3)], scalings=[1.0, 1.0])

    def test_ties_on_adapter_deltas(self):
        ts = [self._lora(0, 2), self._lora(1, 2)]
        out = merge.adapters.combine_deltas(
            ts, rank=5, scalings=[1.0, 1.0],  # full rank: the SVD is exact
            combine=functools.partial(merge.combine_ties, density=1.0))
        d = [h.f64(t["q"].a) @ h.f64(t["q"].b) for t in ts]
        sign = np.where(d[0] + d[1] >= 0, 1.0, -1.0)
        agree = [np.sign(x) == sign for x in d]
        want = sum(np.where(a, x, 0) for a, x in zip(agree, d, strict=True)) / np.maximum(
            sum(a.astype(float) for a in agree), 1)
        np.testing.assert_allclose(h.f64(out["q"].a) @ h.f64(out["q"].b), want,
                                   **h.MATMUL_F32)

    def test_result_runs_as_scaling_none_adapter(self):
        params = {"q": jnp.zeros((6, 5))}
        ts = [self._lora(0, 2), self._lora(1, 3)]
        cat = merge.adapters.concatenate(ts, scalings=[1.0, 1.0])
        ad = adapters.lora(5, scaling=adapters.Scaling.NONE)
        a = {"q": ad}
        st = adapters.init(a, jax.random.key(0), params)
        out = adapters.fold(a, params, cat, st.frozen)
        np.testing.assert_allclose(h.f64(out["q"]), self._dense(ts, [1, 1], [1, 1]),
                                   **h.MATMUL_F32)


class TestErrors:
    def test_mismatched_trees_and_shapes(self):
        with pytest.raises(ValueError, match="missing"):
            merge.task_arithmetic({"w": jnp.zeros(2)}, [{"v": jnp.zeros(2)}])
        with pytest.raises(ValueError, match=r"'w' has shape \(3,\)"):
            merge.ties({"w": jnp.zeros(2)}, [{"w": jnp.zeros(3)}])
        with pytest.raises(TypeError, match="as a list"):
            merge.task_arithmetic({"w": jnp.zeros(2)}, {"w": jnp.zeros(2)})

    def test_weights_and_fractions(self):
        base = {"w": jnp.zeros(2)}
        with pytest.raises(ValueError, match="2 weights for 1 models"):
            merge.task_arithmetic(base, [base], weights=[1.0, 2.0])
        with pytest.raises(ValueError, match="density must be in"):
            merge.ties(base, [base], density=0.0)
        with pytest.raises(ValueError, match="density \\+ gamma"):
            merge.breadcrumbs(base, [base], density=0.9, gamma=0.2)
        with pytest.raises(ValueError, match="non-floating"):
            merge.task_arithmetic(_base(), [_base()],
                                  rules=[tree.Rule(where="ids", then=True)])

    def test_incompatible_adapters(self):
        t1 = {"q": adapters.LoRAParams(jnp.zeros((4, 2)), jnp.zeros((2, 3)))}
        t2 = {"q": adapters.LoRAParams(jnp.zeros((5, 2)), jnp.zeros((2, 3)))}
        with pytest.raises(ValueError, match="incompatible"):
            merge.adapters.concatenate([t1, t2], scalings=[1.0, 1.0])
        with pytest.raises(ValueError, match="rank=9"):
            merge.adapters.svd_refactor([t1], rank=9, scalings=[1.0])
