"""Golden file for peftjax.adapters.lora_conv: Hugging Face PEFT's LoRA on convolutions.

Run once in the torch side environment (never imports peftjax):

    .venv-torch/bin/python scripts/golden/peft_conv_make.py

Writes tests/adapters/golden/peft_conv.npz. A tiny model with a Conv2d
(4 -> 6 channels, 3x3, stride 2, padding 1, bias) and a Conv1d (3 -> 5
channels, kernel 3, padding 1, bias), both targeted by PEFT LoRA with r=2,
lora_alpha=4 (s = 2). PEFT initialises lora_B to zero; it is overwritten with
seeded non-zero values so that the golden checks the adapter branch, not the
identity. Everything is stored in torch layout (weights (out, in, k...),
lora_A (r, in, k...), lora_B (out, r, 1...), inputs NC[H]W); the test converts
to Flax (HWIO kernels, NHWC inputs).

Stored per layer (prefix c2/ or c1/): x, weight, bias, lora_A, lora_B, scaling,
y_base (base conv), y_lora (PEFT's unmerged forward: base + lora_B(lora_A(x))·s),
y_merged (the conv after PEFT's merge_and_unload) and delta (get_delta_weight).
lora_A is PEFT's own kaiming-uniform init (the test checks its bound).
"""

import os

import numpy as np
import peft
import torch
from torch import nn

torch.set_num_threads(2)
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "adapters", "golden",
                   "peft_conv.npz")
R, ALPHA = 2, 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
        self.c1 = nn.Conv1d(3, 5, 3, padding=1, bias=True)

    def forward(self, x2, x1):
        return self.c2(x2), self.c1(x1)


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = Net().double()
    x2 = torch.from_numpy(rng.standard_normal((2, 4, 7, 7)))
    x1 = torch.from_numpy(rng.standard_normal((2, 3, 9)))
    y_base = [t.detach().numpy() for t in net(x2, x1)]
    base_w = {n: (getattr(net, n).weight.detach().numpy().copy(),
                  getattr(net, n).bias.detach().numpy().copy()) for n in ("c2", "c1")}

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c2", "c1"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(net, cfg)
    layers = {n: getattr(model.base_model.model, n) for n in ("c2", "c1")}
    out = {}
    for n, layer in layers.items():
        assert not layer.lora_B["default"].weight.detach().numpy().any()
        with torch.no_grad():
            b = layer.lora_B["default"].weight
            b.copy_(torch.from_numpy(0.3 * rng.standard_normal(tuple(b.shape))))
        out[f"{n}/lora_A"] = layer.lora_A["default"].weight.detach().numpy().copy()
        out[f"{n}/lora_B"] = layer.lora_B["default"].weight.detach().numpy().copy()
        out[f"{n}/scaling"] = np.float64(layer.scaling["default"])
        out[f"{n}/delta"] = layer.get_delta_weight("default").detach().numpy().copy()
        out[f"{n}/weight"], out[f"{n}/bias"] = base_w[n]

    with torch.no_grad():
        y_lora = [t.numpy() for t in model(x2, x1)]
        merged = model.merge_and_unload()
        y_merged = [t.numpy() for t in merged(x2, x1)]
    for k, n in enumerate(("c2", "c1")):
        out[f"{n}/x"] = (x2, x1)[k].numpy()
        out[f"{n}/y_base"] = y_base[k]
        out[f"{n}/y_lora"] = y_lora[k]
        out[f"{n}/y_merged"] = y_merged[k]
        assert np.abs(y_lora[k] - y_base[k]).max() > 0.1, "adapter branch is ~0"
        assert np.abs(y_lora[k] - y_merged[k]).max() < 1e-10
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez(OUT, **out)
    print("wrote", os.path.normpath(OUT), {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
