# SPDX-License-Identifier: Apache-2.0
"""PEFT LoRA adapters with ``layer_replication`` for peftjax's tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``; every LoRA tensor
perturbed). PEFT replicates the base layers (shared weights) before adding
LoRA, both in ``get_peft_model`` and in ``PeftModel.from_pretrained``: the
tiny Llama's two layers become ``[0, 1, 1]``, the tiny BERT's ``[0, 0, 1]``.
No merged outputs: PEFT's ``merge_and_unload`` adds every copy's delta into
the one shared tensor. Files: ``tests/io/golden/peft_layer_replication/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_layer_replication_make.py``
"""

import _peft_golden

MAPS = {"llama": [[0, 2], [1, 2]], "bert": [[0, 1], [0, 2]]}


def llama():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                      layer_replication=MAPS["llama"])


def bert():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                      layer_replication=MAPS["bert"])


if __name__ == "__main__":
    _peft_golden.run("layer_replication", {"llama": llama, "bert": bert}, merge=False)
