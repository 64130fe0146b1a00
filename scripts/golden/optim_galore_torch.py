"""Golden numbers: galore-torch ``GaLoreAdamW`` on a fixed gradient sequence.

Run once in the side environment (never in CI, never imports peftjax):

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/optim_galore_torch.py

It writes ``tests/optim/golden/galore_torch.npz``. ``import galore_torch``
pulls in bitsandbytes, so the package's ``adamw.py`` and
``galore_projector.py`` are loaded by file path under a stub package.

Layout: torch weights are ``W: (out, in)``; the Flax kernel is ``K = Wᵀ``.
Gradients are stored in torch layout under ``grads/<case>`` with shape
``(steps, out, in)``; the parameter change of every step is stored as
``deltas/<case>``, also in torch layout. The JAX test transposes both.

Configuration: lr 1e-2, betas (0.9, 0.999), eps 1e-6 (HF-style placement),
weight decay 0, rank 2, update_proj_gap 2, scale 0.25, 7 steps (refreshes at
steps 0, 2, 4, 6), |g| about 1e-3, shapes (8, 4), (4, 8), (6, 6), every
proj_type.

Singular-vector signs: GaLore keeps its moments across refreshes, so the
(arbitrary) sign LAPACK picks for each singular pair changes the numbers after
the second refresh. Both sides use one convention: each pair is flipped so the
largest-magnitude entry of its output-axis vector (torch ``U[:, i]``, the
Flax view's ``Vᵀ[i, :]``) is positive. Here ``torch.linalg.svd`` is wrapped to
do that; the reference code itself is not modified.
"""

import importlib
import json
import pathlib
import sys
import types

import numpy as np
import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "optim" / "golden" / "galore_torch.npz"

SHAPES = [(8, 4), (4, 8), (6, 6)]
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
STEPS = 7
CONFIG = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
              rank=2, update_proj_gap=2, scale=0.25)


def load_galore_torch():
    spec = importlib.util.find_spec("galore_torch")
    pkg_dir = spec.submodule_search_locations[0]
    stub = types.ModuleType("_galore_ref")
    stub.__path__ = [pkg_dir]
    sys.modules["_galore_ref"] = stub
    return importlib.import_module("_galore_ref.adamw")


def canonical_svd(svd):
    def wrapped(a, full_matrices=True, **kw):
        u, s, vh = svd(a, full_matrices=full_matrices, **kw)
        idx = u.abs().argmax(dim=0)
        sign = torch.sign(u[idx, torch.arange(u.shape[1])])
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return u * sign[None, :], s, vh * sign[:, None]

    return wrapped


def main():
    torch.linalg.svd = canonical_svd(torch.linalg.svd)
    adamw = load_galore_torch()
    rng = np.random.default_rng(20240305)
    arrays = {}
    for shape in SHAPES:
        grads = (rng.standard_normal((STEPS,) + shape) * 1e-3).astype(np.float32)
        w0 = rng.standard_normal(shape).astype(np.float32)
        for proj_type in PROJ_TYPES:
            case = f"{shape[0]}x{shape[1]}_{proj_type}"
            w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
            opt = adamw.AdamW(
                [{"params": [w], "rank": CONFIG["rank"],
                  "update_proj_gap": CONFIG["update_proj_gap"],
                  "scale": CONFIG["scale"], "proj_type": proj_type}],
                lr=CONFIG["lr"], betas=CONFIG["betas"], eps=CONFIG["eps"],
                weight_decay=CONFIG["weight_decay"], no_deprecation_warning=True,
            )
            deltas = []
            for k in range(STEPS):
                before = w.detach().clone()
                w.grad = torch.from_numpy(grads[k].copy())
                opt.step()
                deltas.append((w.detach() - before).numpy())
            arrays[f"grads/{case}"] = grads
            arrays[f"deltas/{case}"] = np.stack(deltas)
    arrays["config"] = np.array(json.dumps(CONFIG))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
