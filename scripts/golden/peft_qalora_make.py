# SPDX-License-Identifier: Apache-2.0
"""PEFT QA-LoRA adapters and torch outputs for peftjax's QA-LoRA tests (both ways).

PEFT's ``QALoraLinearVariant`` (``use_qalora``) is dispatched by its GPTQ
layer only (``tuners/lora/gptq.py``); its forward adds the pooled LoRA term
to the base layer's output and never reads the quantised weight. The side
virtualenv has no GPTQ kernels, so this script makes PEFT's plain ``Linear``
resolve the same variant when ``use_qalora`` is set (PEFT's own init and
forward, on the float32 base), for both ``get_peft_model`` and
``PeftModel.from_pretrained``. PEFT cannot merge QA-LoRA (no merged
outputs). Files: ``tests/io/golden/peft_qalora/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_qalora_make.py``
"""

import _peft_golden


def use_qalora_on_linear():
    from peft.tuners.lora import layer, variants

    plain = layer.Linear.resolve_lora_variant

    def resolve(self, *, config, **kwargs):
        if getattr(config, "use_qalora", False):
            return variants.QALoraLinearVariant()
        return plain(self, config=config, **kwargs)

    layer.Linear.resolve_lora_variant = resolve


def llama():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, use_qalora=True, qalora_group_size=8,
                      target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=6, use_qalora=True, qalora_group_size=4,
                      use_rslora=True, target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    use_qalora_on_linear()
    _peft_golden.run("qalora", {"llama": llama, "bert": bert}, merge=False)
