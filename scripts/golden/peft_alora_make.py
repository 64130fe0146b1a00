# SPDX-License-Identifier: Apache-2.0
"""PEFT aLoRA adapters, logits and greedy generations for peftjax's aLoRA tests.

Runs in the side virtualenv. A ``LoraConfig(alora_invocation_tokens=[7, 50])``
on the tiny Llama (every LoRA tensor perturbed by N(0, 0.3²)); the inputs hold
the invocation sequence at different slots per row (twice in row 0: PEFT
takes the last occurrence; not at all in row 2: the base model). Records in
``tests/io/golden/peft_alora/``: ``llama_alora/`` (PEFT's files),
``torch_outputs.npz`` (``inputs``, ``llama_alora`` logits, ``llama_base``
logits, ``generated``: PEFT's greedy ``generate`` with its KV cache), and
``peft.json`` (trainable count; for ``from_peftjax/pj_llama_alora`` written
by ``peft_alora_from_peftjax.py``, the max |torch - peftjax| logits
difference). aLoRA is causal-LM only in PEFT (the offsets are computed in
``PeftModelForCausalLM``), so there is no BERT file.

Usage: ``.venv-torch/bin/python scripts/golden/peft_alora_make.py``
"""


import _peft_golden

INVOCATION = [7, 50]
IDS = [[1, 5, 7, 50, 2, 63, 7, 50, 9, 3],
       [4, 7, 50, 12, 0, 33, 17, 8, 40, 11],
       [3, 9, 40, 12, 0, 7, 5, 3, 2, 1]]
NEW_TOKENS = 5


def config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM")


def main():
    def extra(m):
        return {"alora_invocation_tokens": m.peft_config["default"].alora_invocation_tokens}

    _peft_golden.run_causal("alora", config(), IDS, NEW_TOKENS, extra=extra)


if __name__ == "__main__":
    main()
