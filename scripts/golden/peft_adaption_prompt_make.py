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

import os

import _peft_golden
import numpy as np
import torch

IDS = _peft_golden.LLAMA_IDS
NEW_TOKENS = 5


def config():
    from peft import AdaptionPromptConfig

    return AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")


def main():
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    out = os.path.join(_peft_golden.ROOT, "peft_adaption_prompt")
    os.makedirs(out, exist_ok=True)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        outputs = {"inputs": ids.numpy(),
                   "llama_base": _peft_golden.base("llama")(ids).logits.numpy()}
    torch.manual_seed(0)
    model = get_peft_model(_peft_golden.base("llama"), config()).eval()
    count = int(model.get_nb_trainable_parameters()[0])
    _peft_golden.perturb_trainable(model)
    _peft_golden.save(model, os.path.join(out, "llama_adaption_prompt"), "llama")
    with torch.no_grad():
        outputs["llama_adaption_prompt"] = model(input_ids=ids).logits.numpy()
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    outputs["generated"] = gen[:, ids.shape[1]:].numpy()
    np.savez_compressed(os.path.join(out, "torch_outputs.npz"), **outputs)

    def compare(name, d, want):
        m = PeftModel.from_pretrained(_peft_golden.base("llama"), d).eval()
        with torch.no_grad():
            return m, m(input_ids=ids).logits.numpy(), want

    entries, ok = _peft_golden.reverse(out, compare)
    print("generated", outputs["generated"].tolist())
    _peft_golden.finish(out, {"trainable_params": {"llama": count},
                              "_versions": _peft_golden.versions(), **entries}, ok)


if __name__ == "__main__":
    main()
