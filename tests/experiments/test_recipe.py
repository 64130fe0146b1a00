"""The shared recipe's pieces: one-target-at-a-time initialisation (the
LoRA-XS hang workaround), precision, and packed training batches."""

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
