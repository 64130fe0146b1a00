# SPDX-License-Identifier: Apache-2.0
"""PEFT FRoD adapters and torch outputs for peftjax's FRoD tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: ``frod_lambda_l`` and
``frod_lambda_s_values`` perturbed by N(0, 0.3²), so the sparse rotation is
not zero and the spectrum moves). Both configs save the projections
(``save_projection=True``, PEFT's default: the shared bases ``V`` and the
sparse pattern per module category). The Llama's categories take PEFT's QR
branch; BERT's (second layer only) ``output.dense`` (24 inputs, 16 outputs)
its SVD branch, the other BERT categories the QR one.
Files: ``tests/io/golden/peft_frod/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_frod_make.py``
"""

import _peft_golden


def llama():
    from peft import FrodConfig

    return FrodConfig(sparse_rate=0.1, progressbar=False,
                      target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import FrodConfig

    return FrodConfig(sparse_rate=0.05, projection_prng_key=3, progressbar=False,
                      layers_to_transform=[1], target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("frod", {"llama": llama, "bert": bert})
