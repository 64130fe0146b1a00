"""Golden numbers: the authors' MoRA code (``peft-mora``) on perturbed inputs.

Run once in the side environment, never in CI, never importing peftjax. The
authors' code (``kongds/MoRA`` at commit de5df31; ``layer.py`` last changed in
d0528b4) is NOT part of this repository: obtain it yourself and pass the path
of its ``peft-mora/src/peft/tuners/lora/layer.py``:

    git clone https://github.com/kongds/MoRA /tmp/mora
    git -C /tmp/mora checkout de5df31
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 .venv-torch/bin/python \
        scripts/golden/mora_make.py /tmp/mora/peft-mora/src/peft/tuners/lora/layer.py

Only the two methods ``LoraLayer._apply_mora`` (forward delta) and
``Linear.get_delta_weight`` (merge) are taken from that file (with ``ast``)
and run unchanged on a stand-in ``self`` carrying the attributes they read;
the rest of the fork (and its imports) is not loaded.

Writes ``tests/adapters/golden/mora/mora.npz`` (numbers only, torch layout):
per case ``<in>x<out>_r<rank>_t<type>``: ``a`` the authors' ``lora_A.weight
(r̂, r̂)`` (N(0, 0.3²), not their zero init), ``x (3, in)``, ``delta`` their
merged ``get_delta_weight`` ``(out, in)`` and, except for type 5 (whose
forward raises in their code), ``y`` their forward delta ``(3, out)``.
"""

import ast
import math
import pathlib
import sys
import types

import numpy as np
import torch
from torch import nn

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/adapters/golden/mora/mora.npz"
SHAPES = [(20, 12, 2), (12, 20, 2), (16, 16, 2), (18, 7, 1)]
TYPES = [1, 2, 3, 4, 5, 6]


def load_methods(path):
    tree = ast.parse(pathlib.Path(path).read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("_apply_mora",
                                                               "get_delta_weight"):
            if node.name == "get_delta_weight" and "use_mora" not in ast.unparse(node):
                continue  # the embedding/conv variants
            found[node.name] = node
    assert set(found) == {"_apply_mora", "get_delta_weight"}, sorted(found)
    ns = {"torch": torch, "math": math, "nn": nn, "transpose": None}
    module = ast.Module(body=list(found.values()), type_ignores=[])
    exec(compile(module, str(path), "exec"), ns)  # noqa: S102 (the authors' two methods)
    return ns["_apply_mora"], ns["get_delta_weight"]


def r_hat(n_in, n_out, r, mora_type):
    new_r = int(math.sqrt((n_in + n_out) * r) + 0.5)  # the authors' update_layer
    return new_r // 2 * 2 if mora_type == 6 else new_r


def main(path):
    apply_mora, delta_weight = load_methods(path)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n_in, n_out, r in SHAPES:
        for t in TYPES:
            rh = r_hat(n_in, n_out, r, t)
            lin = nn.Linear(rh, rh, bias=False, dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(rh, rh, generator=gen, dtype=torch.float64) * 0.3)
            self = types.SimpleNamespace(
                in_features=n_in, out_features=n_out, r={"d": rh}, mora_type={"d": t},
                use_mora={"d": True}, lora_A={"d": lin}, lora_B={"d": lin},
                scaling={"d": 1.0}, fan_in_fan_out=False)
            x = torch.randn(3, n_in, generator=gen, dtype=torch.float64)
            key = f"{n_in}x{n_out}_r{r}_t{t}"
            with torch.no_grad():
                out[f"{key}/a"] = lin.weight.numpy().copy()
                out[f"{key}/x"] = x.numpy().copy()
                out[f"{key}/delta"] = delta_weight(self, "d").numpy().copy()
                if t != 5:
                    fresh = types.SimpleNamespace(**{k: v for k, v in vars(self).items()})
                    y = apply_mora(fresh, x, lin, lin, 1.0, "d")
                    out[f"{key}/y"] = y.numpy().copy()
                    # The authors' forward and merge agree (a check of this script).
                    np.testing.assert_allclose(out[f"{key}/y"],
                                               out[f"{key}/x"] @ out[f"{key}/delta"].T,
                                               atol=1e-10)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT.name}: {len(out)} arrays")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
