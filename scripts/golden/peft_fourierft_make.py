# SPDX-License-Identifier: Apache-2.0
"""PEFT FourierFT adapters and torch outputs for peftjax's FourierFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every
``fourierft_spectrum`` perturbed by N(0, 0.3²), so the values are not PEFT's
init draw either). The Llama config has an ``n_frequency_pattern``, a
non-default ``scaling`` and ``random_loc_seed``; the BERT one keeps PEFT's
default seed and gives the intermediate dense layers another
``n_frequency`` through a dotted pattern key. PEFT does not save the
frequency positions (it regenerates them from the seed), so this script also
records PEFT's own positions in ``torch_outputs.npz`` as
``indices/<model>/<module>`` ``(2, n)``, for the check of peftjax's
reproduction of ``torch.randperm``. Files: ``tests/io/golden/peft_fourierft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_fourierft_make.py``
"""

import os

import _peft_golden
import numpy as np


def llama():
    from peft import FourierFTConfig

    return FourierFTConfig(n_frequency=24, scaling=20.0, random_loc_seed=11,
                           target_modules=["q_proj", "v_proj", "down_proj"],
                           n_frequency_pattern={"down_proj": 40})


def bert():
    from peft import FourierFTConfig

    return FourierFTConfig(n_frequency=16, scaling=50.0,
                           target_modules=["query", "value", "dense"],
                           n_frequency_pattern={"intermediate.dense": 36})


def record_positions(configs):
    """Adds PEFT's frequency positions of every adapted module to the outputs."""
    from peft import get_peft_model

    path = os.path.join(_peft_golden.ROOT, "peft_fourierft", "torch_outputs.npz")
    outputs = dict(np.load(path))
    for kind, make in sorted(configs.items()):
        model = get_peft_model(_peft_golden.base(kind), make())
        for name, mod in model.named_modules():
            if "default" in getattr(mod, "indices", {}):
                module = name.removeprefix("base_model.model.")
                outputs[f"indices/{kind}/{module}"] = mod.indices["default"].numpy()
    np.savez_compressed(path, **outputs)


if __name__ == "__main__":
    CONFIGS = {"llama": llama, "bert": bert}
    _peft_golden.run("fourierft", CONFIGS)
    record_positions(CONFIGS)
