# SPDX-License-Identifier: Apache-2.0
"""PEFT PVeRA adapters and torch outputs for peftjax's PVeRA tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every
``pvera_lambda_b`` and ``pvera_lambda_d`` perturbed by N(0, 0.3²), so
lambda_b is no longer zero). The outputs are PEFT's evaluation mode
(``sample_at_inference=False``: the mean), which is what peftjax computes.
PEFT saves ``base_model.pvera_A``/``pvera_B`` (``save_projection=True``, its
default). Files: ``tests/io/golden/peft_pvera/``.

Usage: ``cd scripts/golden && ../../.venv-torch/bin/python peft_pvera_make.py``
"""

import _peft_golden


def llama():
    from peft import PveraConfig

    return PveraConfig(r=4, d_initial=0.2, projection_prng_key=3,
                       target_modules=["q_proj", "k_proj", "down_proj"])


def bert():
    from peft import PveraConfig

    return PveraConfig(r=3, target_modules=["query", "key", "dense"])


if __name__ == "__main__":
    _peft_golden.run("pvera", {"llama": llama, "bert": bert})
