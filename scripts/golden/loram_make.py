"""Golden numbers: the LoRAM authors' factor recovery on a tiny pruned checkpoint.

Run once in the side environment, never in CI, never importing peftjax. The
authors' code (``junzhang-zj/LoRAM`` at commit ce64e68) is NOT part of this
repository: obtain it yourself, unpack it outside the repository, and pass the
directory that holds ``3_recovered_low_rank_matrix_generation.py``:

    git clone https://github.com/junzhang-zj/LoRAM /tmp/loram
    git -C /tmp/loram checkout ce64e68
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
        .venv-torch/bin/python scripts/golden/loram_make.py /tmp/loram/loram

It writes a pruned LoRA checkpoint for two layers into a temporary directory
(the authors' file layout: ``checkpoint-10/adapter_model.safetensors`` and
``{'pruned_idx': ...}`` index files), runs the authors' ``main`` (``zeroA``
recovery of the attention and MLP factors), and stores
``tests/adapters/golden/loram/recover.npz`` (numbers only): for each layer
``l`` and module ``m``, ``l{l}/{m}/pruned`` (the trained factor on the pruned
model, torch layout), ``l{l}/{m}/recovered`` (the authors' output) and the
removed indices ``l{l}/mlp_removed``, ``l{l}/kv_removed``.

Shapes: the authors' script fixes head_dim 128, 64 query heads and 8 KV
heads (LLaMA-3.1-70B); the tiny MLP has 48 neurons. Layer 0 keeps KV head 3
and removes 30 neurons, layer 1 keeps KV heads 1 and 4 and removes 40
neurons; rank 2.
"""

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "adapters" / "golden" / "loram" / "recover.npz"
HEAD_DIM, HEADS, KV_HEADS, NEURONS, RANK = 128, 64, 8, 48, 2
REMOVED_KV = {0: [0, 1, 2, 4, 5, 6, 7], 1: [0, 2, 3, 5, 6, 7]}
N_REMOVED_MLP = {0: 30, 1: 40}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("authors_dir")
    args = ap.parse_args()
    script = pathlib.Path(args.authors_dir) / "3_recovered_low_rank_matrix_generation.py"
    spec = importlib.util.spec_from_file_location("loram_recover", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    gen = torch.Generator().manual_seed(0)
    group = HEADS // KV_HEADS
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        ckpt = tmp / "model" / "checkpoint-10"
        ckpt.mkdir(parents=True)
        (tmp / "mlp").mkdir()
        (tmp / "attn").mkdir()
        adapter = {}
        for layer in (0, 1):
            removed_mlp = torch.sort(torch.randperm(NEURONS, generator=gen)[
                :N_REMOVED_MLP[layer]]).values
            removed_kv = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                                    for h in REMOVED_KV[layer]])
            torch.save({"pruned_idx": removed_mlp},
                       tmp / "mlp" / f"model.layers.{layer}.mlp.gate_proj.pt")
            torch.save({"pruned_idx": removed_kv},
                       tmp / "attn" / f"model.layers.{layer}.self_attn.k_proj.pt")
            kept_mlp = NEURONS - len(removed_mlp)
            kept_kv = (KV_HEADS - len(REMOVED_KV[layer])) * HEAD_DIM
            shapes = {
                "mlp.down_proj.lora_A": (RANK, kept_mlp),
                "mlp.gate_proj.lora_B": (kept_mlp, RANK),
                "mlp.up_proj.lora_B": (kept_mlp, RANK),
                "self_attn.o_proj.lora_A": (RANK, kept_kv * group),
                "self_attn.q_proj.lora_B": (kept_kv * group, RANK),
                "self_attn.k_proj.lora_B": (kept_kv, RANK),
                "self_attn.v_proj.lora_B": (kept_kv, RANK),
            }
            for name, shape in shapes.items():
                t = torch.randn(shape, generator=gen)
                adapter[f"base_model.model.model.layers.{layer}.{name}.weight"] = t
                out[f"l{layer}/{name}/pruned"] = t.numpy()
            out[f"l{layer}/mlp_removed"] = removed_mlp.numpy().astype(np.int32)
            out[f"l{layer}/kv_removed"] = removed_kv.numpy().astype(np.int32)
        save_file(adapter, ckpt / "adapter_model.safetensors")
        (ckpt / "adapter_config.json").write_text(json.dumps({"r": RANK}))
        ns = argparse.Namespace(
            peft_model_path=str(tmp / "model"), lora_recover_type="zeroA",
            ckpt_interval=[10, 11, 1], pruned_layer_interval=[0, 2],
            pruned_ratio_mlp="x", pruned_ratio_attn="x",
            pruned_path_mlp=str(tmp / "mlp"), pruned_path_attn=str(tmp / "attn"),
            recovered_lora_attn=True, recovered_lora_mlp=True,
            torch_version=int(torch.__version__.split(".")[1]))
        mod.main(ns)
        rec = load_file(ckpt / "recover_lora_mlp_attn_zeroA" / "adapter_model.safetensors")
        for layer in (0, 1):
            for name in shapes:
                out[f"l{layer}/{name}/recovered"] = rec[
                    f"base_model.model.model.layers.{layer}.{name}.weight"].numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes); torch {torch.__version__}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
