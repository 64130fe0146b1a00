# SPDX-License-Identifier: Apache-2.0
"""PEFT RoAd adapters and torch outputs for peftjax's RoAd tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``road_theta``
and ``road_alpha`` perturbed by N(0, 0.3²), so no rotation is the identity).
The Llama config is PEFT's default variant ``road_1`` with groups of 4; the
BERT one ``road_4`` with groups of 8 on modules with biases (PEFT rotates the
bias with the output, and merges ``R·b``), the 24-wide
``intermediate.dense`` included. Files: ``tests/io/golden/peft_road/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_road_make.py``
"""

import _peft_golden


def llama():
    from peft import RoadConfig

    return RoadConfig(group_size=4, target_modules=["q_proj", "v_proj", "down_proj"])


def bert():
    from peft import RoadConfig

    return RoadConfig(variant="road_4", group_size=8,
                      target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("road", {"llama": llama, "bert": bert})
