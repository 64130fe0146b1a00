"""Golden numbers: the authors' FRUGAL code on a fixed gradient sequence.

Run once in the side environment, never in CI, never importing peftjax. The
authors' code (``fzmushko/FRUGAL`` at commit c7ebe4c) is NOT part of this
repository: obtain it yourself, unpack it outside the repository, and pass the
directory that contains its ``frugal/`` package:

    git clone https://github.com/fzmushko/FRUGAL /tmp/frugal
    git -C /tmp/frugal checkout c7ebe4c
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/optim_frugal_ref.py /tmp/frugal

It writes ``tests/optim/golden/frugal_ref.npz`` (numbers only).

Layout: torch weights ``W: (out, in)``; the Flax kernel is ``K = Wᵀ``. Every
array is stored in torch layout; the JAX test transposes. Per case:
``w0/<case>`` the initial weights ``(out, in)`` (weight decay depends on them),
``grads/<case>`` ``(steps, out, in)``, ``deltas/<case>`` the parameter change
of each step. Block cases hold 8 tensors: arrays get a leading tensor axis.

Families (AdamW inner, PyTorch-style eps 1e-8, lr 1e-2, wd 0.1,
proj_params_lr_scale 0.8, inactive_lr_scale 0.5, update_gap 2, 7 steps):

* ``svd``: ``GaloreAdamW`` (proj_side std, proj_type svd, density 0.5,
  reset_statistics True) on (8, 4), (4, 8), (6, 6), inactive rule sign_sgd and
  sgd. With the reset, the arbitrary SVD sign cannot change the numbers.
* ``columns``: ``CoordAdamW`` (coord_choice columns, density 0.5) on the same
  shapes, reset True and False. The column subsets are drawn by the reference
  (``torch.randperm``); ``CoordinateProjector._get_indices`` is wrapped only to
  record them (``indices/<case>``, one row per re-selection), and the JAX test
  replays them.
* ``blocks``: ``BlockAdamW`` on 8 tensors of shape (3, 5), density 0.25, block
  orders ascending, descending and mirror (``random`` depends on torch's RNG).
"""

import json
import math
import pathlib
import sys

import numpy as np
import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "optim" / "golden" / "frugal_ref.npz"
SHAPES = [(8, 4), (4, 8), (6, 6)]
STEPS = 7
COMMON = dict(lr=1e-2, weight_decay=0.1, eps=1e-8, betas=(0.9, 0.999),
              proj_params_lr_scale=0.8, inactive_lr_scale=0.5, update_gap=2,
              no_deprecation_warning=True)


def run(opt_cls, tensors, grads, **kw):
    params = [torch.nn.Parameter(torch.from_numpy(t.copy())) for t in tensors]
    opt = opt_cls([{"params": params, "is_proj_params": True}], **COMMON, **kw)
    deltas = []
    for k in range(STEPS):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g[k].copy())
        opt.step()
        deltas.append(np.stack([(p.detach() - b).numpy() for p, b in zip(params, before)]))
    return np.stack(deltas, axis=1)  # (tensors, steps, out, in)


def main(ref_dir):
    # torch 2.13 dropped the private helper the reference imports; it was
    # math.sqrt on Python floats (bias corrections), so restore exactly that.
    import torch.optim.optimizer as torch_optimizer

    if not hasattr(torch_optimizer, "_dispatch_sqrt"):
        torch_optimizer._dispatch_sqrt = math.sqrt
    sys.path.insert(0, str(ref_dir))
    import frugal
    from frugal import coordinate_projector

    rng = np.random.default_rng(20241105)
    torch.manual_seed(0)
    arrays = {}

    def data(shape, n=1):
        w0 = rng.standard_normal((n,) + shape).astype(np.float32)
        g = rng.standard_normal((n, STEPS) + shape).astype(np.float32)
        return w0, g

    for shape in SHAPES:
        tag = f"{shape[0]}x{shape[1]}"
        for rule in ("sign_sgd", "sgd"):
            w0, g = data(shape)
            d = run(frugal.GaloreAdamW, w0, g, density=0.5, proj_side="std",
                    proj_type="svd", reset_statistics=True, inactive_update_rule=rule)
            case = f"svd_{tag}_{rule}"
            arrays.update({f"w0/{case}": w0[0], f"grads/{case}": g[0],
                           f"deltas/{case}": d[0]})
        for reset in (True, False):
            w0, g = data(shape)
            recorded = []
            original = coordinate_projector.CoordinateProjector._get_indices

            def recording(self, total_length, device, _orig=original, _rec=recorded):
                idx = _orig(self, total_length, device)
                _rec.append(idx.numpy().copy())
                return idx

            coordinate_projector.CoordinateProjector._get_indices = recording
            try:
                d = run(frugal.CoordAdamW, w0, g, density=0.5, coord_choice="columns",
                        reset_statistics=reset, inactive_update_rule="sign_sgd")
            finally:
                coordinate_projector.CoordinateProjector._get_indices = original
            case = f"columns_{tag}_reset{int(reset)}"
            arrays.update({f"w0/{case}": w0[0], f"grads/{case}": g[0],
                           f"deltas/{case}": d[0],
                           f"indices/{case}": np.stack(recorded).astype(np.int32)})
    for order in ("ascending", "descending", "mirror"):
        w0, g = data((3, 5), n=8)
        d = run(frugal.BlockAdamW, list(w0), list(g), density=0.25, block_order=order,
                inactive_update_rule="sign_sgd")
        case = f"blocks_{order}"
        arrays.update({f"w0/{case}": w0, f"grads/{case}": g, f"deltas/{case}": d})
    arrays["config"] = np.array(json.dumps(COMMON))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
