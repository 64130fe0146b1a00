# SPDX-License-Identifier: Apache-2.0
"""Packing token sequences into fixed-length blocks with segment ids.

Documents are concatenated (each followed by ``eos_id`` when given) and cut
into blocks of ``block_len`` tokens. Every token carries a segment id
(1, 2, ... per document inside its block; 0 for padding) and a position
that restarts at 0 where a document starts, so

* the loss never predicts across a boundary (:func:`lm_targets`), and
* attention can be kept inside a document with :func:`segment_mask`
  (``(B, T, T)``: causal and same segment).

A model that only takes a padding mask can use
``one_document_per_block=True``: each document is cut into its own blocks
(the tail block padded), so no block ever holds two documents.

Exports: ``Blocks``, ``pack``, ``lm_targets``, ``segment_mask``.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Blocks(NamedTuple):
    """Packed blocks, all ``(N, T)`` int32 NumPy arrays.

    Attributes:
      tokens: token ids (``pad_id`` at padding).
      segment_ids: 1-based document index within the block; 0 at padding.
      positions: position within the document (restarts at each segment).
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray


def _check_docs(docs: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, d in enumerate(docs):
        a = np.asarray(d)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"pack: document {i} has shape {a.shape} dtype {a.dtype}; "
                             "expected 1-D integer token ids")
        out.append(a.astype(np.int32))
    return out


def _concat(docs: list[np.ndarray], eos_id: int | None):
    toks, seg, pos = [], [], []
    for i, d in enumerate(docs):
        if eos_id is not None:
            d = np.concatenate([d, np.array([eos_id], np.int32)])
        toks.append(d)
        seg.append(np.full(d.shape, i, np.int64))
        pos.append(np.arange(d.size, dtype=np.int32))
    if not toks:
        z = np.zeros((0,), np.int32)
        return z, z.astype(np.int64), z
    return np.concatenate(toks), np.concatenate(seg), np.concatenate(pos)


def _blocks(tokens, doc, pos, block_len, pad_id, drop_remainder) -> Blocks:
    n = tokens.size
    if drop_remainder:
        n = (n // block_len) * block_len
        tokens, doc, pos = tokens[:n], doc[:n], pos[:n]
    nb = -(-n // block_len)
    pad = nb * block_len - n
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)]).reshape(nb, block_len)
    tokens = np.concatenate([tokens, np.full(pad, pad_id, np.int32)]).reshape(nb, block_len)
    pos = np.concatenate([pos, np.zeros(pad, np.int32)]).reshape(nb, block_len)
    doc = np.concatenate([doc, np.full(pad, -1, np.int64)]).reshape(nb, block_len)
    # 1-based segment ids within each block: a new segment where the document changes.
    starts = np.ones_like(valid)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    seg = np.where(valid, np.cumsum(starts, axis=1), 0).astype(np.int32)
    return Blocks(tokens.astype(np.int32), seg, np.where(valid, pos, 0).astype(np.int32))


def pack(documents: Sequence[np.ndarray], block_len: int, *, eos_id: int | None = None,
         pad_id: int = 0, drop_remainder: bool = False,
         one_document_per_block: bool = False) -> Blocks:
    """Packs tokenised documents into ``(N, block_len)`` blocks.

    Args:
      documents: 1-D integer token arrays, in order.
      block_len: T, tokens per block (>= 2).
      eos_id: appended after every document when given.
      pad_id: the token id written at padding (its segment id is 0).
      drop_remainder: drop the last partial block (of the stream, or of each
        document with ``one_document_per_block``) instead of padding it.
      one_document_per_block: cut each document separately, so a block
        never holds two documents (for models without segment-aware
        attention).

    Returns:
      :class:`Blocks`.

    Raises:
      ValueError: ``block_len < 2`` or a document that is not 1-D integer ids.

    Example:
      >>> import numpy as np
      >>> b = pack([np.array([5, 6, 7]), np.array([8, 9])], 4, eos_id=1)
      >>> b.tokens.tolist()
      [[5, 6, 7, 1], [8, 9, 1, 0]]
      >>> b.segment_ids.tolist()
      [[1, 1, 1, 1], [1, 1, 1, 0]]
      >>> pack([np.array([5, 6]), np.array([8])], 4).segment_ids.tolist()
      [[1, 1, 2, 0]]
    """
    if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len < 2:
        raise ValueError(f"pack: block_len must be an int >= 2, got {block_len!r}")
    docs = _check_docs(documents)
    if not one_document_per_block:
        t, d, p = _concat(docs, eos_id)
        return _blocks(t, d, p, block_len, pad_id, drop_remainder)
    parts = []
    for d in docs:
        t, g, p = _concat([d], eos_id)
        parts.append(_blocks(t, g, p, block_len, pad_id, drop_remainder))
    if not parts:
        return _blocks(*_concat([], None), block_len, pad_id, drop_remainder)
    return Blocks(*(np.concatenate(x) for x in zip(*parts, strict=True)))


def lm_targets(tokens: np.ndarray, segment_ids: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets and loss weights for packed blocks.

    ``targets[:, t] = tokens[:, t + 1]``; the weight is 1 where position
    ``t + 1`` is in the same (non-padding) segment as ``t``, else 0 (the last
    position, document boundaries and padding). Works on NumPy or JAX arrays.

    Args:
      tokens: ``(B, T)`` ids.
      segment_ids: ``(B, T)`` segment ids (0 = padding).

    Returns:
      ``(targets (B, T) int, weights (B, T) float32)``.

    Raises:
      ValueError: the shapes differ or are not 2-D.

    Example:
      >>> import numpy as np
      >>> t, w = lm_targets(np.array([[5, 6, 7, 8]]), np.array([[1, 1, 2, 2]]))
      >>> t.tolist(), w.tolist()
      ([[6, 7, 8, 0]], [[1.0, 0.0, 1.0, 0.0]])
    """
    if tokens.ndim != 2 or tokens.shape != segment_ids.shape:
        raise ValueError(f"lm_targets: tokens {tokens.shape} and segment_ids "
                         f"{segment_ids.shape} must be the same 2-D shape")
    xp = np if isinstance(tokens, np.ndarray) else _jnp()
    b = tokens.shape[0]
    targets = xp.concatenate([tokens[:, 1:], xp.zeros((b, 1), tokens.dtype)], axis=1)
    nxt = xp.concatenate([segment_ids[:, 1:], xp.zeros((b, 1), segment_ids.dtype)], axis=1)
    weights = (nxt == segment_ids) & (segment_ids != 0)
    return targets, weights.astype(xp.float32)


def segment_mask(segment_ids: np.ndarray, *, causal: bool = True) -> np.ndarray:
    """``(B, T, T)`` bool: query ``t`` may attend key ``s`` (same segment, ``s <= t``).

    Padding (segment 0) attends nothing and is attended by nothing. Works on
    NumPy or JAX arrays.

    Args:
      segment_ids: ``(B, T)``.
      causal: also require ``s <= t``.

    Returns:
      The mask.

    Example:
      >>> import numpy as np
      >>> segment_mask(np.array([[1, 1, 2]]))[0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    xp = np if isinstance(segment_ids, np.ndarray) else _jnp()
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
        segment_ids[:, :, None] != 0)
    if causal:
        t = segment_ids.shape[1]
        same = same & xp.tril(xp.ones((t, t), bool))[None]
    return same


def _jnp():
    import jax.numpy as jnp

    return jnp
