"""Golden numbers: the SLTrain authors' ``SpLoRaLinear`` (forward and backward).

Run once in the side environment with a checkout of the authors' repository
(github.com/andyjm3/SLTrain, commit 2335d62c75df9b0f0441604eb04fde21b06693e4);
never in CI, never imports peftjax, and the authors' code is not copied here:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/sltrain_make.py /path/to/SLTrain

Their C++ extension ``sparse-lora/sparse_linear.cpp`` is compiled with
``torch.utils.cpp_extension.load`` (a C++ compiler, CPU only) and registered
as ``sltrain_linear``; ``splora/splora_linear.py`` is loaded by file path.
One layer ``SpLoRaLinear(7, 5, r=2, sp_ratio=0.3, lora_alpha=4)`` (no bias)
under ``torch.manual_seed(0)`` gets a perturbed ``lora_B`` (zero at init);
the script records the forward ``y = layer(x)`` (no dense base: the
pre-training form) and the gradients of ``sum(y * c)`` through the authors'
backward.

Writes ``tests/adapters/golden/sltrain/sltrain.npz`` (torch layout:
``lora_A (r, in)``, ``lora_B (out, r)``, ``sparse_index`` flat over ``(out, in)``).
"""

import importlib.util
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
from torch.utils.cpp_extension import load

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "sltrain" / "sltrain.npz"


def load_splora(repo: pathlib.Path):
    build = os.environ.get("SLTRAIN_BUILD") or tempfile.mkdtemp(prefix="sltrain_build_")
    ext = load(name="sltrain_linear", sources=[str(repo / "sparse-lora" / "sparse_linear.cpp")],
               build_directory=build)
    sys.modules["sltrain_linear"] = ext
    spec = importlib.util.spec_from_file_location(
        "_sltrain_ref", repo / "splora" / "splora_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    mod = load_splora(pathlib.Path(sys.argv[1]))
    rng = np.random.default_rng(20241101)
    torch.manual_seed(0)
    layer = mod.SpLoRaLinear(7, 5, 2, 0.3, lora_alpha=4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.copy_(torch.from_numpy(rng.standard_normal((5, 2))))
    x = torch.from_numpy(rng.standard_normal((3, 7)))
    c = torch.from_numpy(rng.standard_normal((3, 5)))
    y = layer(x)
    (y * c).sum().backward()
    arrays = {
        "lora_A": layer.lora_A.detach().numpy(), "lora_B": layer.lora_B.detach().numpy(),
        "sparse_value": layer.sparse_value.detach().numpy(),
        "sparse_index": layer.sparse_index.numpy().astype(np.int64),
        "x": x.numpy(), "c": c.numpy(), "y": y.detach().numpy(),
        "grad_A": layer.lora_A.grad.numpy(), "grad_B": layer.lora_B.grad.numpy(),
        "grad_value": layer.sparse_value.grad.numpy(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
