"""Golden numbers: the authors' LaMDA code training a tiny layer for a few steps.

Run once in the side environment, never in CI, never importing peftjax. The
authors' code (``ArminAzizi98/LaMDA`` at commit 8ad34b4) is NOT part of this
repository: obtain it yourself and pass the directory of the checkout:

    git clone https://github.com/ArminAzizi98/LaMDA /tmp/lamda
    git -C /tmp/lamda checkout 8ad34b4
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/lamda_make.py /tmp/lamda

Their ``lamda.get_lamda_model`` turns Hugging Face PEFT LoRA layers (peft
0.21 here) into LaMDA layers (``lora_B(sigma(lora_A(x)))·scaling``, ``lora_A``
frozen); their trainer's ``gradual_freeze_B`` (taken from
``custom_trainer.py`` with ``ast``, run unchanged) masks PMB's gradient
columns after each backward. This script trains one ``nn.Linear(6, 5)`` with
LoRA ``r=4, lora_alpha=8`` under torch AdamW (lr 1e-2, weight decay 0.1) for
``T = 10`` steps with ``eta = 0.3`` (1, 2 then 3 of the 4 columns of PMB get
masked), in float64 (their ``sigma`` is cast back from bfloat16).

Writes ``tests/adapters/golden/lamda/lamda.npz`` (torch layout): ``w (5, 6)``,
``x (8, 6)``, ``y (8, 5)``, the initial ``a0 (4, 6)``, ``b0 (5, 4)`` (perturbed
from PEFT's zeros by N(0, 0.3²)), ``s0 (4, 4)`` and the trained ``a``, ``b``,
``s``; ``frozen (T, 4)`` the columns their code masked at each step.
"""

import ast
import pathlib
import sys

import numpy as np
import torch
from torch import nn

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/adapters/golden/lamda/lamda.npz"
T, ETA, LR, WD = 10, 0.3, 1e-2, 0.1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.lin(x)


def load_freeze(root):
    src = (pathlib.Path(root) / "custom_trainer.py").read_text()
    node = next(n for n in ast.walk(ast.parse(src))
                if isinstance(n, ast.FunctionDef) and n.name == "gradual_freeze_B")
    ns = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "custom_trainer.py", "exec"), ns)  # noqa: S102
    return ns["gradual_freeze_B"]


def main(root):
    sys.path.insert(0, str(root))
    from lamda import get_lamda_model  # the authors' module
    from peft import LoraConfig, get_peft_model

    gradual_freeze_b = load_freeze(root)
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    get_lamda_model(model)
    model = model.double()
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.3)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.sigma["default"].weight
    out = {"w": layer.base_layer.weight.detach().numpy().copy(),
           "a0": a.detach().numpy().copy(), "b0": b.detach().numpy().copy(),
           "s0": s.detach().numpy().copy()}
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randn(8, 5, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(b), id(s)}, "only PMB and the LDA train"
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    frozen = []
    for it in range(1, T + 1):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        gradual_freeze_b(None, model, it, T, 1, eta=ETA)
        assert b.requires_grad, "keep T, eta such that PMB is never fully frozen"
        frozen.append([bool(b.grad[:, k].abs().sum() == 0) for k in range(4)])
        opt.step()
    out.update(x=x.numpy(), y=y.numpy(), a=a.detach().numpy().copy(),
               b=b.detach().numpy().copy(), s=s.detach().numpy().copy(),
               frozen=np.asarray(frozen))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.name}; frozen columns per step: {np.asarray(frozen).sum(1)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
