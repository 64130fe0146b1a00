"""Golden files for peftjax.inits: Hugging Face PEFT's PiSSA, OLoRA, LoRA-GA, CorDA.

Run once in the torch side environment (never imports peftjax):

    .venv-torch/bin/python scripts/golden/inits_peft.py

Writes tests/inits/golden/inits_peft.npz. Everything is in torch layout
(W (out, in), lora_A (r, in), lora_B (out, r)); the test converts
(Flax kernel = W.T, a = lora_A.T, b = lora_B.T). A two-layer MLP
x (10) -> l1 -> tanh -> l2 (8) with r=2, lora_alpha=4 (s=2). Weights have a
decaying spectrum so that randomized SVDs are well determined; tests compare
products and subspaces, never raw singular vectors.
"""

import copy
import dataclasses
import os
import sys
import types

# PEFT 0.21.2's corda.py does `from attr import dataclass` (the attrs package),
# which the side environment lacks; it only decorates a plain record class.
if "attr" not in sys.modules:
    try:
        import attr  # noqa: F401
    except ImportError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)

import numpy as np
import peft
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from torch import nn

torch.set_num_threads(2)
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "inits", "golden",
                   "inits_peft.npz")
R, ALPHA = 2, 4
SHAPES = {"l1": (12, 10), "l2": (8, 12)}


def spectrum_matrix(rng, m, n, decay):
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    s = 3.0 * decay ** np.arange(k)
    return (u[:, :k] * s) @ v[:, :k].T


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(10, 12, bias=False)
        self.l2 = nn.Linear(12, 8, bias=False)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def main():
    rng = np.random.default_rng(0)
    out = {}
    base = MLP()
    with torch.no_grad():
        for name, (m, n) in SHAPES.items():
            w = spectrum_matrix(rng, m, n, 0.6).astype(np.float32)
            getattr(base, name).weight.copy_(torch.from_numpy(w))
            out[f"W_{name}"] = w
            out[f"G_{name}"] = spectrum_matrix(rng, m, n, 0.4).astype(np.float32)
    xs = rng.standard_normal((3, 1, 6, 10)).astype(np.float32)
    out["X"] = xs

    def run(tag, cfg, prep=None):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        if prep is not None:
            prep(model, cfg)
        pm = peft.get_peft_model(model, cfg)
        for name in SHAPES:
            layer = getattr(pm.base_model.model, name)
            out[f"{tag}_A_{name}"] = layer.lora_A["default"].weight.detach().numpy().copy()
            out[f"{tag}_B_{name}"] = layer.lora_B["default"].weight.detach().numpy().copy()
            out[f"{tag}_Wres_{name}"] = layer.base_layer.weight.detach().numpy().copy()

    targets = list(SHAPES)
    run("pissa", peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                 init_lora_weights="pissa"))
    run("pissa_niter_4", peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                         init_lora_weights="pissa_niter_4"))
    run("olora", peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                 init_lora_weights="olora"))

    def set_grads(model, cfg):
        for name in SHAPES:
            getattr(model, name)._peft_loraga_grad = torch.from_numpy(out[f"G_{name}"])

    for scale in ("stable", "gd_scale", "unit"):
        run(f"loraga_{scale}", peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="lora_ga",
            lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale=scale)), set_grads)

    def corda_prep(model, cfg):
        @torch.no_grad()
        def run_model():
            for x in xs:
                model(torch.from_numpy(x))
        preprocess_corda(model, cfg, run_model=run_model)

    covs = {}

    def corda_prep_keep(model, cfg):
        # record the covariance PEFT computed (before it is pruned)
        cfg.corda_config.prune_temporary_fields = False
        corda_prep(model, cfg)
        for name in SHAPES:
            covs[name] = getattr(model, name).covariance_matrix.numpy().copy()

    for mode in ("ipm", "kpm"):
        run(f"corda_{mode}", peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="corda",
            corda_config=CordaConfig(corda_method=mode)), corda_prep_keep)
    for name in SHAPES:
        out[f"C_{name}"] = covs[name]
    out["meta_versions"] = np.array([f"peft {peft.__version__}", f"torch {torch.__version__}"])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print("wrote", os.path.normpath(OUT), len(out), "arrays")


if __name__ == "__main__":
    main()
