# SPDX-License-Identifier: Apache-2.0
"""MoS goldens for peftjax's MoS tests (the authors' shard assembly, in torch).

Recomputes ``ΔW_k = (α/r)·B_k A_k`` of "MoS: Unleashing Parameter Efficiency
of Low-Rank Adaptation with Mixture of Shards" (Wang et al. 2025) as the
authors' ``modules/Tied_LoRA.py`` (``ft_mode="mos"``) does, transcribed here
(not imported): for ``L`` layers, pools ``lora_A (R·L·l, in/l)`` and
``lora_B (out/l, R·L·l)``; layer ``k``'s shard indices are
``randperm((R-p)·L·l)[:(r-p)·l]`` followed by its private indices
``(R-p)·L·l + [k·p·l, (k+1)·p·l)``, drawn separately for ``A`` and ``B``;
``transform_chunks(mat, mask, l)`` gathers ``mat[mask]`` and concatenates
the slices ``[i::l]`` along the features, ``A_k = transform_chunks(lora_A,
mask_A)``, ``B_k = transform_chunks(lora_Bᵀ, mask_B)ᵀ``. Both pools are
random here (the authors start ``lora_B`` at zero) so nothing vanishes.

Usage: ``.venv-torch/bin/python scripts/golden/mos_make.py``
Output: ``tests/adapters/golden/mos/mos.npz``.
"""

import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "adapters",
                   "golden", "mos", "mos.npz")
L, N_IN, N_OUT, R_ACTIVE, R_POOL, P, SHARDS, ALPHA = 3, 8, 6, 3, 2, 1, 2, 6.0


def transform_chunks(mat, mask, l):
    mat = mat[mask]
    return torch.cat([mat[i::l] for i in range(l)], dim=1)


def indices(k, g):
    public = (R_POOL - P) * L * SHARDS
    private = public + torch.arange(k * P * SHARDS, (k + 1) * P * SHARDS)
    shared = torch.randperm(public, generator=g)[:(R_ACTIVE - P) * SHARDS]
    return torch.cat([shared, private])


if __name__ == "__main__":
    g = torch.Generator().manual_seed(2025)
    rows = R_POOL * L * SHARDS
    lora_a = torch.randn(rows, N_IN // SHARDS, generator=g, dtype=torch.float64)
    lora_b = torch.randn(N_OUT // SHARDS, rows, generator=g, dtype=torch.float64)
    masks_a, masks_b, deltas = [], [], []
    for k in range(L):
        ma, mb = indices(k, g), indices(k, g)
        a = transform_chunks(lora_a, ma, SHARDS)            # (r, in)
        b = transform_chunks(lora_b.t(), mb, SHARDS).t()    # (out, r)
        deltas.append((ALPHA / R_ACTIVE) * (b @ a))         # (out, in)
        masks_a.append(ma.numpy())
        masks_b.append(mb.numpy())
    np.savez(OUT, pool_a=lora_a.numpy().astype(np.float32),
             pool_b_t=lora_b.t().numpy().astype(np.float32),
             masks_a=np.asarray(masks_a, np.int32), masks_b=np.asarray(masks_b, np.int32),
             delta=np.stack([d.numpy() for d in deltas]),
             config=np.asarray([L, N_IN, N_OUT, R_ACTIVE, R_POOL, P, SHARDS, ALPHA]))
    print("wrote", OUT, "torch", torch.__version__)
