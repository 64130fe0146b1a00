# SPDX-License-Identifier: Apache-2.0
"""Golden numbers for ``adapters.dylora``: the authors' truncation math in torch.

Run once in the side environment (never in CI, never imports peftjax):

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/dylora_make.py

The authors' DyLoRA code (huawei-noah/KD-NLP, ``DyLoRA/loralib``) could not
be checked out where this was made (the repository snapshot at hand predates
the DyLoRA folder; only the text of their ``dynamic`` truncation module and
dense layer was readable), so this is an independent float64 transcription
of what those two compute:
with ``current_rank = k`` (the rank in use is ``b = k + 1``),
``dynamic(x) = x[:, :b] · sqrt(r/b)`` in training and evaluation, and with
``frozen=True`` the first ``k`` columns pass through ``detach()``; the layer
applies it to ``lora_A.T`` and to ``lora_B`` and adds
``dropout(x) @ A_b.T @ B_b.T · lora_alpha/r``. No code of theirs is copied.

It writes ``tests/adapters/golden/dylora/dylora.npz``: a (5, 6) torch-layout
base weight, ``lora_A (4, 6)``, ``lora_B (5, 4)`` (both N(0, 0.3²): nothing is
zero), ``lora_alpha = 6``, a batch ``x (3, 6)`` and a target; for ``b`` in
1, 2, 4 and ``frozen`` in False/True: the output and the gradients of the MSE
loss w.r.t. ``lora_A`` and ``lora_B``.
"""

import math
import pathlib

import numpy as np
import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "dylora" / "dylora.npz"
R, ALPHA = 4, 6.0


def truncate(cols: torch.Tensor, b: int, frozen: bool) -> torch.Tensor:
    """The authors' nested truncation of a (n, R) matrix's columns to rank ``b``."""
    if frozen:
        cols = torch.cat([cols[:, :b - 1].detach(), cols[:, b - 1:b]], dim=-1)
    else:
        cols = cols[:, :b]
    return cols * math.sqrt(R / b)


def main() -> None:
    rng = np.random.default_rng(0)
    out = {
        "weight": rng.standard_normal((5, 6)) * 0.5,
        "lora_A": rng.standard_normal((R, 6)) * 0.3,
        "lora_B": rng.standard_normal((5, R)) * 0.3,
        "x": rng.standard_normal((3, 6)),
        "target": rng.standard_normal((3, 5)),
        "alpha": np.asarray(ALPHA),
    }
    w, x, target = (torch.as_tensor(out[k]) for k in ("weight", "x", "target"))
    for b in (1, 2, 4):
        for frozen in (False, True):
            a = torch.as_tensor(out["lora_A"]).clone().requires_grad_(True)
            up = torch.as_tensor(out["lora_B"]).clone().requires_grad_(True)
            a_b = truncate(a.T, b, frozen).T  # (b, in)
            up_b = truncate(up, b, frozen)  # (out, b)
            y = x @ w.T + (x @ a_b.T @ up_b.T) * (ALPHA / R)
            loss = torch.mean((y - target) ** 2)
            loss.backward()
            tag = f"b{b}_{'frozen' if frozen else 'all'}"
            out[f"{tag}/y"] = y.detach().numpy()
            out[f"{tag}/grad_A"] = a.grad.numpy()
            out[f"{tag}/grad_B"] = up.grad.numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, **out)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
