# SPDX-License-Identifier: Apache-2.0
"""The chat template a checkpoint stores, with its BOS/EOS token strings.

GGUF files keep it in the metadata (``tokenizer.chat_template``; the special
tokens are ``tokenizer.ggml.bos_token_id`` / ``eos_token_id`` into
``tokenizer.ggml.tokens``). Hugging Face directories keep it in
``chat_template.jinja`` or in ``tokenizer_config.json``'s ``chat_template``
(a string, or a list of ``{"name", "template"}`` of which ``"default"`` is
taken), with ``bos_token`` / ``eos_token`` beside it. The template is returned
as text; ``peftjax.data.chat_format`` renders it in a Jinja sandbox. Nothing
here runs code from the checkpoint.

Exports: ``ChatTemplate``, ``chat_template_from_gguf``, ``load_chat_template``.
"""

import os
from collections.abc import Mapping
from typing import Any, NamedTuple


class ChatTemplate(NamedTuple):
    """A checkpoint's chat template and the special tokens it refers to.

    Attributes:
      template: the Jinja source.
      bos_token: the BOS string (``""`` when the checkpoint names none).
      eos_token: the EOS string (``""`` when the checkpoint names none).

    Example:
      >>> ChatTemplate("{{ messages[0].content }}", "<s>", "</s>").eos_token
      '</s>'
    """

    template: str
    bos_token: str = ""
    eos_token: str = ""


def _token(tokens: list, meta: Mapping[str, Any], key: str) -> str:
    i = meta.get(key)
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""


def chat_template_from_gguf(metadata: Mapping[str, Any], *,
                            source: str = "the GGUF metadata") -> ChatTemplate:
    """The chat template in GGUF metadata (``tokenizer.chat_template``).

    Args:
      metadata: from ``peftjax.io.read_gguf_metadata``.
      source: how error messages name the file.

    Returns:
      A :class:`ChatTemplate`; the BOS/EOS strings are the tokens at
      ``tokenizer.ggml.bos_token_id`` / ``eos_token_id``.

    Raises:
      ValueError: no ``tokenizer.chat_template`` string.

    Example:
      >>> meta = {"tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}",
      ...         "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
      ...         "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
      >>> chat_template_from_gguf(meta).bos_token
      '<s>'
    """
    template = metadata.get("tokenizer.chat_template")
    if not isinstance(template, str) or not template:
        raise ValueError(f"chat_template_from_gguf: {source} has no "
                         f"tokenizer.chat_template (the checkpoint stores no chat "
                         f"template; pass one explicitly)")
    tokens = list(metadata.get("tokenizer.ggml.tokens", ()))
    return ChatTemplate(template,
                        _token(tokens, metadata, "tokenizer.ggml.bos_token_id"),
                        _token(tokens, metadata, "tokenizer.ggml.eos_token_id"))


def _hf_token(value: Any) -> str:
    """``"<s>"`` or an AddedToken dict ``{"content": "<s>", ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _hf_template(value: Any, file: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template")
                 for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"load_chat_template: {file!r} lists chat templates "
                         f"{sorted(map(str, named))} but none named 'default'")
    raise ValueError(f"load_chat_template: {file!r} chat_template is a "
                     f"{type(value).__name__}; expected a string or a list of "
                     f"{{'name', 'template'}}")


def load_chat_template(path: str | os.PathLike) -> ChatTemplate:
    """Reads the chat template a checkpoint stores: a ``.gguf`` file or an HF directory.

    In a directory, ``chat_template.jinja`` wins over ``tokenizer_config.json``'s
    ``chat_template`` (as in transformers); BOS/EOS come from
    ``tokenizer_config.json`` either way.

    Args:
      path: a ``.gguf`` file, or a directory with ``tokenizer_config.json``
        and/or ``chat_template.jinja``.

    Returns:
      A :class:`ChatTemplate`, for ``peftjax.data.chat_format(t.template,
      bos_token=t.bos_token, eos_token=t.eos_token)``.

    Raises:
      ValueError: a missing path, or a checkpoint without a chat template
        (the file looked in is named).

    Example:
      >>> import json, os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
      ...     json.dump({"chat_template": [{"name": "default", "template": "{{ x }}"}],
      ...                "eos_token": {"content": "</s>"}}, f)
      >>> load_chat_template(d)
      ChatTemplate(template='{{ x }}', bos_token='', eos_token='</s>')
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from peftjax import io as pio

        return chat_template_from_gguf(pio.read_gguf_metadata(path),
                                       source=repr(path))
    if not os.path.isdir(path):
        raise ValueError(f"load_chat_template: {path!r} is neither a .gguf file "
                         f"nor a directory")
    config_file = os.path.join(path, "tokenizer_config.json")
    config: dict = {}
    if os.path.isfile(config_file):
        from peftjax import io as pio

        config = pio.read_json(config_file, "load_chat_template")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    else:
        template = _hf_template(config.get("chat_template"), config_file)
    if not template:
        raise ValueError(f"load_chat_template: {path!r} stores no chat template (no "
                         f"chat_template.jinja, and no chat_template in "
                         f"tokenizer_config.json)")
    return ChatTemplate(template, _hf_token(config.get("bos_token")),
                        _hf_token(config.get("eos_token")))
