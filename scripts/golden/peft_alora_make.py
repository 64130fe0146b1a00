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

import os

import _peft_golden
import numpy as np
import torch

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
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    out = os.path.join(_peft_golden.ROOT, "peft_alora")
    os.makedirs(out, exist_ok=True)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        outputs = {"inputs": ids.numpy(),
                   "llama_base": _peft_golden.base("llama")(ids).logits.numpy()}
    torch.manual_seed(0)
    model = get_peft_model(_peft_golden.base("llama"), config()).eval()
    count = int(model.get_nb_trainable_parameters()[0])
    _peft_golden.perturb_trainable(model)
    _peft_golden.save(model, os.path.join(out, "llama_alora"), "llama")
    with torch.no_grad():
        outputs["llama_alora"] = model(input_ids=ids).logits.numpy()
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    outputs["generated"] = gen[:, ids.shape[1]:].numpy()
    np.savez_compressed(os.path.join(out, "torch_outputs.npz"), **outputs)

    def compare(name, d, want):
        m = PeftModel.from_pretrained(_peft_golden.base("llama"), d).eval()
        with torch.no_grad():
            return m, m(input_ids=ids).logits.numpy(), want

    def extra(m):
        return {"alora_invocation_tokens": m.peft_config["default"].alora_invocation_tokens}

    entries, ok = _peft_golden.reverse(out, compare, extra)
    print("generated", outputs["generated"].tolist())
    _peft_golden.finish(out, {"trainable_params": {"llama": count},
                              "_versions": _peft_golden.versions(), **entries}, ok)


if __name__ == "__main__":
    main()
