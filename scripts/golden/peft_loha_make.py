# SPDX-License-Identifier: Apache-2.0
"""PEFT LoHa adapters and torch logits for peftjax's LoHa tests (both ways).

Runs once in the side virtualenv (torch CPU, transformers, peft); never in CI,
never imports peftjax. From the committed tiny Llama in
``tests/io/golden/peft/llama_base`` it builds a PEFT ``LoHaConfig`` adapter
(rank and alpha patterns), adds ``N(0, 0.3²)`` to every ``hada_*`` tensor (so
``hada_w2_b`` is no longer zero and a wrong transpose, pairing or scaling
cannot hide behind the identity), saves it with ``save_pretrained`` and
records, in ``tests/io/golden/peft_loha/``:

* ``llama_loha/``: ``adapter_config.json`` + ``adapter_model.safetensors``;
* ``torch_outputs.npz``: ``llama_loha`` logits with the adapter active,
  ``llama_loha_merged`` after ``merge_and_unload``, ``inputs_llama``;
* ``peft.json``: PEFT's trainable-parameter count of the same config on the
  freshly created model, versions, and (when ``from_peftjax/`` exists, written
  by ``scripts/golden/peft_loha_from_peftjax.py``) the max |torch -
  peftjax| logit difference of each peftjax-written adapter loaded with
  ``PeftModel.from_pretrained``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_loha_make.py``
"""

import json
import os
import platform

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "tests", "io", "golden")
BASE = os.path.join(ROOT, "peft", "llama_base")
OUT = os.path.join(ROOT, "peft_loha")
BAR = 1e-4


def tensor_stats(path):
    """Per tensor of a safetensors file: dtype, shape and float64 statistics."""
    from safetensors.numpy import load_file

    out = {}
    for k, v in sorted(load_file(path).items()):
        x = np.asarray(v, np.float64).ravel()
        pos = np.arange(1, x.size + 1, dtype=np.float64) / max(x.size, 1)
        out[k] = {"dtype": str(v.dtype), "shape": list(v.shape),
                  "sum": float(x.sum()), "l2": float(np.sqrt(x @ x)),
                  "max_abs": float(np.abs(x).max(initial=0.0)),
                  "weighted_sum": float(x @ pos)}
    return out


def base():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def config():
    from peft import LoHaConfig

    return LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 6})


def main():
    import peft
    import transformers
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]])
    outputs = {"inputs_llama": ids.numpy()}
    torch.manual_seed(0)  # PEFT's kaiming-uniform init draws from the global generator
    model = get_peft_model(base(), config()).eval()
    trainable, _ = model.get_nb_trainable_parameters()
    g = torch.Generator().manual_seed(300)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "hada_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
    model.save_pretrained(os.path.join(OUT, "llama_loha"))
    os.remove(os.path.join(OUT, "llama_loha", "README.md"))
    with torch.no_grad():
        outputs["llama_loha"] = model(ids).logits.numpy()
        outputs["llama_loha_merged"] = model.merge_and_unload()(ids).logits.numpy()
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **outputs)

    report = {"trainable_params": int(trainable),
              "_versions": {"torch": torch.__version__, "peft": peft.__version__,
                            "transformers": transformers.__version__,
                            "python": platform.python_version()}}
    src = os.path.join(OUT, "from_peftjax")
    ok = True
    if os.path.isdir(src):
        ref = np.load(os.path.join(src, "peftjax_outputs.npz"))
        for name in sorted(os.listdir(src)):
            d = os.path.join(src, name)
            if not os.path.isdir(d):
                continue
            m = PeftModel.from_pretrained(base(), d).eval()
            with torch.no_grad():
                got = m(ids).logits.numpy()
            diff = float(np.abs(got - ref[name]).max())
            report[name] = {"max_abs_diff": diff, "bar": BAR, "passed": diff <= BAR,
                            "peft_type": m.peft_config["default"].peft_type.value,
                            "tensor_stats": tensor_stats(
                                os.path.join(d, "adapter_model.safetensors"))}
            ok &= diff <= BAR
            print(f"{name}: max |torch - peftjax| = {diff:.3g}")
    with open(os.path.join(OUT, "peft.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(report, indent=1))
    if not ok:
        raise SystemExit("a peftjax-written adapter misses the bar")


if __name__ == "__main__":
    main()
