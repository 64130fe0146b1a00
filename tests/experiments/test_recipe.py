"""The shared recipe's pieces: the methods' initial states (PiSSA one target
at a time, the LAPACK hang workaround), precision, packed training batches,
and the LoRA-SB and SpIEL (sparse) wiring through peftjax.train."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, data, inits, train, tree
from tests.helpers import MATMUL_F32, assert_tree_allclose


@pytest.fixture(scope="module")
def tiny(recipe):
    return recipe.tiny_llama(0)


@pytest.fixture(scope="module")
def optim(recipe):
    return recipe.OptimConfig(lr=1e-3, total_steps=6)


CFG = types.SimpleNamespace(rank=4, alpha=8.0, weight_decay=0.0, targets=None)


def _equal(a, b):
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _start(recipe, setup, key, optim):
    return recipe.start(setup, lambda p, b: 0.0, optim, key)


@pytest.mark.parametrize("name", ["lora_xs", "pissa"])
def test_initial_state_equals_the_joint_init(recipe, tiny, optim, name):
    # The trainer initialises LoRA-XS (one SVD per target, stacked layers mapped
    # one slice at a time); the recipe runs PiSSA's initialiser one target per
    # program (jaxlib's batched CPU LAPACK kernels deadlock on a 2-thread pool
    # when two run at once). Either way the training state starts at the joint
    # initialisation.
    _, _, params = tiny
    key = jax.random.key(3)
    setup = recipe.METHODS[name](CFG, params, optim, key)
    state = _start(recipe, setup, key, optim).state
    if name == "pissa":
        plan = tree.assign(params, [tree.Rule(where=recipe.ATTN,
                                              then=inits.pissa(4, alpha=8.0))])
        res = inits.run(plan, key, params)  # eager: one batched SVD at a time
        want, base = res.state, res.params
        _equal(setup.params, base)
        assert setup.initial is not None
    else:
        a = tree.assign(params, [tree.Rule(where=recipe.ATTN,
                                           then=adapters.lora_xs(4, alpha=8.0))])
        want = adapters.init(a, key, params)  # eager: one batched SVD at a time
        assert setup.initial is None
    assert sorted(state.trainable) == sorted(want.trainable)
    assert len(want.trainable) == 4
    # The reference runs eagerly (a joint *jitted* init could hang the suite);
    # eager and jitted random cores differ by float32 rounding of fused ops.
    assert_tree_allclose(state.trainable, want.trainable, **MATMUL_F32)
    assert_tree_allclose(state.frozen, want.frozen, **MATMUL_F32)
    assert (setup.peft is None) is (name == "lora_xs")  # PEFT has no LoRA-XS format


def test_precision_casts_the_frozen_base_only(recipe, tiny, optim):
    _, _, params = tiny
    lora = recipe.precision(recipe.METHODS["lora"](CFG, params, optim, jax.random.key(0)),
                            "bf16")
    assert {x.dtype for x in jax.tree.leaves(lora.base)} == {jnp.dtype(jnp.bfloat16)}
    assert lora.base is lora.params
    f32 = jnp.dtype(jnp.float32)
    state = _start(recipe, lora, jax.random.key(0), optim).state
    assert {x.dtype for x in jax.tree.leaves((state.trainable, state.opt_state))} \
        <= {f32, jnp.dtype(jnp.int32)}
    full = recipe.METHODS["full"](CFG, params, optim, jax.random.key(0))
    assert full.base is None
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


def test_lora_sb_needs_init_data(recipe, tiny, optim):
    _, _, params = tiny
    with pytest.raises(ValueError, match=r"--method=lora-sb .* init_data=InitData"):
        recipe.METHODS["lora-sb"](CFG, params, optim, jax.random.key(0))


def test_sparse_resume_is_bit_identical_and_regrows(recipe, tiny, tmp_path):
    # SpIEL carries the values (trainable), the supports (frozen) and
    # (sft_adamw, SpIEL) states through train.fit: a run stopped at step 3 and
    # resumed from its checkpoint equals the uninterrupted run, and reselection
    # moved the support.
    _, graphdef, params = tiny
    cfg = types.SimpleNamespace(rank=4, alpha=8.0, weight_decay=0.0, targets=None,
                                spiel_reselection_steps=3, spiel_accumulation_steps=1)
    optim = recipe.OptimConfig(lr=1e-2, total_steps=6, warmup_steps=1)
    setup = recipe.METHODS["sparse"](cfg, params, optim, jax.random.key(0))
    assert setup.peft is None and setup.sparse is not None
    loss_fn = recipe.lm_loss(recipe.apply_fn(graphdef))

    run = recipe.start(setup, loss_fn, optim, jax.random.key(0))
    init = jax.jit(run.trainer.init)

    def fresh():  # the step donates its state: every run starts from its own
        return init(jax.random.key(0), params)

    flat = tree.leaves_by_path(params)
    budget = sum(4 * (flat[p].shape[-2] + flat[p].shape[-1]) * flat[p].shape[0]
                 for p in run.state.trainable)
    assert adapters.num_trainable(run.state.trainable) == budget
    initial = {p: np.asarray(s.indices) for p, s in run.state.frozen.items()}
    docs = {f"d{i}": "to be or not to be, that is the question. " * 4 for i in range(6)}
    corpus = recipe.corpus(docs, recipe.byte_encode, block_len=16, eval_docs=2,
                           eval_blocks=2, seed=0, eos_id=0)
    batches = data.Batches(corpus.train, batch_size=2, seed=0)
    whole = train.fit(run.step, run.state, batches, steps=6, progress=False)
    first = train.fit(run.step, fresh(), batches, steps=3, progress=False,
                      checkpoint_dir=tmp_path, checkpoint_every=3)
    assert first.step == 3
    rest = train.fit(run.step, fresh(), batches, steps=6, progress=False,
                     checkpoint_dir=tmp_path, resume=True)
    assert rest.step == 6
    assert [h["loss"] for h in first.history + rest.history] == \
        [h["loss"] for h in whole.history]
    _equal((rest.state.trainable, rest.state.frozen, rest.state.opt_state),
           (whole.state.trainable, whole.state.frozen, whole.state.opt_state))
    for p, before in initial.items():  # every kernel was reselected
        after = np.asarray(whole.state.frozen[p].indices)
        assert (np.sort(after, -1) != np.sort(before, -1)).any(), p
