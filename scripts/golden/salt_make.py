# SPDX-License-Identifier: Apache-2.0
"""Golden numbers: the SALT authors' ``SALTLinear`` forward on perturbed parameters.

Run once in the side environment (never in CI, never imports peftjax), with
the path of the authors' ``prompt_adapted_SAM2/modeling/Adapters/SALT.py``
(https://github.com/BioMedIA-MBZUAI/SALT, commit
7314877a987221cbb499e836220a090c35fc60e1) as the argument::

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/salt_make.py <path>/SALT.py

The file is loaded by path (its ``einops`` import, used only by the conv
layer, is stubbed); the authors' code is neither copied nor committed. Per
case it builds ``SALTLinear(in, out, ratio_salt, r_lora)``, sets a fixed
weight, runs its SVD, perturbs every trainable tensor (some shifts push top
singular values below 0, and ``X Y`` has negative entries, so the ReLU
clips) and records, in torch layout: the weight, the authors' ``U``, ``S``,
``Vt``, the parameters, an input batch, the output and ``reg_loss``. The
peftjax test rebuilds the Flax basis from ``U``/``S``/``Vt`` (singular
vectors have arbitrary signs) and compares. Writes
``tests/adapters/golden/salt/salt_authors.npz``.
"""

import importlib.util
import pathlib
import sys
import types

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "salt" / "salt_authors.npz"
# (name, in, out, ratio_salt, r_lora)
CASES = [("wide", 7, 5, 0.4, 2), ("tall", 4, 9, 0.3, 3)]


def load_salt(path):
    sys.modules.setdefault("einops", types.SimpleNamespace(rearrange=None))
    spec = importlib.util.spec_from_file_location("_salt_authors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(path):
    torch.set_num_threads(1)
    mod = load_salt(path)
    rng = np.random.default_rng(2503)
    out = {}
    for name, n_in, n_out, ratio, r_lora in CASES:
        layer = mod.SALTLinear(n_in, n_out, ratio_salt=ratio, r_lora=r_lora, bias=False)
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
            layer.perform_svd()
            r = layer.trainable_scale_A.shape[0]
            layer.trainable_scale_A.copy_(torch.from_numpy(
                (1 + 0.3 * rng.standard_normal(r)).astype(np.float32)))
            shift = 0.3 * rng.standard_normal(r)
            shift[-1] = -2.0 * float(layer.S[r - 1])  # this one is clipped by the ReLU
            layer.trainable_shift_B.copy_(torch.from_numpy(shift.astype(np.float32)))
            for p in (layer.trainable_X, layer.trainable_Y):
                p.copy_(torch.from_numpy(
                    (0.5 * rng.standard_normal(tuple(p.shape))).astype(np.float32)))
        x = rng.standard_normal((3, n_in)).astype(np.float32)
        with torch.no_grad():
            y, reg = layer(torch.from_numpy(x))
        out.update({f"{name}/w": w, f"{name}/u": layer.U.numpy(),
                    f"{name}/s": layer.S.numpy(), f"{name}/vt": layer.Vt.numpy(),
                    f"{name}/scale": layer.trainable_scale_A.detach().numpy(),
                    f"{name}/shift": layer.trainable_shift_B.detach().numpy(),
                    f"{name}/X": layer.trainable_X.detach().numpy(),
                    f"{name}/Y": layer.trainable_Y.detach().numpy(),
                    f"{name}/x": x, f"{name}/y": y.numpy(),
                    f"{name}/reg_loss": np.float32(reg.item()),
                    f"{name}/ratio": np.float32(ratio), f"{name}/r_lora": np.int32(r_lora)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
