# SPDX-License-Identifier: Apache-2.0
"""PEFT LN-tuning adapters and torch outputs for peftjax's LN-tuning tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every trainable norm
copy perturbed by N(0, 0.3²); at init the copies equal the base norms, so an
adapter that was never loaded would still pass). The Llama config is PEFT's
default for Llama as a list (both per-layer RMSNorms and ``model.norm``); the
BERT one selects the LayerNorms (scale and bias each) with a regex and
excludes one by name, so both selection forms and ``exclude_modules`` are
read. Files: ``tests/io/golden/peft_ln_tuning/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_ln_tuning_make.py``
"""

import _peft_golden


def llama():
    from peft import LNTuningConfig

    return LNTuningConfig(
        target_modules=["input_layernorm", "post_attention_layernorm", "norm"])


def bert():
    from peft import LNTuningConfig

    return LNTuningConfig(target_modules=r".*(embeddings|output)\.LayerNorm",
                          exclude_modules=["encoder.layer.1.attention.output.LayerNorm"])


if __name__ == "__main__":
    _peft_golden.run("ln_tuning", {"llama": llama, "bert": bert})
