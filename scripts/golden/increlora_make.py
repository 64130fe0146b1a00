# SPDX-License-Identifier: Apache-2.0
"""Golden numbers for ``adapters.increlora`` from the authors' IncreLoRA code.

Run once in the side environment (never in CI, never imports peftjax), with
the directory holding the authors' ``increlora.py`` and ``layers.py``
(FeiyuZhang98/IncreLoRA, ``loralib/loralib/``, commit
51a2d734af7883ef90425206057c1ef25997b359) as the argument:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/increlora_make.py <loralib dir>

The two files are loaded by path under a stub package (``ipdb``, imported by
them for debugging, is stubbed); nothing of them is copied. It writes
``tests/adapters/golden/increlora/increlora.npz``.

Setup, float64: a two-layer net ``y = l2(tanh(l1(x)))`` of the authors'
``SVDLinear`` (6→5, 5→4; ``r = 1``, ``lora_alpha = 4``), their
``RankAllocator`` (``incre_rank_num = 1``, ``top_h = 1``, ``init_warmup = 0``,
``incre_interval = 1``, advance learning, ``β1 = β2 = 0.85``, target total
rank 4). Step 0 calls ``update_and_increase`` before any backward (so each
layer gets its reserve component and a zero score, as at the start of their
trainer); then every parameter is perturbed (base weights N(0, 0.5²), ``E``
uniform ±[0.5, 1.5], ``A``/``B`` N(0, 0.3²)) so that nothing is negligible.
Steps 1–3: forward on a fresh batch, MSE loss, backward (the authors' hook
computes each layer's score), ``update_and_increase``. No optimizer step:
the parameters change only by growth. Stored per step and layer (torch
layout, ``A (R, in)``, ``B (out, R)``, ``E (R,)`` for the existing ``R``
components): the components and ``ranknum`` before the step, the input,
target and output, the hook score, the smoothed ``Ī``/``Ū`` after the step,
and ``ranknum`` and ``E`` after it.
"""

import importlib.util
import pathlib
import sys
import types

import numpy as np
import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "increlora" / "increlora.npz"


def load(src: pathlib.Path):
    sys.modules.setdefault("ipdb", types.ModuleType("ipdb"))
    pkg = types.ModuleType("increlora_ref")
    pkg.__path__ = [str(src)]
    sys.modules["increlora_ref"] = pkg
    for name in ("layers", "increlora"):
        spec = importlib.util.spec_from_file_location(f"increlora_ref.{name}",
                                                      src / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["increlora_ref.increlora"]


def main(src: str) -> None:
    ref = load(pathlib.Path(src))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = ref.SVDLinear(6, 5, r=1, lora_alpha=4)
            self.l2 = ref.SVDLinear(5, 4, r=1, lora_alpha=4)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    net = Net()
    alloc = ref.RankAllocator(net, lora_r=1, target_rank=2, init_warmup=0,
                              incre_interval=1, top_h=1, advance_learn=True,
                              beta1=0.85, beta2=0.85, target_total_rank=4,
                              incre_rank_num=1)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0)
    for layer in (net.l1, net.l2):  # no backward yet: a zero score (a float has no .abs)
        layer.score = torch.zeros(())
    alloc.update_and_increase(net, 0, opt)  # reserve components, zero scores

    def t(x):
        return torch.as_tensor(np.asarray(x, np.float64))

    layers = {"l1": net.l1, "l2": net.l2}
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(t(rng.standard_normal(layer.weight.shape) * 0.5))
            layer.bias.copy_(t(rng.standard_normal(layer.bias.shape) * 0.1))
            for e in layer.lora_E:
                if e.requires_grad:  # active; the reserve keeps its 1e-5
                    sign = rng.choice([-1.0, 1.0], e.shape)
                    e.copy_(t(sign * rng.uniform(0.5, 1.5, e.shape)))
            for p in list(layer.lora_A) + list(layer.lora_B):
                p.copy_(t(rng.standard_normal(p.shape) * 0.3))

    def cat(layer):
        a = torch.cat([x for x in layer.lora_A], 0).detach().numpy().copy()
        e = torch.cat([x for x in layer.lora_E], 0).reshape(-1).detach().numpy().copy()
        b = torch.cat([x for x in layer.lora_B], 1).detach().numpy().copy()
        return a, e, b

    out: dict[str, np.ndarray] = {}
    for n, layer in layers.items():
        out[f"{n}/weight"] = layer.weight.detach().numpy().copy()
        out[f"{n}/bias"] = layer.bias.detach().numpy().copy()
    for step in (1, 2, 3):
        for n, layer in layers.items():
            a, e, b = cat(layer)
            out[f"s{step}/{n}/A"], out[f"s{step}/{n}/E"], out[f"s{step}/{n}/B"] = a, e, b
            out[f"s{step}/{n}/rank_before"] = np.asarray(float(layer.ranknum.item()))
        x = rng.standard_normal((4, 6))
        target = rng.standard_normal((4, 4))
        net.zero_grad()
        y = net(t(x))
        loss = torch.mean((y - t(target)) ** 2)
        loss.backward()
        out[f"s{step}/x"], out[f"s{step}/target"] = x, target
        out[f"s{step}/y"] = y.detach().numpy().copy()
        for n, layer in layers.items():
            out[f"s{step}/{n}/score"] = np.asarray(float(layer.score))
        alloc.update_and_increase(net, step, opt)
        for n, layer in layers.items():
            out[f"s{step}/{n}/ipt"] = np.asarray(float(alloc.exp_avg_ipt[n]))
            out[f"s{step}/{n}/unc"] = np.asarray(float(alloc.exp_avg_unc[n]))
            out[f"s{step}/{n}/rank_after"] = np.asarray(float(layer.ranknum.item()))
            out[f"s{step}/{n}/E_after"] = cat(layer)[1]
        out[f"s{step}/total_rank"] = np.asarray(float(alloc.total_rank))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, **out)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")
    for step in (1, 2, 3):
        print(step, {n: (float(out[f"s{step}/{n}/score"]), float(out[f"s{step}/{n}/rank_after"]))
                     for n in layers})


if __name__ == "__main__":
    main(sys.argv[1])
