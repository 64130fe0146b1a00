# SPDX-License-Identifier: Apache-2.0
"""PEFT Arrow (+ GenKnowSub) models and torch outputs for peftjax's Arrow tests.

Runs in the side virtualenv, on the committed tiny Llama. Three task LoRAs
and two general LoRAs (same rank and targets, as Arrow requires; every
tensor perturbed by N(0, 0.3²)) are saved under
``tests/io/golden/peft_arrow/{task,general}_<i>/``; ``create_arrow_model``
builds two routers over them: ``arrow`` (top-2, temperature 0.5) and ``gks``
(top-2, GenKnowSub over the general LoRAs). Records the logits and each
routed module's prototypes (PEFT's power iteration) in
``torch_outputs.npz`` (Arrow has no file of its own: PEFT composes it
from the LoRA directories at load time).

Usage: ``.venv-torch/bin/python scripts/golden/peft_arrow_make.py``
"""

import json
import os
import platform

import _peft_golden as G
import numpy as np
import torch

OUT = os.path.join(G.ROOT, "peft_arrow")
TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {"arrow": dict(top_k=2, router_temperature=0.5, use_gks=False, rng_seed=0),
           "gks": dict(top_k=2, router_temperature=1.0, use_gks=True, rng_seed=0)}


def loras():
    from peft import LoraConfig, get_peft_model

    paths = {"task": [], "general": []}
    for kind, n, seed in (("task", 3, 100), ("general", 2, 200)):
        for i in range(n):
            torch.manual_seed(seed + i)
            m = get_peft_model(G.base("llama"), LoraConfig(
                r=2, lora_alpha=4 + 2 * i, target_modules=TARGETS))
            g = torch.Generator().manual_seed(seed + i)
            with torch.no_grad():
                for _, p in sorted(m.named_parameters()):
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.3)
            m.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
            d = os.path.join(OUT, f"{kind}_{i}")
            m.save_pretrained(d)
            if os.path.exists(os.path.join(d, "README.md")):
                os.remove(os.path.join(d, "README.md"))
            paths[kind].append(d)
    return paths


def main():
    import peft
    import transformers
    from peft import ArrowConfig, create_arrow_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    ids, _, _ = G.inputs()
    paths = loras()
    outputs = {"inputs_llama": ids.numpy(), "llama_base": G.forward("llama", G.base("llama"))}
    for name, kw in sorted(CONFIGS.items()):
        m = create_arrow_model(G.base("llama"), paths["task"], ArrowConfig(**kw),
                               general_adapter_paths=paths["general"] if kw["use_gks"]
                               else None).eval()
        outputs[f"llama_{name}"] = G.forward("llama", m)
        for mod_name, mod in m.named_modules():
            if hasattr(mod, "lora_arrow"):
                key = mod_name.split("model.model.", 1)[1].replace(".", "/")
                outputs[f"llama_{name}_protos/{key}"] = (
                    mod.lora_arrow["arrow_router"].prototypes.numpy())
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **outputs)
    report = {"configs": CONFIGS,
              "_versions": {"torch": torch.__version__, "peft": peft.__version__,
                            "transformers": transformers.__version__,
                            "python": platform.python_version()}}
    with open(os.path.join(OUT, "peft.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(sorted(outputs))


if __name__ == "__main__":
    main()
