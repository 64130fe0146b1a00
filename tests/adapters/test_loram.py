"""LoRAM (adapters.loram_*): prune, train small, recover, against the authors' recovery.

Golden: ``tests/adapters/golden/loram/recover.npz`` from the authors' own
``3_recovered_low_rank_matrix_generation.py`` (``scripts/golden/loram_make.py``).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, tree
from tests import helpers as h

GOLDEN = pathlib.Path(__file__).parent / "golden" / "loram" / "recover.npz"
HEAD_DIM, HEADS, KV_HEADS, NEURONS = 128, 64, 8, 48


def _kept(removed, size):
    return jnp.asarray(np.setdiff1d(np.arange(size), removed), jnp.int32)


def test_recover_matches_authors_code():
    g = np.load(GOLDEN)
    group = HEADS // KV_HEADS
    for layer in (0, 1):
        kv_kept = _kept(g[f"l{layer}/kv_removed"], KV_HEADS * HEAD_DIM)
        heads = np.unique(np.asarray(kv_kept) // HEAD_DIM)
        q_kept = jnp.asarray(np.concatenate(
            [np.arange(hh * group * HEAD_DIM, (hh + 1) * group * HEAD_DIM) for hh in heads]),
            jnp.int32)
        mlp_kept = _kept(g[f"l{layer}/mlp_removed"], NEURONS)
        cuts = {  # module: (axis, kept, size, factor)
            "mlp.down_proj": (-2, mlp_kept, NEURONS, "A"),
            "mlp.gate_proj": (-1, mlp_kept, NEURONS, "B"),
            "mlp.up_proj": (-1, mlp_kept, NEURONS, "B"),
            "self_attn.o_proj": (-2, q_kept, HEADS * HEAD_DIM, "A"),
            "self_attn.q_proj": (-1, q_kept, HEADS * HEAD_DIM, "B"),
            "self_attn.k_proj": (-1, kv_kept, KV_HEADS * HEAD_DIM, "B"),
            "self_attn.v_proj": (-1, kv_kept, KV_HEADS * HEAD_DIM, "B"),
        }
        trainable, plan = {}, {}
        for mod, (axis, kept, size, side) in cuts.items():
            p = g[f"l{layer}/{mod}.lora_{side}/pruned"]
            # Flax layout: a = lora_Aᵀ (in, r), b = lora_Bᵀ (r, out); the other
            # factor is not cut (ones of any width).
            a = p.T if side == "A" else np.ones((3, 2), np.float32)
            b = p.T if side == "B" else np.ones((2, 3), np.float32)
            trainable[mod] = adapters.LoRAParams(a=jnp.asarray(a), b=jnp.asarray(b))
            plan[mod] = (adapters.LoRAMCut(axis, kept, size),)
        state = adapters.AdapterState(trainable, {m: None for m in trainable})
        rec = jax.jit(lambda s, plan=plan: adapters.loram_recover(s, plan))(state)
        for mod, (_, _, _, side) in cuts.items():
            got = rec.trainable[mod].a.T if side == "A" else rec.trainable[mod].b.T
            np.testing.assert_array_equal(
                np.asarray(got), g[f"l{layer}/{mod}.lora_{side}/recovered"])


def _mlp_params(seed=0, d=6, n=10):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)  # noqa: E731
    return {"gate": {"kernel": f(d, n)}, "up": {"kernel": f(d, n)},
            "down": {"kernel": f(n, d)}}


def _mlp(p, x):
    return (jax.nn.silu(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])) @ p["down"]["kernel"]


MLP_GROUP = [("gate/kernel", -1, 1), ("up/kernel", -1, 1), ("down/kernel", -2, 1)]


def _randomize(trainable, seed=3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.3,
                                              x.dtype), trainable)


def test_structured_train_small_infer_large():
    """Pruned model + LoRA == full model with removed units zeroed + recovered LoRA."""
    params = _mlp_params()
    plan = adapters.loram_plan(params, [adapters.loram_group(MLP_GROUP)], 0.4,
                               key=jax.random.key(0))
    small = adapters.loram_prune(params, plan)
    assert small["gate"]["kernel"].shape == (6, 6) and small["down"]["kernel"].shape == (6, 6)
    rules = [tree.Rule(where=r".*kernel", then=adapters.lora(2, alpha=4.0))]
    a_small = tree.assign(small, rules)
    state = adapters.init(a_small, jax.random.key(1), small)
    state = state._replace(trainable=_randomize(state.trainable))
    full = adapters.loram_recover(state, plan)
    a_full = tree.assign(params, rules)
    merged = adapters.fold(a_full, params, *full)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6)), jnp.float32)
    # the full model with the removed neurons' gate/up columns zeroed
    kept = np.zeros(10, bool)
    kept[np.asarray(plan["gate/kernel"][0].kept)] = True
    masked = adapters.fold(a_full, {
        "gate": {"kernel": jnp.where(kept[None, :], params["gate"]["kernel"], 0)},
        "up": {"kernel": jnp.where(kept[None, :], params["up"]["kernel"], 0)},
        "down": {"kernel": params["down"]["kernel"]}}, *full)
    merged_small = adapters.fold(a_small, small, *state)
    np.testing.assert_allclose(h.f64(_mlp(masked, x)), h.f64(_mlp(merged_small, x)),
                               **h.MATMUL_F32)
    # the recovered delta is zero on removed units and the trained one on kept ones
    d_gate = h.f64(merged["gate"]["kernel"]) - h.f64(params["gate"]["kernel"])
    assert np.all(d_gate[:, ~kept] == 0)
    np.testing.assert_allclose(
        d_gate[:, kept],
        h.f64(merged_small["gate"]["kernel"]) - h.f64(small["gate"]["kernel"]),
        **h.MATMUL_F32)


def test_importance_and_stacked_layers():
    params = _mlp_params(seed=4)
    grads = _mlp_params(seed=5)
    group = adapters.loram_group(MLP_GROUP)
    plan = adapters.loram_plan(params, [group], 0.5, importance="taylor", grads=grads)
    score = sum(np.abs(h.f64(params[k]["kernel"]) * h.f64(grads[k]["kernel"])).sum(0)
                for k in ("gate", "up")) + np.abs(
        h.f64(params["down"]["kernel"]) * h.f64(grads["down"]["kernel"])).sum(1)
    np.testing.assert_array_equal(np.asarray(plan["down/kernel"][0].kept),
                                  np.sort(np.argsort(-score)[:5]))
    mag = adapters.loram_plan(params, [group], 0.5, importance="magnitude")
    score = sum((h.f64(params[k]["kernel"]) ** 2).sum(0) for k in ("gate", "up")) + (
        h.f64(params["down"]["kernel"]) ** 2).sum(1)
    np.testing.assert_array_equal(np.asarray(mag["up/kernel"][0].kept),
                                  np.sort(np.argsort(-score)[:5]))
    # stacked (layers, in, out) leaves: each layer by its own importance
    layers = [params, _mlp_params(seed=6)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    splan = adapters.loram_plan(stacked, [group], 0.5, importance="magnitude")
    small = adapters.loram_prune(stacked, splan)
    for i, p in enumerate(layers):
        one = adapters.loram_prune(p, adapters.loram_plan(p, [group], 0.5,
                                                          importance="magnitude"))
        h.assert_tree_allclose(jax.tree.map(lambda x, i=i: x[i], small), one, **h.EXACT)


def test_masks_unstructured_and_semi_structured():
    params = _mlp_params(seed=7)
    m = adapters.loram_masks(params, r"(gate|up)/kernel", sparsity=0.5)
    assert set(m) == {"gate/kernel", "up/kernel"}
    w = np.abs(h.f64(params["gate"]["kernel"]))
    assert np.all(m["gate/kernel"].sum(0) == 3)
    kept_min = np.where(m["gate/kernel"], w, np.inf).min(0)
    dropped_max = np.where(m["gate/kernel"], -np.inf, w).max(0)
    assert np.all(kept_min >= dropped_max)
    semi = adapters.loram_masks(params, "down/kernel", n_m=(2, 5))
    assert np.all(np.asarray(semi["down/kernel"]).reshape(2, 5, 6).sum(1) == 2)
    pruned = adapters.loram_prune(params, {**m, **semi})
    np.testing.assert_array_equal(
        np.asarray(pruned["up"]["kernel"]),
        np.where(m["up/kernel"], params["up"]["kernel"], 0))
    # masked paths keep the factors' shapes: recovery is the identity
    t = adapters.LoRAParams(a=jnp.ones((6, 2)), b=jnp.ones((2, 10)))
    s = adapters.AdapterState({"up/kernel": t}, {"up/kernel": None})
    assert adapters.loram_recover(s, m).trainable["up/kernel"] is t


def test_normal_fill_and_errors():
    params = _mlp_params()
    plan = adapters.loram_plan(params, [MLP_GROUP], 0.5, key=jax.random.key(0))
    t = adapters.LoRAParams(a=jnp.ones((5, 4)), b=jnp.ones((4, 6)))
    s = adapters.AdapterState({"down/kernel": t}, {"down/kernel": None})
    rec = adapters.loram_recover(s, plan, fill_a="normal", key=jax.random.key(1))
    a = np.asarray(rec.trainable["down/kernel"].a)
    kept = np.asarray(plan["down/kernel"][0].kept)
    removed = np.setdiff1d(np.arange(10), kept)
    assert np.all(a[kept] == 1) and np.all(a[removed] != 0)
    with pytest.raises(ValueError, match="ratio"):
        adapters.loram_plan(params, [MLP_GROUP], 1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no leaf at path 'nope'"):
        adapters.loram_plan(params, [[("nope", -1, 1)]], 0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'down/kernel' of shape \(10, 6\) holds 5 units"):
        adapters.loram_plan(params, [[("gate/kernel", -1, 1), ("down/kernel", -2, 2)]],
                            0.5, key=jax.random.key(0))
    bad = adapters.AdapterState({"down/kernel": adapters.HRAParams(u=jnp.ones((5, 2)))},
                                {"down/kernel": None})
    with pytest.raises(ValueError, match="no LoRA factors"):
        adapters.loram_recover(bad, {"down/kernel": plan["down/kernel"]})
    with pytest.raises(ValueError, match="exactly one of sparsity and n_m"):
        adapters.loram_masks(params, "up/kernel")
