# SPDX-License-Identifier: Apache-2.0
"""PEFT MiSS ``mini`` adapters and torch outputs for peftjax's MiSS tests.

As ``peft_miss_make.py`` for the ``init_weights="mini"`` variant (an ``(r,
mini_r)`` shard tiled along the output axis too) on the tiny Llama, read in
the scanned layout by the tests (the reverse check of mini is in
``peft_miss_from_peftjax.py``). Files: ``tests/io/golden/peft_miss_mini/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_miss_mini_make.py``
"""

import _peft_golden


def llama():
    from peft import MissConfig

    return MissConfig(r=4, init_weights="mini", mini_r=4,
                      target_modules=["q_proj", "v_proj", "up_proj"])


if __name__ == "__main__":
    _peft_golden.run("miss_mini", {"llama": llama})
