"""Packed blocks (``segment_ids``): every document gets the logits it gets alone.

Several documents are packed into one block with ``peftjax.data.pack``; the
model must keep attention inside each document and restart RoPE positions,
so each document's logits equal those of the document run alone (checked
against the model itself and against the float64 NumPy reference), its
gradients add up, and KV-cache decoding of one document matches the packed
forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import data
from peftjax import models as pm
from peftjax.models.llama import _model
from tests.helpers import EXACT, GRAD_F32, f64
from tests.models import _reference
from tests.models.test_llama import close, make, make_config

LENGTHS = (5, 4, 6, 3)  # four documents, packed into two blocks of 10


def documents(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in LENGTHS]


def packed(cfg):
    docs = documents(cfg)
    # rows: [doc0 doc1 pad], [doc2 doc3 pad] (pack streams documents, so each
    # row is packed on its own to keep every document whole)
    rows = [data.pack(docs[:2], 10), data.pack(docs[2:], 10)]
    blocks = data.Blocks(*(np.concatenate(x) for x in zip(*rows, strict=True)))
    assert blocks.segment_ids.tolist() == [[1] * 5 + [2] * 4 + [0],
                                          [1] * 6 + [2] * 3 + [0]]
    return docs, blocks


def spans():
    """(row, start, doc) of each document in the packed blocks."""
    return [(0, 0, 0), (0, 5, 1), (1, 0, 2), (1, 6, 3)]


def forward(g, p, tokens, **kw):
    return jax.jit(lambda p, t, kw: pm.apply(g, p, t, **kw))(p, tokens, kw)


def alone(docs):
    """Each document in its own right-padded row: ``(tokens, mask)``."""
    t = max(len(d) for d in docs)
    tokens = np.zeros((len(docs), t), np.int32)
    mask = np.zeros((len(docs), t), np.int32)
    for i, d in enumerate(docs):
        tokens[i, :len(d)], mask[i, :len(d)] = d, 1
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_logits_equal_each_document_alone(scan_layers):
    from peftjax import tree

    cfg = make_config()
    g, p = make(cfg)
    p_run = p
    if scan_layers:
        g, p_run = make(cfg, scan_layers=True)[0], tree.stack_layers(p)
    docs, blocks = packed(cfg)
    tokens, seg = jnp.asarray(blocks.tokens), jnp.asarray(blocks.segment_ids)
    got = forward(g, p_run, tokens, segment_ids=seg,
                  positions=jnp.asarray(blocks.positions))
    ids, mask = alone(docs)
    single = forward(g, p_run, ids, attention_mask=mask)
    for row, start, d in spans():
        n = len(docs[d])
        close(got[row, start:start + n], f64(single[d, :n]))
        # and against the float64 reference of the document alone
        ref = _reference.llama_logits(p, cfg, docs[d][None])[0]
        close(got[row, start:start + n], ref)
    if not scan_layers:
        # positions default to restarting at every segment: the same logits
        default = forward(g, p, tokens, segment_ids=seg)
        np.testing.assert_allclose(f64(default), f64(got), **EXACT)
        np.testing.assert_array_equal(
            np.asarray(_model._segment_positions(seg))[blocks.segment_ids != 0],
            blocks.positions[blocks.segment_ids != 0])


def test_without_segment_ids_documents_leak():
    # The test above can fail: a padding mask alone lets document 2 see document 1.
    cfg = make_config()
    g, p = make(cfg)
    docs, blocks = packed(cfg)
    tokens, seg = jnp.asarray(blocks.tokens), jnp.asarray(blocks.segment_ids)
    leaky = forward(g, p, tokens, attention_mask=seg != 0,
                    positions=jnp.asarray(blocks.positions))
    ref = _reference.llama_logits(p, cfg, docs[1][None])[0]
    assert float(np.abs(f64(leaky[0, 5:9]) - ref).max()) > 1e-3
    # the first document of each row is unaffected (causality)
    close(leaky[0, :5], _reference.llama_logits(p, cfg, docs[0][None])[0])


def test_packed_loss_gradient_is_the_sum_over_documents():
    cfg = make_config(hidden_size=16, intermediate_size=24)
    g, p = make(cfg)
    docs, blocks = packed(cfg)

    def nll_sum(params, tokens, seg):
        logits = pm.apply(g, params, tokens, segment_ids=seg)
        targets, w = data.lm_targets(tokens, seg)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * w)

    grad = jax.jit(jax.value_and_grad(nll_sum))
    total, g_packed = grad(p, jnp.asarray(blocks.tokens),
                           jnp.asarray(blocks.segment_ids))
    ids, mask = alone(docs)  # one document per row: the per-document sum
    want_total, want = grad(p, ids, mask)
    np.testing.assert_allclose(float(total), float(want_total), **GRAD_F32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(f64(a), f64(b), **GRAD_F32),
                 g_packed, want)


def test_kv_cache_decoding_of_one_document_matches_the_packed_block():
    cfg = make_config()
    g, p = make(cfg, scan_layers=True)
    model = pm.rebuild(g, p)
    docs, blocks = packed(cfg)
    packed_logits = jax.jit(lambda t, s: model(t, segment_ids=s))(
        jnp.asarray(blocks.tokens), jnp.asarray(blocks.segment_ids))
    doc = jnp.asarray(docs[1])[None]  # the second document of row 0
    step = jax.jit(lambda t, c: model.decode(t, c))
    cache = model.init_cache(1, 8)
    prefill, cache = step(doc[:, :2], cache)
    outs = [prefill[0]]
    for t in range(2, doc.shape[1]):
        logits, cache = step(doc[:, t:t + 1], cache)
        outs.append(logits[0])
    close(jnp.concatenate(outs), f64(packed_logits[0, 5:9]))


def test_segment_id_errors():
    cfg = make_config()
    g, p = make(cfg)
    ids = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 5\).*\(2, 6\)"):
        pm.apply(g, p, ids, segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="dtype float32; expected integer"):
        pm.apply(g, p, ids, segment_ids=jnp.ones((2, 6), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids cannot be combined"):
        pm.apply(g, p, ids, segment_ids=jnp.ones((2, 6), jnp.int32),
                 prompt_embeddings=jnp.zeros((2, cfg.hidden_size), jnp.float32))
