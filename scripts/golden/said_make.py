# SPDX-License-Identifier: Apache-2.0
"""Fastfood goldens for peftjax's SAID / intrinsic-dimension tests.

Recomputes, in torch and float64, the Fastfood projection of the authors of
"Intrinsic Dimensionality Explains the Effectiveness of Language Model
Fine-Tuning" (Aghajanyan et al. 2021; their ``fastfood_torched`` and
``fast_walsh_hadamard_torched``, transcribed here, not imported): pad θ to
``L = 2^ceil(log2 D)``, multiply by ``B``, Walsh-Hadamard (butterflies over
``[2]*log2 L`` axes, unnormalised), permute by ``Π`` (``v[Π]``), multiply by
``G``, transform again, keep ``D`` entries and divide by
``sqrt(L * sum(G^2)) * sqrt(D / L)``. ``B, Π, G, θ`` are drawn here (as the
authors draw them: ``B = 2*floor(U(0, 2)) - 1``, ``Π`` a NumPy
permutation, ``G`` standard normal) and stored with the output, so the test
feeds the same draws to ``fastfood_transform``.

Usage: ``.venv-torch/bin/python scripts/golden/said_make.py``
Output: ``tests/adapters/golden/said/fastfood.npz``.
"""

import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "adapters",
                   "golden", "said", "fastfood.npz")


def hadamard(x):
    n = x.shape[0]
    k = int(round(np.log2(n)))
    assert 2 ** k == n
    ret = x.view([1] + [2] * k + [1])
    for dim in range(1, k + 1):
        a, b = torch.chunk(ret, 2, dim=dim)
        ret = torch.cat((a + b, a - b), dim=dim)
    return ret.view(n)


def fastfood(theta, size, bb, perm, gg):
    n = bb.shape[0]
    v = torch.nn.functional.pad(theta, (0, n - theta.shape[0])) * bb
    v = hadamard(v)[perm] * gg
    v = hadamard(v)[:size]
    return v / (torch.sqrt(n * torch.sum(gg ** 2)) * np.sqrt(size / n))


def case(rng, size, d):
    n = 2 ** int(np.ceil(np.log2(size)))
    bb = (2 * np.floor(rng.uniform(0, 2, n)) - 1).astype(np.float32)
    perm = rng.permutation(n).astype(np.int32)
    gg = rng.standard_normal(n).astype(np.float32)
    theta = rng.standard_normal(d).astype(np.float32)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in
         (("theta", theta), ("bb", bb), ("gg", gg))}
    out = fastfood(t["theta"], size, t["bb"], torch.tensor(perm, dtype=torch.long),
                   t["gg"]).numpy()
    return dict(theta=theta, bb=bb, perm=perm, gg=gg, size=np.int32(size), out=out)


if __name__ == "__main__":
    rng = np.random.default_rng(2021)
    arrays = {}
    for name, (size, d) in (("a", (30, 7)), ("b", (64, 10))):
        for k, v in case(rng, size, d).items():
            arrays[f"{name}_{k}"] = v
    np.savez(OUT, **arrays)
    print("wrote", OUT, "torch", torch.__version__)
