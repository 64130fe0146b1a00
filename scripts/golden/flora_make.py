"""Golden numbers: the authors' FLoRA layers on a linear, a conv and a 3-mode kernel.

Run once in the side environment, never in CI, never importing peftjax. The
authors' code (``SJTU-DeepVisionLab/FLoRA`` at commit d424560) is NOT part of
this repository: obtain it yourself and pass the directory of the checkout
(its ``flora/layers.py`` imports only torch and is imported from there):

    git clone https://github.com/SJTU-DeepVisionLab/FLoRA /tmp/flora
    git -C /tmp/flora checkout d424560
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/flora_make.py /tmp/flora

Cases (float64; their ``init_parameters`` then ``param_G`` perturbed by
N(0, 0.3²), since their zero core makes the delta vanish):

* ``linear``: their ``Linear`` on ``nn.Linear(7, 5)``, ``r=[3, 2]``, scale 1.5:
  ``x (4, 7)`` and their forward ``y (4, 5)``.
* ``conv``: their ``Conv2D`` on ``nn.Conv2d(4, 6, 3, stride=2, padding=1)``,
  ``r=[3, 4, 2, 2]``, scale 4.0: ``x (2, 4, 7, 7)`` and ``y (2, 6, 4, 4)``.
* ``heads``: their N-mode ``FLoRALayer`` with ``dims=[8, 2, 4]`` (embed,
  heads, head_dim), ``r=[3, 2, 3]``, scale 2.0: its delta (their layout,
  modes 0 and 1 swapped by their final ``transpose(0, 1)``).

Writes ``tests/adapters/golden/flora/flora.npz`` (torch layouts): per case
``G``, ``P0..P{N-1}`` (their ``param_i``, modes in their order ``[in, out,
spatial...]``), ``delta`` (their ``forward(style='v2')``), and for ``linear``
and ``conv`` the base ``weight``, ``bias``, ``x`` and ``y``.
"""

import pathlib
import sys

import numpy as np
import torch
from torch import nn

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/adapters/golden/flora/flora.npz"


def perturb(layer, gen):
    with torch.no_grad():
        layer.param_G.copy_(torch.randn(layer.param_G.shape, generator=gen,
                                        dtype=torch.float64) * 0.3)


def record(out, name, layer):
    out[f"{name}/G"] = layer.param_G.detach().numpy().copy()
    for i in range(layer.N):
        out[f"{name}/P{i}"] = getattr(layer, f"param_{i}").detach().numpy().copy()
    out[f"{name}/delta"] = layer.forward(style="v2").detach().numpy().copy()


def main(root):
    sys.path.insert(0, str(root))
    from flora.layers import Conv2D, FLoRALayer, Linear  # the authors' module

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    out = {}
    with torch.no_grad():
        for name, base, cfg, x in [
            ("linear", nn.Linear(7, 5), dict(N=2, r=[3, 2], scale=1.5, drop_rate=0.0),
             torch.randn(4, 7, generator=gen, dtype=torch.float64)),
            ("conv", nn.Conv2d(4, 6, 3, stride=2, padding=1),
             dict(N=4, r=[3, 4, 2, 2], scale=4.0, drop_rate=0.0),
             torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64)),
        ]:
            cls = Linear if name == "linear" else Conv2D
            mod = cls(base.double(), cfg).double().eval()
            perturb(mod.flora_layer, gen)
            record(out, name, mod.flora_layer)
            out[f"{name}/weight"] = base.weight.numpy().copy()
            out[f"{name}/bias"] = base.bias.numpy().copy()
            out[f"{name}/x"] = x.numpy().copy()
            out[f"{name}/y"] = mod(x).numpy().copy()
        heads = FLoRALayer("attention", dims=[8, 2, 4], N=3, r=[3, 2, 3], scale=2.0).double()
        heads.init_parameters()
        perturb(heads, gen)
        record(out, "heads", heads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.name}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()
                                            if k.endswith("delta")))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
