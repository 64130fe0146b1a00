# SPDX-License-Identifier: Apache-2.0
"""PEFT adaption prompts (LLaMA-Adapter), logits and greedy generations.

Runs in the side virtualenv. An ``AdaptionPromptConfig(adapter_len=3,
adapter_layers=1)`` on the 2-layer tiny Llama (only the top layer is
adapted); every ``adaption_prompt`` and ``adaption_gate`` perturbed by
N(0, 0.3²), so the zero-initialised gate is non-zero. Records in
``tests/io/golden/peft_adaption_prompt/``: ``llama_adaption_prompt/``
(PEFT's files), ``torch_outputs.npz`` (``inputs``, ``llama_adaption_prompt``
logits, ``llama_base``, ``generated``: PEFT's greedy ``generate`` with its
KV cache) and ``peft.json`` (trainable count; for
``from_peftjax/pj_llama_adaption_prompt`` written by
``peft_adaption_prompt_from_peftjax.py``, the max |torch - peftjax| logits
difference). PEFT supports Llama, Mistral and GPT-2 only: no BERT file.

Usage: ``.venv-torch/bin/python scripts/golden/peft_adaption_prompt_make.py``
"""


import _peft_golden

IDS = _peft_golden.LLAMA_IDS
NEW_TOKENS = 5


def config():
    from peft import AdaptionPromptConfig

    return AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")


def main():
    _peft_golden.run_causal("adaption_prompt", config(), IDS, NEW_TOKENS)


if __name__ == "__main__":
    main()
