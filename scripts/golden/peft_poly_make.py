# SPDX-License-Identifier: Apache-2.0
"""PEFT Poly/MHR adapters and torch outputs for peftjax's Poly tests (both ways).

Runs in the side virtualenv. Poly's forward takes ``task_ids``, which
``_peft_golden.run`` does not pass, so this script uses its pieces (the tiny
bases, the fixed inputs, the tensor statistics) with its own loop: every
trainable tensor (``poly_lora_A``, ``poly_lora_B``, the routers'
``module_logits``) is perturbed by N(0, 0.3²); outputs are eval-mode (PEFT's
sigmoid routing) with ``TASK_IDS``. The Llama config is MHR (``n_splits=2``).
Files: ``tests/io/golden/peft_poly/``; the peftjax-written files under
``from_peftjax/`` are loaded with ``PeftModel.from_pretrained`` and their
output differences recorded in ``peft.json``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_poly_make.py``
"""

import os

import _peft_golden as G
import numpy as np
import torch

TASK_IDS = {"llama": [2, 0], "bert": [1, 0]}


def llama():
    from peft import PolyConfig

    return PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2,
                      target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def bert():
    from peft import PolyConfig

    return PolyConfig(r=2, n_tasks=2, n_skills=2, n_splits=1,
                      target_modules=["query", "value", "dense"])


def forward(kind, m):
    ids, bert_ids, mask = G.inputs()
    t = torch.tensor(TASK_IDS[kind])
    with torch.no_grad():  # PolyModel.forward: PeftModel.forward drops task_ids
        if kind == "llama":
            return m.base_model(input_ids=ids, task_ids=t).logits.numpy()
        return m.base_model(input_ids=bert_ids, attention_mask=mask,
                            task_ids=t).last_hidden_state.numpy()


def main():
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    out = os.path.join(G.ROOT, "peft_poly")
    os.makedirs(out, exist_ok=True)
    ids, bert_ids, mask = G.inputs()
    outputs = {"inputs_llama": ids.numpy(), "inputs_bert": bert_ids.numpy(),
               "mask_bert": mask.numpy()}
    counts = {}
    for kind, make in (("bert", bert), ("llama", llama)):
        outputs[f"{kind}_base"] = G.forward(kind, G.base(kind))
        torch.manual_seed(0)
        model = get_peft_model(G.base(kind), make()).eval()
        counts[kind] = int(model.get_nb_trainable_parameters()[0])
        G.perturb_trainable(model)
        G.save(model, os.path.join(out, f"{kind}_poly"), kind)
        outputs[f"{kind}_poly"] = forward(kind, model)
    np.savez_compressed(os.path.join(out, "torch_outputs.npz"), **outputs)
    keep = mask.numpy().astype(bool)

    def compare(name, d, want):
        kind = name.split("_")[1]
        m = PeftModel.from_pretrained(G.base(kind), d).eval()
        got = forward(kind, m)
        if kind == "bert":
            got, want = got[keep], want[keep]
        return m, got, want

    entries, ok = G.reverse(out, compare)
    G.finish(out, {"trainable_params": counts, "task_ids": TASK_IDS,
                   "_versions": G.versions(), **entries}, ok)


if __name__ == "__main__":
    main()
