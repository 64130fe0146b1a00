# SPDX-License-Identifier: Apache-2.0
"""Tokenisers through the ``tokenizers`` library, offline.

Hugging Face directories load their ``tokenizer.json``. GGUF files carry their
tokeniser in the metadata (``tokenizer.ggml.*``); byte-level BPE ones
(``tokenizer.ggml.model == "gpt2"``) are rebuilt here. The pre-tokeniser is
chosen from ``tokenizer.ggml.pre``:

* ``smollm``: digits split individually, then the GPT-2 byte-level regex
  (transformers 5.23 does not know this one);
* ``default`` / ``gpt2`` (or absent): the GPT-2 byte-level regex only.

Control tokens (``token_type == 3``, e.g. ``<|im_start|>``) become special
added tokens, never split. Other pre-tokenisers and SentencePiece GGUFs raise
``ValueError`` rather than tokenising differently from llama.cpp.

Exports: ``tokenizer_from_gguf``, ``load_tokenizer``.
"""

import os
from collections.abc import Mapping
from typing import Any

_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Any:
    """Builds a ``tokenizers.Tokenizer`` from GGUF metadata.

    Args:
      metadata: from ``peftjax.io.read_gguf_metadata``.

    Returns:
      A ``tokenizers.Tokenizer`` (byte-level BPE, no BOS added, since
      ``tokenizer.ggml.add_bos_token`` is false for the supported models).

    Raises:
      ValueError: a tokeniser model other than ``gpt2`` or an unknown
        pre-tokeniser.

    Example:
      >>> meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
      ...         "tokenizer.ggml.tokens": ["1", "2", "Ġ", "a", "<|x|>"],
      ...         "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
      ...         "tokenizer.ggml.merges": []}
      >>> tokenizer_from_gguf(meta).encode("a 12<|x|>").ids
      [3, 2, 0, 1, 4]
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"tokenizer_from_gguf: unsupported tokenizer.ggml.model "
            f"{kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        pre_tok = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("default", "gpt2", "gpt-2"):
        pre_tok = byte_level
    else:
        raise ValueError(
            f"tokenizer_from_gguf: unsupported tokenizer.ggml.pre "
            f"{pre!r}; supported: 'smollm', 'default', 'gpt2'"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer_from_gguf: tokenizer.ggml.tokens has duplicates")
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Loads the tokeniser of a checkpoint: a ``.gguf`` file or an HF directory.

    Args:
      path: a ``.gguf`` file (tokeniser rebuilt from its metadata) or a
        directory with ``tokenizer.json``.

    Returns:
      A ``tokenizers.Tokenizer``.

    Raises:
      ValueError: a missing or malformed file (naming it and, for bad JSON,
        the position) or an unsupported GGUF tokeniser.

    Example:
      >>> from peftjax.models import _fixtures
      >>> tok = load_tokenizer(_fixtures.minilm_dir())
      >>> tok.encode("hello").tokens[:3]  # the file also configures padding to 128
      ['[CLS]', 'hello', '[SEP]']
    """
    from tokenizers import Tokenizer

    from peftjax import io as pio

    path = os.fspath(path)
    if path.endswith(".gguf"):
        return tokenizer_from_gguf(pio.read_gguf_metadata(path))
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"load_tokenizer: no tokenizer.json at {file!r}")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # the tokenizers library raises bare Exception
        raise ValueError(f"load_tokenizer: {file} is not a tokenizer.json the "
                         f"tokenizers library can read: {e}") from e
