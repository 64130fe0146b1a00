# SPDX-License-Identifier: Apache-2.0
"""PEFT FourierFT adapters and torch logits for peftjax's FourierFT tests.

Runs once in the side virtualenv (torch CPU, transformers, peft); never in CI,
never imports peftjax. From the committed tiny Llama in
``tests/io/golden/peft/llama_base`` it builds a PEFT ``FourierFTConfig``
adapter (an ``n_frequency_pattern``, a non-default ``scaling`` and
``random_loc_seed``), adds ``N(0, 0.3²)`` to every ``fourierft_spectrum``
(so the values are not PEFT's init draw either), saves it with
``save_pretrained`` and records, in ``tests/io/golden/peft_fourierft/``:

* ``llama_fourierft/``: ``adapter_config.json`` + ``adapter_model.safetensors``;
* ``torch_outputs.npz``: ``llama_fourierft`` logits with the adapter active,
  ``llama_fourierft_merged`` after ``merge_and_unload``, ``llama_base``,
  ``inputs_llama``, and ``indices/<module>`` (PEFT's frequency positions, to
  check peftjax's reproduction of ``torch.randperm``);
* ``peft.json``: PEFT's trainable-parameter count of the same config on the
  freshly created model, versions, and (when ``from_peftjax/`` exists, written
  by ``scripts/golden/peft_fourierft_from_peftjax.py``) the max |torch -
  peftjax| logit difference of each peftjax-written adapter loaded with
  ``PeftModel.from_pretrained``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_fourierft_make.py``
"""

import json
import os
import platform

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "tests", "io", "golden")
BASE = os.path.join(ROOT, "peft", "llama_base")
OUT = os.path.join(ROOT, "peft_fourierft")
BAR = 1e-4


def base():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def config():
    from peft import FourierFTConfig

    return FourierFTConfig(n_frequency=24, scaling=20.0, random_loc_seed=11,
                           target_modules=["q_proj", "v_proj", "down_proj"],
                           n_frequency_pattern={"down_proj": 40})


def main():
    import peft
    import transformers
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]])
    outputs = {"inputs_llama": ids.numpy()}
    with torch.no_grad():
        outputs["llama_base"] = base()(ids).logits.numpy()
    torch.manual_seed(0)  # PEFT draws the initial spectra from the global generator
    model = get_peft_model(base(), config()).eval()
    trainable, _ = model.get_nb_trainable_parameters()
    for name, mod in model.named_modules():
        if hasattr(mod, "indices") and "default" in getattr(mod, "indices", {}):
            outputs["indices/" + name.removeprefix("base_model.model.")] = (
                mod.indices["default"].numpy())
    g = torch.Generator().manual_seed(500)
    n_perturbed = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "fourierft_spectrum" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
                n_perturbed += p.numel()
    assert n_perturbed == trainable, (n_perturbed, trainable)
    model.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
    model.save_pretrained(os.path.join(OUT, "llama_fourierft"))
    os.remove(os.path.join(OUT, "llama_fourierft", "README.md"))
    with torch.no_grad():
        outputs["llama_fourierft"] = model(ids).logits.numpy()
        outputs["llama_fourierft_merged"] = model.merge_and_unload()(ids).logits.numpy()
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
                            "peft_type": m.peft_config["default"].peft_type.value}
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
