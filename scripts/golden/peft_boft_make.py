# SPDX-License-Identifier: Apache-2.0
"""PEFT BOFT adapters and torch outputs for peftjax's BOFT tests (both ways).

Runs once in the side virtualenv (``_peft_golden.run``: every ``boft_R``
and ``boft_s`` perturbed by N(0, 0.3²), so no rotation is the identity and no
scale is 1).

PEFT builds its butterfly factors only when its CUDA extension
(``fbd_cuda``, a batched block-diagonal assembly) compiles; without it (any
CPU machine) ``update_layer`` silently uses one factor. This script stands in
a pure-torch equivalent of that kernel (``torch.block_diag`` per factor, the
same matrix) so that PEFT's own multi-factor code paths run on the CPU.

The Llama config uses ``boft_block_size=2`` with three butterfly factors on
16- and 32-wide inputs (8 and 16 blocks); the BERT one ``boft_block_num=4``
with two factors on 16- and 24-wide inputs (``query`` and both
``output.dense``: blocks of 4 and of 6, where the second factor's butterfly
permutes chunks of 3, half a block). Files:
``tests/io/golden/peft_boft/``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_boft_make.py``
"""

import _peft_golden
import torch


class _BlockDiag:
    """Pure-torch stand-in of PEFT's ``fbd_cuda`` extension (forward only)."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*torch.unbind(f)) for f in x])]


def stand_in_fbd():
    from peft.tuners.boft import layer

    layer._FBD_CUDA = _BlockDiag()


def llama():
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3,
                      target_modules=["q_proj", "down_proj"])


def bert():
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                      target_modules=["query", "output.dense"])


if __name__ == "__main__":
    stand_in_fbd()
    _peft_golden.run("boft", {"llama": llama, "bert": bert})
