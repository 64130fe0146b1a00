"""VeRA and AdaLoRA specifics (docs/methods.md#vera and #adalora)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import adapters, tree
from tests import helpers as h


class TestVeRA:
    def test_shared_matrices_regenerate_and_slices_agree(self):
        params = {"q": jnp.zeros((8, 6)), "up": jnp.zeros((6, 10))}
        ad = adapters.vera(4, max_in=8, max_out=10, projection_seed=3)
        a = tree.assign(params, [tree.Rule(where="q|up", then=ad)])
        s1 = adapters.init(a, jax.random.key(0), params)
        s2 = adapters.init(a, jax.random.key(99), params)  # leaf key unused
        h.assert_tree_allclose(s1.frozen, s2.frozen, **h.EXACT)
        shared = adapters.vera_shared(4, 8, 10, projection_seed=3)
        np.testing.assert_array_equal(np.asarray(s1.frozen["q"].a),
                                      np.asarray(shared.a[:8]))
        np.testing.assert_array_equal(np.asarray(s1.frozen["up"].a),
                                      np.asarray(shared.a[:6]))
        np.testing.assert_array_equal(np.asarray(s1.frozen["up"].b),
                                      np.asarray(shared.b[:, :10]))
        # Kaiming-uniform with gain sqrt(2): bounds sqrt(6/fan_in).
        assert float(jnp.abs(shared.a).max()) <= math.sqrt(6 / 8)
        assert float(jnp.abs(shared.b).max()) <= math.sqrt(6 / 4)
        other = adapters.vera_shared(4, 8, 10, projection_seed=4)
        assert not np.array_equal(np.asarray(other.a), np.asarray(shared.a))

    def test_only_vectors_are_trainable_and_init(self):
        t, f = adapters.vera(4, max_in=8, max_out=8, d_initial=0.1).init(
            jax.random.key(0), jnp.zeros((8, 6)))
        assert t._fields == ("lambda_d", "lambda_b")
        np.testing.assert_array_equal(np.asarray(t.lambda_d), np.full(4, 0.1,
                                                                      np.float32))
        np.testing.assert_array_equal(np.asarray(t.lambda_b), np.zeros(6))

    def test_too_large_leaf(self):
        with pytest.raises(ValueError, match="exceeds the shared shape"):
            adapters.vera(2, max_in=4, max_out=4).init(jax.random.key(0),
                                                       jnp.zeros((5, 4)))


class TestAdaLoRA:
    def _state(self, n=3, rank=4):
        params = {f"m{i}": jnp.asarray(np.random.default_rng(i).standard_normal((6, 5)),
                                       jnp.float32) for i in range(n)}
        a = tree.assign(params, [tree.Rule(where=r"m\d", then=adapters.adalora(rank))])
        return params, a, adapters.init(a, jax.random.key(0), params)

    def test_budget_schedule_cubic(self):
        kw = dict(initial_budget=12, target_budget=8, total_steps=110, t_init=10,
                  t_final=20)
        assert adapters.adalora_budget(10, **kw) == (12, False)  # warm-up
        # start of reduction: frac = 1 - 1/80
        assert adapters.adalora_budget(11, **kw)[0] == int(4 * (79 / 80) ** 3 + 8)
        assert adapters.adalora_budget(50, **kw) == (int(4 * 0.5**3 + 8), True)
        assert adapters.adalora_budget(90, **kw) == (8, True)  # end of reduction
        assert adapters.adalora_budget(91, **kw) == (8, True)  # final phase
        b, mask_now = adapters.adalora_budget(51, **kw, delta_t=2)
        assert not mask_now
        with pytest.raises(ValueError):
            adapters.adalora_budget(0, initial_budget=4, target_budget=2,
                                    total_steps=10, t_init=8, t_final=5)

    def test_scores_and_mask_count(self):
        _, _, st = self._state()
        rng = np.random.default_rng(0)
        imp = adapters.adalora_init_importance(st.trainable)
        rand = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.1, 1, x.shape),
                                                  jnp.float32), imp.ipt)
        imp = adapters.AdaLoRAImportance(ipt=rand, unc=jax.tree.map(
            lambda x: x * 2.0, rand))
        scores = adapters.adalora_triplet_scores(imp)
        s0 = jax.tree.map(lambda i, u: h.f64(i) * h.f64(u), imp.ipt["m0"],
                          imp.unc["m0"])
        want = s0.e + s0.a.mean(0) + s0.b.mean(1)
        np.testing.assert_allclose(h.f64(scores["m0"]), want, **h.MATMUL_F32)
        t = jax.tree.map(lambda x: x + 1.0, st.trainable)  # all e non-zero
        masked, keep = adapters.adalora_mask(t, scores, budget=7)
        n_kept = sum(int(np.asarray(k).sum()) for k in keep.values())
        assert n_kept == 7
        assert sum(int((np.asarray(v.e) != 0).sum()) for v in masked.values()) == 7
        flat = np.concatenate([np.asarray(scores[p]) for p in sorted(scores)])
        kept_scores = np.concatenate([np.asarray(scores[p])[np.asarray(keep[p])]
                                      for p in sorted(scores)])
        np.testing.assert_array_equal(np.sort(kept_scores), np.sort(flat)[-7:])

    def test_importance_update_matches_reference(self):
        _, _, st = self._state(n=1)
        t = jax.tree.map(lambda x: x + 0.5, st.trainable)
        g = jax.tree.map(lambda x: x * 0.3 - 0.1, t)
        imp = adapters.adalora_init_importance(t)
        imp = adapters.adalora_update_importance(imp, t, g)
        imp = adapters.adalora_update_importance(imp, t, g, beta1=0.5, beta2=0.7)
        i_ref = np.abs(h.f64(t["m0"].a) * h.f64(g["m0"].a))
        ibar = 0.15 * i_ref
        ubar = 0.15 * np.abs(i_ref - ibar)
        ibar2 = 0.5 * ibar + 0.5 * i_ref
        ubar2 = 0.7 * ubar + 0.3 * np.abs(i_ref - ibar2)
        np.testing.assert_allclose(h.f64(imp.ipt["m0"].a), ibar2, **h.MATMUL_F32)
        np.testing.assert_allclose(h.f64(imp.unc["m0"].a), ubar2, **h.MATMUL_F32)

    def test_orthogonality_regulariser(self):
        _, _, st = self._state(n=2)
        t = st.trainable
        terms = []
        for p in sorted(t):
            a, b = h.f64(t[p].a), h.f64(t[p].b)
            terms += [np.linalg.norm(a.T @ a - np.eye(4)), np.linalg.norm(b @ b.T -
                                                                          np.eye(4))]
        np.testing.assert_allclose(float(adalora_reg := adapters.adalora_orthogonality(
            t, weight=0.5)), 0.5 * np.mean(terms), **h.MATMUL_F32)
        assert adalora_reg.shape == ()

    def test_masked_ranks_receive_no_update_in_final_phase(self):
        params, a, st = self._state()
        x = jnp.asarray(np.random.default_rng(5).standard_normal((16, 6)), jnp.float32)

        def loss_fn(p, batch):
            out = sum(batch @ p[k] for k in sorted(p))
            return jnp.mean(out**2)

        def loss(tr):
            return loss_fn(adapters.materialize(a, params, tr, st.frozen), x) + \
                adapters.adalora_orthogonality(tr)

        opt = optax.adam(1e-2)
        t = st.trainable
        o = opt.init(t)
        imp = adapters.adalora_init_importance(t)
        keep = None
        with jax.numpy_dtype_promotion("standard"):
            for step in range(1, 13):
                g = jax.grad(loss)(t)
                imp = adapters.adalora_update_importance(imp, t, g)
                u, o = opt.update(g, o, t)
                t = optax.apply_updates(t, u)
                budget, mask_now = adapters.adalora_budget(
                    step, initial_budget=12, target_budget=6, total_steps=12,
                    t_init=2, t_final=4)
                if mask_now:
                    t, keep = adapters.adalora_mask(
                        t, adapters.adalora_triplet_scores(imp), budget)
        assert budget == 6
        n_nonzero = sum(int((np.asarray(v.e) != 0).sum()) for v in t.values())
        assert n_nonzero <= 6
        for p in t:
            np.testing.assert_array_equal(
                np.asarray(t[p].e)[~np.asarray(keep[p])], 0.0)
