# SPDX-License-Identifier: Apache-2.0
"""PEFT TinyLoRA adapters and torch outputs for peftjax's TinyLoRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every trainable
``tinylora_v`` perturbed by N(0, 0.3²) away from PEFT's zero init; the frozen
``tinylora_A``/``_B`` (torch's SVD of the weight) and ``tinylora_P`` (torch's
generator, seeded ``projection_seed`` + the module's index) are saved by
PEFT and differ from what peftjax would draw, so the tests see whether they
are read from the file). Llama: ``r=2``, ``u=5``, ``projection_seed=7`` on
the q/v/down projections (PEFT numbers ``tinylora_v.<i>`` in torch's module
order, so the three kinds interleave per layer); BERT: ``r=2``, ``u=3``,
``weight_tying=0.5`` (the 11 modules share 6 vectors) on query/value, every
dense layer and the word-embedding table (an ``nn.Embedding``, decomposed
untransposed). Files:
``tests/io/golden/peft_tinylora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_tinylora_make.py``
"""

import _peft_golden


def llama():
    from peft import TinyLoraConfig

    return TinyLoraConfig(r=2, u=5, projection_seed=7,
                          target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import TinyLoraConfig

    return TinyLoraConfig(r=2, u=3, weight_tying=0.5,
                          target_modules=["query", "value", "dense", "word_embeddings"])


if __name__ == "__main__":
    _peft_golden.run("tinylora", {"llama": llama, "bert": bert})
