"""Golden trajectories: PEFT's LoRA-FA and Riemannian-preconditioned optimizers.

Run once in the side environment (never in CI, never imports peftjax):

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/optim_peft_lorafa_riemannian.py

It writes ``tests/optim/golden/peft_lorafa_riemannian.npz``.

Problem: a two-layer net ``y = fc2(tanh(fc1(x)))`` with ``fc1: 8 -> 12`` and
``fc2: 12 -> 6``, PEFT LoRA (``r=4``, ``lora_alpha=8``) on both layers, the
bias of ``fc2`` trainable too (a non-LoRA leaf: both optimizers update it with
their plain AdamW / base optimizer), mean-squared error on 16 fixed inputs
and targets, 8 full-batch steps. ``lora_B`` starts perturbed (not zero) so
every preconditioner and gradient is non-trivial.

Layout: torch weights are ``lora_A: (r, in)``, ``lora_B: (out, r)``,
``W: (out, in)``; every array is stored in torch layout. The JAX test uses
``a = lora_Aᵀ: (in, r)``, ``b = lora_Bᵀ: (r, out)``, ``kernel = Wᵀ``.

Cases (``traj/<case>/<param>``: the parameter after each step, shape
``(steps, ...)``; ``loss/<case>``: the loss before each step):

* ``lorafa``: ``create_lorafa_optimizer(r=4, lora_alpha=8, lr=1e-2,
  weight_decay=0.05)``, with ``is_bf16_available`` patched to ``False`` so
  the projection runs in float32 (on a machine with bfloat16 PEFT wraps the
  projection in a bfloat16 autocast);
* ``lorafa_rslora``: the same with ``LoraConfig(use_rslora=True)`` (scaling
  ``alpha/sqrt(r)``) and ``weight_decay=0``;
* ``lorafa_autocast``: ``lorafa`` unpatched: the projection matmul runs
  under ``torch.autocast("cpu", torch.bfloat16)``;
* ``riemannian_adamw``: ``create_riemannian_optimizer(model,
  torch.optim.AdamW, lr=1e-2, reg=1e-2, weight_decay=0.01)``;
* ``riemannian_sgd``: ``create_riemannian_optimizer(model, torch.optim.SGD,
  lr=5e-2, reg=1e-2, momentum=0.9)``.
"""

import json
import pathlib

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer, create_riemannian_optimizer
from peft.optimizers import lorafa as lorafa_module

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "optim" / "golden" / "peft_lorafa_riemannian.npz"
STEPS = 8
R, ALPHA = 4, 8


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 12)
        self.fc2 = torch.nn.Linear(12, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(init, use_rslora=False):
    torch.manual_seed(0)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc1", "fc2"],
                     use_rslora=use_rslora)
    model = get_peft_model(Net(), cfg)
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in init.items():
            sd[k].copy_(torch.from_numpy(v))
    model.base_model.model.fc2.base_layer.bias.requires_grad_(True)
    return model


NAMES = {
    "fc1_a": "base_model.model.fc1.lora_A.default.weight",
    "fc1_b": "base_model.model.fc1.lora_B.default.weight",
    "fc2_a": "base_model.model.fc2.lora_A.default.weight",
    "fc2_b": "base_model.model.fc2.lora_B.default.weight",
    "fc1_w": "base_model.model.fc1.base_layer.weight",
    "fc1_bias": "base_model.model.fc1.base_layer.bias",
    "fc2_w": "base_model.model.fc2.base_layer.weight",
    "fc2_bias": "base_model.model.fc2.base_layer.bias",
}
TRAJ = ["fc1_a", "fc1_b", "fc2_a", "fc2_b", "fc2_bias"]


def run(model, opt, x, y):
    params = dict(model.named_parameters())
    traj = {k: [] for k in TRAJ}
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for k in TRAJ:
            traj[k].append(params[NAMES[k]].detach().numpy().copy())
    return {k: np.stack(v) for k, v in traj.items()}, np.asarray(losses)


def main():
    rng = np.random.default_rng(0)
    n = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    init = {
        NAMES["fc1_w"]: n(12, 8, scale=0.3), NAMES["fc1_bias"]: n(12, scale=0.1),
        NAMES["fc2_w"]: n(6, 12, scale=0.3), NAMES["fc2_bias"]: n(6, scale=0.1),
        NAMES["fc1_a"]: n(R, 8, scale=0.4), NAMES["fc1_b"]: n(12, R, scale=0.1),
        NAMES["fc2_a"]: n(R, 12, scale=0.4), NAMES["fc2_b"]: n(6, R, scale=0.1),
    }
    x = torch.from_numpy(n(16, 8))
    y = torch.from_numpy(n(16, 6, scale=0.5))
    out = {f"init/{k}": init[v] for k, v in NAMES.items()}
    out["x"], out["y"] = x.numpy(), y.numpy()

    cases = {}
    real_bf16 = lorafa_module.is_bf16_available
    try:
        lorafa_module.is_bf16_available = lambda *a, **k: False
        m = make_model(init)
        cases["lorafa"] = run(m, create_lorafa_optimizer(m, r=R, lora_alpha=ALPHA, lr=1e-2,
                                                         weight_decay=0.05), x, y)
        m = make_model(init, use_rslora=True)
        cases["lorafa_rslora"] = run(m, create_lorafa_optimizer(m, r=R, lora_alpha=ALPHA,
                                                                lr=1e-2), x, y)
    finally:
        lorafa_module.is_bf16_available = real_bf16
    assert real_bf16(), "this golden expects a torch with bfloat16 (the autocast case)"
    m = make_model(init)
    cases["lorafa_autocast"] = run(m, create_lorafa_optimizer(m, r=R, lora_alpha=ALPHA, lr=1e-2,
                                                              weight_decay=0.05), x, y)
    m = make_model(init)
    cases["riemannian_adamw"] = run(m, create_riemannian_optimizer(
        m, torch.optim.AdamW, lr=1e-2, reg=1e-2, weight_decay=0.01), x, y)
    m = make_model(init)
    cases["riemannian_sgd"] = run(m, create_riemannian_optimizer(
        m, torch.optim.SGD, lr=5e-2, reg=1e-2, momentum=0.9), x, y)

    for case, (traj, losses) in cases.items():
        for k, v in traj.items():
            out[f"traj/{case}/{k}"] = v
        out[f"loss/{case}"] = losses
    import peft
    out["meta"] = np.asarray(json.dumps({"peft": peft.__version__, "torch": torch.__version__,
                                         "steps": STEPS, "r": R, "lora_alpha": ALPHA}))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    for case, (_, losses) in cases.items():
        print(case, np.round(losses, 5))


if __name__ == "__main__":
    main()
