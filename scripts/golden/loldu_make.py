# SPDX-License-Identifier: Apache-2.0
"""LoLDU goldens from the authors' math (github.com/SKDDJ/LoLDU, minloldu/loldu.py at
commit 9790d906a439eb1a6af95e188d7407dc4d4532e1).

Runs once in the side virtualenv (torch; never imports peftjax, never in CI):

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/loldu_make.py

The authors' ``LoLDUParametrization`` is re-stated below in plain torch
(their module needs ``lightning``): ``ldu_decomposition`` (``torch.linalg.lu``,
``D`` = the diagonal of ``U``, ``U / D`` row-wise), the leading ``r``
components, ``scaling = lora_alpha / rank``, the residual
``W - scaling·P L_r diag(D_r) U_r`` made at init and the forward
``residual + scaling·P L_r diag(z) U_r``. ``z`` is perturbed
(``D_r + N(0, 0.2²)``) so the update is not zero. Float64 throughout.

Layout: torch layout, ``w (out, in)``, ``p (out, out)``, ``l (out, m)``,
``d (m,)``, ``u (m, in)`` (the full factors), ``merged (out, in)``,
``x (4, in)``, ``y = x @ merged.T``. One file per case:
``tests/adapters/golden/loldu/<case>.npz``.
"""

import pathlib

import numpy as np
import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "loldu"

# name: (out, in, rank, lora_alpha)
CASES = {
    "wide_rank3": (6, 8, 3, 1.0),
    "tall_full": (8, 5, 5, 2.0),
    "square_full": (7, 7, 7, 1.0),
}


def ldu_decomposition(a):
    p, lower, upper = torch.linalg.lu(a)
    d = torch.diagonal(upper)
    return p, lower, d, upper / d.unsqueeze(-1)


def case(seed, n_out, n_in, rank, alpha):
    rng = np.random.default_rng(seed)
    w = torch.tensor(rng.standard_normal((n_out, n_in)) * 0.5)
    p, lower, d, upper = ldu_decomposition(w)
    lr, dr, ur = lower[:, :rank], d[:rank], upper[:rank]
    scaling = alpha / rank
    residual = w - scaling * p @ lr @ torch.diag(dr) @ ur
    z = dr + torch.tensor(rng.standard_normal(rank) * 0.2)
    merged = residual + scaling * p @ lr @ torch.diag(z) @ ur
    x = torch.tensor(rng.standard_normal((4, n_in)))
    return dict(w=w, p=p, l=lower, d=d, u=upper, z=z, merged=merged, x=x,
                y=x @ merged.T, rank=np.int32(rank), alpha=np.float64(alpha))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, spec) in enumerate(sorted(CASES.items())):
        arrays = case(seed, *spec)
        np.savez(OUT / f"{name}.npz", **{
            k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in arrays.items()})
        print(name, {k: tuple(np.shape(v)) for k, v in arrays.items()})


if __name__ == "__main__":
    main()
