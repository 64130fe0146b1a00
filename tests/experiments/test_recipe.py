"""The shared recipe's pieces: one-target-at-a-time initialisation (the
LoRA-XS hang workaround), precision, packed training batches, and the
LoRA-SB and SpIEL (sparse) wiring."""

import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, data, inits, tree
from tests.experiments.conftest import ROOT
from tests.helpers import MATMUL_F32, assert_tree_allclose


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location(
        "_recipe", os.path.join(ROOT, "experiments", "_recipe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(recipe):
    return recipe.tiny_llama(0)


CFG = types.SimpleNamespace(rank=4, alpha=8.0, weight_decay=0.0, targets=None)


def _equal(a, b):
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("name", ["lora_xs", "pissa"])
def test_one_target_at_a_time_equals_the_joint_init(recipe, tiny, name):
    # The recipe initialises SVD-based methods one target per program (jaxlib's
    # batched CPU LAPACK kernels deadlock on a 2-thread pool when two run at
    # once); the result must equal the joint initialisation.
    _, _, params = tiny
    key = jax.random.key(3)
    setup = recipe.METHODS[name](CFG, params, lambda s: 1e-3, key)
    if name == "pissa":
        plan = tree.assign(params, [tree.Rule(where=recipe.ATTN,
                                              then=inits.pissa(4, alpha=8.0))])
        res = inits.init(plan, key, params)  # eager: one batched SVD at a time
        want, base = res.state, res.params
        _equal(setup.base, base)
    else:
        a = tree.assign(params, [tree.Rule(where=recipe.ATTN,
                                           then=adapters.lora_xs(4, alpha=8.0))])
        want = adapters.init(a, key, params)  # eager: one batched SVD at a time
    assert sorted(setup.trainable) == sorted(want.trainable)
    assert len(want.trainable) == 4
    # The reference runs eagerly (a joint *jitted* init could hang the suite);
    # eager and jitted random cores differ by float32 rounding of fused ops.
    assert_tree_allclose(setup.trainable, want.trainable, **MATMUL_F32)
    assert_tree_allclose(setup.static["frozen"], want.frozen, **MATMUL_F32)
    assert (setup.peft is None) is (name == "lora_xs")  # PEFT has no LoRA-XS format


def test_precision_casts_the_frozen_base_only(recipe, tiny):
    _, _, params = tiny
    lora = recipe.precision(recipe.METHODS["lora"](CFG, params, lambda s: 1e-3,
                                                   jax.random.key(0)), "bf16")
    assert {x.dtype for x in jax.tree.leaves(lora.base)} == {jnp.dtype(jnp.bfloat16)}
    assert lora.static["base"] is lora.base
    f32 = jnp.dtype(jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(lora.trainable)} == {f32}
    full = recipe.METHODS["full"](CFG, params, lambda s: 1e-3, jax.random.key(0))
    assert recipe.precision(full, "bf16") is full  # float32 master = the trainable
    assert recipe.precision(lora, "f32") is lora
    with pytest.raises(ValueError, match=r"--dtype='fp8'.*\['bf16', 'f32'\]"):
        recipe.precision(full, "fp8")


def test_packed_corpus_and_loss(recipe, tiny):
    _, graphdef, params = tiny
    docs = {f"d{i}": "abcdefghij"[: 3 + i] * 3 for i in range(6)}  # 9..24 bytes
    kw = dict(block_len=16, eval_docs=2, eval_blocks=2, seed=0, eos_id=0)
    one = recipe.corpus(docs, recipe.byte_encode, **kw)
    packed = recipe.corpus(docs, recipe.byte_encode, pack_documents=True, **kw)
    assert one.eval_names == packed.eval_names
    _equal(one.eval, packed.eval)  # held-out blocks do not depend on packing
    assert one.train.segment_ids.max() == 1 and packed.train.segment_ids.max() > 1
    # packing drops only the tail of the whole stream, not of every document
    n_train = sum(len(docs[n]) + 1 for n in packed.train_names)
    assert packed.train.tokens.size == (n_train // 16) * 16 > one.train.tokens.size
    # the loss of a packed block is the token-weighted mean of its documents'
    loss_fn = jax.jit(recipe.lm_loss(recipe.apply_fn(graphdef)))
    block = {k: np.asarray(v[:1]) for k, v in packed.train._asdict().items()}
    seg = block["segment_ids"][0]
    total, count = 0.0, 0.0
    for s in np.unique(seg[seg > 0]):
        idx = np.nonzero(seg == s)[0]
        toks = block["tokens"][:, idx]
        alone = {"tokens": toks, "segment_ids": np.ones_like(toks),
                 "positions": block["positions"][:, idx]}
        w = float(data.lm_targets(toks, np.ones_like(toks))[1].sum())
        total, count = total + float(loss_fn(params, alone)) * w, count + w
    np.testing.assert_allclose(float(loss_fn(params, block)), total / count,
                               **MATMUL_F32)


def test_lora_sb_needs_init_data(recipe, tiny):
    _, _, params = tiny
    with pytest.raises(ValueError, match=r"--method=lora-sb .* init_data=InitData"):
        recipe.METHODS["lora-sb"](CFG, params, lambda s: 1e-3, jax.random.key(0))


def test_sparse_resume_is_bit_identical_and_regrows(recipe, tiny, tmp_path):
    # SpIEL carries (values, support) and (sft_adamw, SpIEL) states through the
    # recipe's loop: a run stopped at step 3 and resumed from its checkpoint
    # equals the uninterrupted run, and reselection moved the support.
    _, graphdef, params = tiny
    cfg = types.SimpleNamespace(rank=4, alpha=8.0, weight_decay=0.0, targets=None,
                                spiel_reselection_steps=3, spiel_accumulation_steps=1)
    optim = recipe.OptimConfig(lr=1e-2, total_steps=6, warmup_steps=1)
    setup = recipe.METHODS["sparse"](cfg, params, recipe.schedule(optim),
                                     jax.random.key(0))
    flat = tree.leaves_by_path(params)
    budget = sum(4 * (flat[p].shape[-2] + flat[p].shape[-1]) * flat[p].shape[0]
                 for p in setup.trainable.trainable)
    assert adapters.num_trainable(setup.trained(setup.trainable)) == budget
    assert setup.peft is None
    loss_fn = recipe.lm_loss(recipe.apply_fn(graphdef))
    with pytest.raises(ValueError, match=r"--accum_steps=2 is not supported"):
        recipe.trainer(setup, loss_fn, recipe.OptimConfig(lr=1e-2, total_steps=6,
                                                          accum_steps=2))
    run = recipe.trainer(setup, loss_fn, optim)
    docs = {f"d{i}": "to be or not to be, that is the question. " * 4 for i in range(6)}
    corpus = recipe.corpus(docs, recipe.byte_encode, block_len=16, eval_docs=2,
                           eval_blocks=2, seed=0, eos_id=0)
    batches = data.Batches(corpus.train, batch_size=2, seed=0)
    kw = dict(setup=setup, run=run, batches=batches, key=jax.random.key(1),
              progress=False)
    whole = recipe.train(optim=optim, **kw)
    stop_at_3 = recipe.OptimConfig(lr=1e-2, total_steps=3, warmup_steps=1)
    first = recipe.train(optim=stop_at_3, ckpt_dir=str(tmp_path), checkpoint_every=3,
                         **kw)
    assert first.step == 3
    rest = recipe.train(optim=optim, ckpt_dir=str(tmp_path), resume=True, **kw)
    assert rest.step == 6
    assert [h["loss"] for h in first.history + rest.history] == \
        [h["loss"] for h in whole.history]
    _equal(rest.trainable, whole.trainable)
    _equal(rest.opt_state, whole.opt_state)
    for p, initial in setup.trainable.frozen.items():  # every kernel was reselected
        after = whole.trainable.frozen[p].indices
        assert (np.sort(after, -1) != np.sort(initial.indices, -1)).any(), p
