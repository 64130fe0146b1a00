"""Golden numbers: the SpIEL reference (``SftAdamW`` + ``SftSelector``, rigl).

Run once in the side environment (never in CI, never imports peftjax):

    git --git-dir=<mirror of AlanAnsell/peft> show \
        73b455b:src/peft/tuners/sft/optimizer.py > /tmp/spref/optimizer.py
    git --git-dir=<mirror of AlanAnsell/peft> show \
        73b455b:src/peft/tuners/sft/trainer.py > /tmp/spref/trainer.py
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/sparse_spiel_ref.py /tmp/spref

The reference files are loaded by file path under a stub package (their
``transformers``/``accelerate``/``.layer`` imports are replaced by stubs: the
selector only needs modules with ``sft_delta``/``apply_hook``); they are not
modified and never committed. It writes ``tests/optim/golden/spiel_ref.npz``.

Problem: the loss is ``Σ_leaf sum(W'_leaf ⊙ G_t[leaf])`` with a fixed random
gradient sequence ``G_t``, so the dense gradient is ``G_t`` and the values'
gradient is ``G_t`` gathered at the indices, whatever the weights. Leaves
(torch layout = the flat row-major positions peftjax uses on a Flax kernel of
the same shape; the test simply uses these shapes as Flax kernels):
``w1`` (16, 12) with k = 40, and a stacked leaf ``w2`` (2, 10, 8) with k = 20
per layer, which the reference sees as two modules ``w2_0``, ``w2_1``.
Initial indices are random sorted subsets (stored). Configuration: lr 1e-2,
betas (0.9, 0.999), eps 1e-6, weight decay 0.5, reselection_steps 20,
selection_accumulation_steps 5, initial_reselection_rate 0.2, linear policy,
total_update_steps 70, grad_accumulation_steps 1, 46 steps: selections at
completed steps 5 (p = 1), 25 and 45. After each selection the script stores
indices, values, exp_avg, exp_avg_sq and age of every module.
"""

import importlib.util
import pathlib
import sys
import types

import numpy as np
import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "optim" / "golden" / "spiel_ref.npz"
STEPS, TOTAL = 46, 70
LEAVES = {"w1": ((16, 12), 40), "w2_0": ((10, 8), 20), "w2_1": ((10, 8), 20)}


class Linear:  # stands in for the reference's peft Linear with an SFT delta
    def __init__(self, delta):
        self.active_adapter = "default"
        self.sft_delta = {"default": delta}
        self.hook = None

    def apply_hook(self, hook):
        self.hook = hook


class Model:
    def __init__(self, modules):
        self.modules = modules

    def named_modules(self):
        return iter(self.modules.items())

    def get_submodule(self, name):
        return self.modules[name]


def load_reference(ref_dir):
    pkg = types.ModuleType("spref")
    pkg.__path__ = [str(ref_dir)]
    sys.modules["spref"] = pkg
    layer = types.ModuleType("spref.layer")
    layer.Linear = Linear
    sys.modules["spref.layer"] = layer
    tr = types.ModuleType("transformers")
    tr.TrainerCallback = object
    sys.modules["transformers"] = tr
    acc = types.ModuleType("accelerate")
    acc_opt = types.ModuleType("accelerate.optimizer")
    acc_opt.AcceleratedOptimizer = type("AcceleratedOptimizer", (), {})
    sys.modules["accelerate"] = acc
    sys.modules["accelerate.optimizer"] = acc_opt
    mods = {}
    for name in ("optimizer", "trainer"):
        spec = importlib.util.spec_from_file_location(f"spref.{name}",
                                                      pathlib.Path(ref_dir) / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"spref.{name}"] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["optimizer"], mods["trainer"]


def main(ref_dir):
    optimizer_mod, trainer_mod = load_reference(ref_dir)
    rng = np.random.default_rng(2024)
    out = {}
    modules = {}
    for name, (shape, k) in LEAVES.items():
        n = int(np.prod(shape))
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int32)
        out[f"init_indices/{name}"] = idx
        delta = types.SimpleNamespace(
            values=torch.nn.Parameter(torch.zeros(k)),
            indices=torch.from_numpy(idx.copy()),
            dense_numel=n,
        )
        modules[name] = Linear(delta)
        out[f"grads/{name}"] = rng.standard_normal((STEPS,) + shape).astype(np.float32)
    opt = optimizer_mod.SftAdamW(
        [m.sft_delta["default"].values for m in modules.values()],
        lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.5)
    cfg = types.SimpleNamespace(
        reselection_steps=20, selection_accumulation_steps=5,
        initial_reselection_rate=0.2, reselection_rate_policy="linear",
        selection_algorithm="rigl")
    selector = trainer_mod.SftSelector(Model(modules), opt, cfg, TOTAL, 1)
    selections = []
    for t in range(STEPS):
        for name, m in modules.items():
            delta = m.sft_delta["default"]
            g = torch.from_numpy(out[f"grads/{name}"][t])
            delta.values.grad = g.reshape(-1)[delta.indices.long()].clone()
            if m.hook is not None:
                m.hook(g.clone())
        opt.step()
        selector.step()
        c = selector.completed_steps
        if c % cfg.reselection_steps == cfg.selection_accumulation_steps:
            selections.append(c)
            for name, m in modules.items():
                delta = m.sft_delta["default"]
                st = opt.state[delta.values]
                out[f"c{c}/indices/{name}"] = delta.indices.numpy().copy()
                out[f"c{c}/values/{name}"] = delta.values.detach().numpy().copy()
                for key in ("exp_avg", "exp_avg_sq", "age"):
                    out[f"c{c}/{key}/{name}"] = st[key].numpy().copy()
    out["selections"] = np.asarray(selections, np.int32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} with selections at {selections}")


if __name__ == "__main__":
    main(sys.argv[1])
