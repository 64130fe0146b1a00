"""Golden numbers: the SPP authors' ``DiagonalLinear`` layer (their PEFT 0.2.0 fork).

Run once in the side environment with a checkout of the authors' repository
(github.com/Lucky-Lance/SPP, commit 1583cdadb598c1c5cfa5b8947560d09bb837b14d);
never in CI, never imports peftjax, and the authors' code is not copied here:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/spp_make.py /path/to/SPP

Their ``peft/src/peft/tuners/lora.py`` is loaded by file path under a stub
package (its ``import ipdb`` gets an empty stub module). For each case a
``Linear(in, out, r=8, lora_alpha=16)`` (scaling 2, 16 row vectors as in the
authors' training script) gets a 50%-pruned base weight (or 2:4 along the
input axis) and perturbed ``weight``/``weight_col`` (``weight_col`` is zero at
init, which would make the update vanish); the script records the unmerged
forward ``y`` on an input ``x`` and the merged weight after ``.eval()``.

Writes ``tests/adapters/golden/spp/spp.npz`` (torch layout: ``W (out, in)``,
``weight (16, in)``, ``weight_col (out, 1)``).
"""

import importlib
import pathlib
import sys
import types

import numpy as np
import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "spp" / "spp.npz"
CASES = {"unstructured": (24, 32), "nm24": (16, 48)}  # (in, out)


def load_lora(repo: pathlib.Path):
    src = repo / "peft" / "src" / "peft"
    sys.modules.setdefault("ipdb", types.ModuleType("ipdb"))
    for name, path in (("_spp_ref", src), ("_spp_ref.tuners", src / "tuners")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    return importlib.import_module("_spp_ref.tuners.lora")


def main():
    lora = load_lora(pathlib.Path(sys.argv[1]))
    rng = np.random.default_rng(20240528)
    arrays = {}
    for case, (n_in, n_out) in CASES.items():
        torch.manual_seed(0)
        layer = lora.Linear(n_in, n_out, r=8, lora_alpha=16, bias=False)
        w = rng.standard_normal((n_out, n_in))
        if case == "nm24":  # keep the 2 largest of each 4 consecutive inputs
            g = np.abs(w).reshape(n_out, n_in // 4, 4)
            keep = np.argsort(-g, axis=-1)[..., :2]
            mask = np.zeros_like(g, bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            w = w * mask.reshape(w.shape)
        else:
            w = w * (rng.random(w.shape) < 0.5)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w).float())
            layer.lora_A.weight.add_(torch.from_numpy(
                rng.standard_normal(layer.lora_A.weight.shape) * 0.1).float())
            layer.lora_A.weight_col.copy_(torch.from_numpy(
                rng.standard_normal(layer.lora_A.weight_col.shape) * 0.5).float())
        x = torch.from_numpy(rng.standard_normal((3, n_in))).float()
        layer.train(True)
        with torch.no_grad():
            y = layer(x)
        arrays[f"{case}/W"] = w.astype(np.float32)
        arrays[f"{case}/weight"] = layer.lora_A.weight.detach().numpy().copy()
        arrays[f"{case}/weight_col"] = layer.lora_A.weight_col.detach().numpy().copy()
        arrays[f"{case}/x"] = x.numpy()
        arrays[f"{case}/y"] = y.numpy()
        layer.eval()  # the authors' merge: weight += repeat(weight)·weight_col·W·scaling
        arrays[f"{case}/merged"] = layer.weight.detach().numpy().copy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
