# SPDX-License-Identifier: Apache-2.0
"""PEFT LoKr adapters and torch outputs for peftjax's LoKr tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``lokr_*``
tensor perturbed by N(0, 0.3²); PEFT's init zeroes ``lokr_w2``, so
unperturbed the adapter would be the identity and hide a wrong transpose or
Kronecker order). Between them the two configs build every Linear structure
of PEFT's LoKr (full ``lokr_w1``/``lokr_w2``, ``lokr_w1_a @ lokr_w1_b`` and
``lokr_w2_a @ lokr_w2_b``):

* Llama: ``r=4, alpha=8, decompose_both=True`` on q/v/down with
  ``rank_pattern={"down_proj": 1}`` (every factor decomposed) and
  ``alpha_pattern={"v_proj": 6}``;
* BERT: ``r=2, alpha=3, decompose_factor=2`` on query/value and the three
  dense layers (each side split 2 x n; ``lokr_w2`` decomposed).

Files: ``tests/io/golden/peft_lokr/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_lokr_make.py``
"""

import _peft_golden


def llama():
    from peft import LoKrConfig

    return LoKrConfig(r=4, alpha=8, decompose_both=True,
                      target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 1}, alpha_pattern={"v_proj": 6})


def bert():
    from peft import LoKrConfig

    return LoKrConfig(r=2, alpha=3, decompose_factor=2,
                      target_modules=["query", "value", "dense"])


if __name__ == "__main__":
    _peft_golden.run("lokr", {"llama": llama, "bert": bert})
