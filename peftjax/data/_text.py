# SPDX-License-Identifier: Apache-2.0
"""Reading and splitting raw text: local text files, JSONL, document splits.

A *document* is one string (a play, a JSONL record). Splits are by document,
so no text of an evaluation document is ever seen in training.

Exports: ``read_text``, ``read_jsonl``, ``split_documents``, ``tokenize``.
"""

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np


def read_text(path: str | os.PathLike) -> str:
    """Reads a UTF-8 text file (undecodable bytes replaced).

    Args:
      path: the file.

    Returns:
      Its text.

    Raises:
      ValueError: the file does not exist.

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
      >>> with open(p, "w") as f:
      ...     _ = f.write("to be")
      >>> read_text(p)
      'to be'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"read_text: no file at {path!r}")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def read_jsonl(path: str | os.PathLike, *, field: str = "text",
               format: Callable[[dict], str] | None = None) -> list[str]:
    """Reads one document per line from a JSONL file.

    Instruction data (``{"messages": [{"role": ..., "content": ...}]}``) is
    turned into text by ``format``, e.g. ``chat_format`` over the chat
    template stored in the checkpoint (``peftjax.models.load_chat_template``
    reads GGUF ``tokenizer.chat_template`` or HF ``tokenizer_config.json``),
    so training sees the model's own format.

    Args:
      path: the ``.jsonl`` file.
      field: the key holding the text of each record (ignored with ``format``).
      format: ``record -> text`` for structured records.

    Returns:
      The documents in file order (blank lines skipped).

    Raises:
      ValueError: a missing file, a line that is not a JSON object, a
        record without ``field``, or a ``ValueError`` from ``format`` (the
        line number is named).

    Example:
      >>> import tempfile, os
      >>> p = os.path.join(tempfile.mkdtemp(), "a.jsonl")
      >>> with open(p, "w") as f:
      ...     _ = f.write('{"text": "a"}\\n{"text": "b"}\\n')
      >>> read_jsonl(p)
      ['a', 'b']
      >>> read_jsonl(p, format=lambda r: "<|user|>" + r["text"])
      ['<|user|>a', '<|user|>b']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"read_jsonl: no file at {path!r}")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"read_jsonl: {path!r} line {n} is not JSON: {e}") from e
            if format is not None and isinstance(record, dict):
                try:
                    text = format(record)
                except ValueError as e:
                    raise ValueError(f"read_jsonl: {path!r} line {n}: {e}") from e
                if not isinstance(text, str):
                    raise ValueError(f"read_jsonl: format returned {type(text).__name__} "
                                     f"for {path!r} line {n}; expected str")
                docs.append(text)
                continue
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"read_jsonl: {path!r} line {n} has no string field "
                                 f"{field!r} (keys: {found})")
            docs.append(record[field])
    return docs


def split_documents(names: Sequence[str], *, num_eval: int, seed: int
                    ) -> tuple[list[str], list[str]]:
    """Splits document names into disjoint train and eval lists, seeded.

    The eval documents are ``num_eval`` names drawn by a permutation seeded
    with ``seed``; both lists keep the input order. The split depends only
    on the set of names, the count and the seed.

    Args:
      names: unique document names (e.g. play names).
      num_eval: how many documents go to evaluation (``1 <= num_eval <
        len(names)``).
      seed: the split seed.

    Returns:
      ``(train_names, eval_names)``, disjoint, together all names.

    Raises:
      ValueError: duplicate names or a ``num_eval`` out of range.

    Example:
      >>> train, ev = split_documents(["a", "b", "c", "d"], num_eval=1, seed=0)
      >>> len(train), len(ev), set(train) & set(ev)
      (3, 1, set())
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("split_documents: names must be unique")
    if not 1 <= num_eval < len(names):
        raise ValueError(f"split_documents: num_eval must be in [1, {len(names) - 1}] "
                         f"for {len(names)} documents, got {num_eval}")
    ordered = sorted(names)
    pick = np.random.default_rng(seed).permutation(len(ordered))[:num_eval]
    eval_set = {ordered[i] for i in pick}
    return ([n for n in names if n not in eval_set], [n for n in names if n in eval_set])


def tokenize(documents: Mapping[str, str] | Sequence[str],
             encode: Callable[[str], Sequence[int]]) -> list[np.ndarray]:
    """Tokenises documents with any ``encode(text) -> ids`` function.

    Args:
      documents: texts, or ``{name: text}`` (values taken in order).
      encode: e.g. ``lambda s: tokenizer.encode(s).ids`` for a
        ``tokenizers.Tokenizer``.

    Returns:
      One int32 array of ids per document.

    Raises:
      ValueError: ``encode`` returned something that is not a 1-D integer
        sequence (the document index is named).

    Example:
      >>> [a.tolist() for a in tokenize(["ab", "c"], lambda s: [ord(c) for c in s])]
      [[97, 98], [99]]
    """
    texts = list(documents.values()) if isinstance(documents, Mapping) else list(documents)
    out = []
    for i, text in enumerate(texts):
        ids = np.asarray(encode(text))
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"tokenize: encode(document {i}) returned shape {ids.shape} "
                             f"dtype {ids.dtype}; expected 1-D integer ids")
        out.append(ids.astype(np.int32))
    return out
