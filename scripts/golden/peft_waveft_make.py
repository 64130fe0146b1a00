# SPDX-License-Identifier: Apache-2.0
"""PEFT WaveFT adapters and torch outputs for peftjax's WaveFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every
``waveft_spectrum`` perturbed by N(0, 0.3²) away from PEFT's zero init).
The Llama config uses the ``db2`` wavelet (a 4-tap filter, so PEFT's padding
and centred crop matter), an ``n_frequency_pattern``, a non-default
``scaling`` and ``random_loc_seed``; the BERT one uses ``coif1`` with
``proportional_parameters=True`` (PEFT shares the budget by ``in·out``).
Files: ``tests/io/golden/peft_waveft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_waveft_make.py``
"""

import _peft_golden


def llama():
    from peft import WaveFTConfig

    return WaveFTConfig(n_frequency=20, scaling=5.0, wavelet_family="db2",
                        random_loc_seed=11,
                        target_modules=["q_proj", "v_proj", "down_proj"],
                        n_frequency_pattern={"down_proj": 40})


def bert():
    from peft import WaveFTConfig

    return WaveFTConfig(n_frequency=24, scaling=10.0, wavelet_family="coif1",
                        proportional_parameters=True,
                        target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("waveft", {"llama": llama, "bert": bert})
