# SPDX-License-Identifier: Apache-2.0
"""PEFT LoKr adapters, their torch logits, and PEFT's verdict on peftjax's LoKr files.

Runs once in the side virtualenv (torch CPU, transformers, peft); never in CI,
never imports peftjax. On the committed tiny Llama (``tests/io/golden/peft/
llama_base``) it creates two PEFT ``LoKrConfig`` adapters that between them
build every linear structure PEFT's LoKr has (full ``lokr_w1``/``lokr_w2``,
decomposed ``lokr_w1_a @ lokr_w1_b`` and ``lokr_w2_a @ lokr_w2_b``):

* ``llama_lokr``: ``r=4, alpha=8, decompose_both=True`` on q/v/down, with
  ``rank_pattern={"down_proj": 1}`` and ``alpha_pattern={"v_proj": 6}``;
* ``llama_lokr_factor``: ``r=2, alpha=3, decompose_factor=2`` on q/gate.

Every ``lokr_*`` tensor gets ``N(0, 0.2²)`` added (PEFT's init zeroes
``lokr_w1``: unperturbed, the adapter would be the identity and hide a wrong
transpose or Kronecker order). Written to ``tests/io/golden/peft_lokr/``:

* ``<name>/``: ``adapter_config.json`` + ``adapter_model.safetensors``;
* ``torch_outputs.npz``: ``<name>`` logits with the adapter active,
  ``<name>_merged`` after ``merge_and_unload``, ``inputs_llama``;
* ``peft.json``: per adapter PEFT's trainable count on the fresh model, the
  versions, and (when ``from_peftjax/`` exists, written by
  ``scripts/golden/peft_lokr_from_peftjax.py``) each peftjax-written adapter loaded with
  ``PeftModel.from_pretrained``: the max |torch - peftjax| logit difference,
  its LoKr parameter count and statistics of the tensors torch read.

Usage: ``.venv-torch/bin/python scripts/golden/peft_lokr_make.py``
"""

import json
import os
import platform

import numpy as np
import torch

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                      "tests", "io", "golden")
OUT = os.path.join(GOLDEN, "peft_lokr")
BAR = 1e-4


def llama():
    from transformers import LlamaForCausalLM

    path = os.path.join(GOLDEN, "peft", "llama_base")
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def configs():
    from peft import LoKrConfig

    return {
        "llama_lokr": LoKrConfig(
            r=4, alpha=8, decompose_both=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 1}, alpha_pattern={"v_proj": 6}),
        "llama_lokr_factor": LoKrConfig(
            r=2, alpha=3, decompose_factor=2, target_modules=["q_proj", "gate_proj"]),
    }


def stats(x):
    """float64 sum, L2, max |x| and position-weighted sum (as tests.helpers.tensor_stats)."""
    v = x.astype(np.float64).ravel()
    pos = np.arange(1, v.size + 1, dtype=np.float64) / max(v.size, 1)
    return {"dtype": str(x.dtype), "shape": list(x.shape), "sum": float(v.sum()),
            "l2": float(np.sqrt(v @ v)), "max_abs": float(np.abs(v).max(initial=0.0)),
            "weighted_sum": float(v @ pos)}


def verify(ids, report):
    """Loads each peftjax-written adapter in PEFT; returns False if one misses BAR."""
    from peft import PeftModel
    from safetensors.torch import load_file

    src = os.path.join(OUT, "from_peftjax")
    if not os.path.isdir(src):
        return True
    want = np.load(os.path.join(src, "peftjax_outputs.npz"))
    ok = True
    for name in sorted(os.listdir(src)):
        if not os.path.isdir(os.path.join(src, name)):
            continue
        model = PeftModel.from_pretrained(llama(), os.path.join(src, name)).eval()
        with torch.no_grad():
            got = model(ids).logits.numpy()
        diff = float(np.abs(got - want[name]).max())
        report["from_peftjax"][name] = {
            "max_abs_diff": diff, "bar": BAR, "passed": diff <= BAR,
            "peft_type": model.peft_config["default"].peft_type.value,
            "lokr_params": int(sum(p.numel() for n, p in model.named_parameters()
                                   if ".lokr_" in n)),
            "tensor_stats": {k: stats(v.numpy()) for k, v in sorted(load_file(
                os.path.join(src, name, "adapter_model.safetensors")).items())}}
        ok = ok and diff <= BAR
    return ok


def main():
    import peft
    import transformers
    from peft import get_peft_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    ids = torch.tensor([[3, 8, 1, 60, 22, 5, 9, 41], [7, 0, 13, 2, 55, 31, 6, 18]])
    logits = {"inputs_llama": ids.numpy()}
    report = {"trainable_params": {}, "from_peftjax": {},
              "_versions": {"torch": torch.__version__, "peft": peft.__version__,
                            "transformers": transformers.__version__,
                            "python": platform.python_version()}}
    gen = torch.Generator().manual_seed(19)
    for name, cfg in configs().items():
        torch.manual_seed(0)  # PEFT's kaiming init draws from the global generator
        model = get_peft_model(llama(), cfg).eval()
        report["trainable_params"][name] = int(model.get_nb_trainable_parameters()[0])
        with torch.no_grad():
            for pname, p in sorted(model.named_parameters()):
                if ".lokr_" in pname:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
        model.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
        model.save_pretrained(os.path.join(OUT, name))
        readme = os.path.join(OUT, name, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        with torch.no_grad():
            logits[name] = model(ids).logits.numpy()
            logits[name + "_merged"] = model.merge_and_unload()(ids).logits.numpy()
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **logits)
    ok = verify(ids, report)
    with open(os.path.join(OUT, "peft.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(report, indent=1))
    if not ok:
        raise SystemExit("a peftjax-written LoKr adapter misses the bar")


if __name__ == "__main__":
    main()
