# SPDX-License-Identifier: Apache-2.0
"""SVFT goldens from the authors' math (github.com/VijayLingam95/SVFT, svft/svft_layers.py
at commit 8303115d45868712f952e6a847735bb59b1a9f18).

Runs once in the side virtualenv (torch; never imports peftjax, never in CI):

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/svft_make.py

The authors' ``SVFTLayer`` is re-stated below in plain torch (their code
needs ``torch_sparse``; a ``torch.sparse_coo_tensor`` product is the same
sum, duplicates added): thin SVD of the torch weight ``W (out, in)``, the
support of ``M`` by pattern (``spdiags`` band, ``randint`` pairs, ``topk`` of
their scores), kaiming-normal values, a sigmoid gate, and
``W' = U (diag(s) + sigmoid(g) M) Vh`` (their ``merge_and_unload``). Values and
gate are perturbed (gate 0.3, values + N(0, 0.1²)) so no term is trivial.
Float64 throughout.

Layout: everything in torch layout: ``u (out, n)``, ``s (n,)``, ``vh (n, in)``,
``rows``/``cols`` index ``M (n, n)`` (rows: ``u``'s columns, cols: ``vh``'s
rows), ``merged (out, in)``, ``x (4, in)``, ``y = x @ merged.T``.
One file per case: ``tests/adapters/golden/svft/<case>.npz``.
"""

import pathlib

import numpy as np
import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "svft"

# name: (out, in, pattern, off_diag, rank)
CASES = {
    "plain_square": (6, 6, "banded", 0, None),
    "random_square": (6, 6, "random", 1, None),
    "topk_square": (6, 6, "top_k", 1, None),
    "topk_wide": (5, 8, "top_k", 1, None),
    "topk_tall": (8, 5, "top_k", 1, None),
    "banded_rank3": (6, 7, "banded", 1, 3),
}


def support(u, v, n, off_diag, pattern):
    """The authors' ``s_edge_index`` for one pattern (``v`` is ``Vh``)."""
    if pattern == "banded":
        diags = 2 * off_diag + 1
        offsets = torch.cat([torch.arange(0, off_diag + 1),
                             torch.arange(-1, -off_diag - 1, -1)])
        return torch.sparse.spdiags(torch.randn([diags, n]), offsets,
                                    (n, n)).coalesce().indices()
    k = n * (2 * off_diag + 1) - off_diag * (off_diag + 1)
    if pattern == "random":
        rows = torch.randint(0, n, (k,))
        cols = torch.randint(0, n, (k,))
        return torch.stack([rows, cols])
    coeffs = u @ v.T if u.shape == v.shape else (u if u.shape[0] == u.shape[1] else v)
    _, top = torch.topk(coeffs.contiguous().view(-1), k)
    return torch.stack([top // coeffs.size(1), top % coeffs.size(1)])


def case(seed, n_out, n_in, pattern, off_diag, rank):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    w = torch.tensor(rng.standard_normal((n_out, n_in)) * 0.5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    n = s.shape[0] if rank is None else min(s.shape[0], rank)
    u, s, vh = u[:, :n], s[:n], vh[:n]
    idx = support(u, vh, n, off_diag, pattern)
    k = idx.shape[1]
    values = torch.zeros(k, dtype=torch.float64)
    torch.nn.init.kaiming_normal_(values[None, :])
    init_values = values.clone()
    values = values + torch.tensor(rng.standard_normal(k) * 0.1)
    gate = torch.tensor(0.3, dtype=torch.float64)
    m = torch.sparse_coo_tensor(idx, values * torch.sigmoid(gate), (n, n))
    del_s = torch.diag(s) + m.to_dense()  # s_pre + s (sparse sum)
    merged = ((del_s @ vh).T @ u.T).T  # get_weights().T
    x = torch.tensor(rng.standard_normal((4, n_in)))
    return dict(w=w, u=u, s=s, vh=vh, rows=idx[0].int(), cols=idx[1].int(),
                init_values=init_values, values=values, gate=gate, merged=merged, x=x,
                y=x @ merged.T, off_diag=np.int32(off_diag), rank=np.int32(n))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, spec) in enumerate(sorted(CASES.items())):
        arrays = case(seed, *spec)
        np.savez(OUT / f"{name}.npz", **{
            k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in arrays.items()})
        print(name, {k: tuple(np.shape(v)) for k, v in arrays.items()})


if __name__ == "__main__":
    main()
