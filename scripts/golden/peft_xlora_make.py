# SPDX-License-Identifier: Apache-2.0
"""PEFT X-LoRA models and torch outputs for peftjax's X-LoRA tests (both ways).

Runs in the side virtualenv, on the committed tiny Llama (``use_cache``
off, as X-LoRA requires). Three LoRA experts (different targets and ranks,
every tensor perturbed by N(0, 0.3²)) are made; two X-LoRA configs over them
(``deep``: a depth-2 classifier, layerwise scalings, top-2, softmax with
temperature, a nonzero ``scaling_pass_value`` and ``global_scaling_weight``;
``flat``: a depth-1 classifier, shared scalings, ``enable_softmax_topk``)
get their classifier perturbed the same way and are saved with
``save_pretrained`` (PEFT stores the classifier and names the experts).
Records the logits and the classifier's scalings; the peftjax-written
directories under ``from_peftjax/`` are loaded with
``PeftModel.from_pretrained`` (experts passed as PEFT asks) and their
output differences recorded in ``peft.json``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_xlora_make.py``
"""

import json
import os

import _peft_golden as G
import numpy as np
import torch

OUT = os.path.join(G.ROOT, "peft_xlora")
EXPERTS = {  # PEFT's X-LoRA needs the expert names "0", "1", ... (its loaded names)
    "0": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "1": dict(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    "2": dict(r=2, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
}
CONFIGS = {
    "deep": dict(xlora_depth=2, xlora_size=8, layerwise_scalings=True, top_k_lora=2,
                 enable_softmax=True, softmax_temperature=0.7, scaling_pass_value=0.4,
                 global_scaling_weight=0.8),
    "flat": dict(xlora_depth=1, layerwise_scalings=False, top_k_lora=2,
                 enable_softmax=False, enable_softmax_topk=True),
}


def base():
    m = G.base("llama")
    m.config.use_cache = False
    return m


def experts(tmp):
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, (name, kw) in enumerate(sorted(EXPERTS.items())):
        torch.manual_seed(i)
        m = get_peft_model(base(), LoraConfig(**kw))
        G.perturb_trainable(m, seed=100 + i)
        paths[name] = os.path.join(tmp, name)  # copied into each X-LoRA directory
        G.save(m, paths[name], "llama")
    return paths


def forward(m):
    ids, _, _ = G.inputs()
    with torch.no_grad():
        return m(input_ids=ids).logits.numpy()


def main():
    from peft import PeftModel, XLoraConfig, get_peft_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    ids, _, _ = G.inputs()
    import tempfile

    paths = experts(tempfile.mkdtemp())
    outputs = {"inputs_llama": ids.numpy(), "llama_base": G.forward("llama", base())}
    counts, reload = {}, {}
    for k, (name, kw) in enumerate(sorted(CONFIGS.items())):
        torch.manual_seed(10 + k)
        model = get_peft_model(base(), XLoraConfig(task_type="CAUSAL_LM", hidden_size=16,
                                                   adapters=paths, **kw)).eval()
        counts[name] = int(model.get_nb_trainable_parameters()[0])
        g = torch.Generator().manual_seed(300 + k)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if "internal_xlora_classifier" in p_name(model, p):
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        model.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
        d = os.path.join(OUT, f"llama_xlora_{name}")
        save(model, d, paths)
        outputs[f"llama_xlora_{name}"] = forward(model)
        # PEFT loads the directory back with the same outputs
        m2 = load(PeftModel, d)
        reload[name] = float(np.abs(forward(m2) - outputs[f"llama_xlora_{name}"]).max())
        outputs[f"llama_xlora_{name}"] = forward(model)
        outputs[f"llama_xlora_{name}_scalings"] = (
            model.base_model.internal_xlora_scalings.numpy())
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **outputs)

    def compare(name, d, want):
        if not name.startswith("pj_"):
            return None
        m = load(PeftModel, d)
        return m, forward(m), want

    entries, ok = G.reverse(OUT, compare)
    G.finish(OUT, {"trainable_params": counts, "peft_reload_max_abs_diff": reload,
                   "_versions": G.versions(), **entries}, ok)


def save(model, d, paths):
    """Writes PEFT's X-LoRA directory layout: ``adapter_config.json`` (XLORA),
    ``adapter_model.safetensors`` (the classifier, PEFT's keys) and one
    subfolder per expert (its LoRA files). Not ``save_pretrained``: in PEFT
    0.21.2 it filters the state dict by the other adapters' names, and X-LoRA's
    experts must be named ``"0"``, ``"1"``, ..., so it drops the classifier's
    ``layers.0``/``layers.1`` and saves whole-model dumps as the experts."""
    import shutil

    from safetensors.torch import save_file

    os.makedirs(d, exist_ok=True)
    cfg = model.peft_config["default"].to_dict()
    cfg["adapters"] = {a: a for a in paths}  # subfolder names, no machine paths
    cfg["peft_type"] = "XLORA"
    for k in ("auto_mapping",):
        cfg[k] = None
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    clf = model.base_model.internal_xlora_classifier.state_dict()
    save_file({f"base_model.internal_xlora_classifier.{k}": v.contiguous()
               for k, v in clf.items()}, os.path.join(d, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    for a, src in paths.items():
        shutil.copytree(src, os.path.join(d, a), dirs_exist_ok=True)


def load(peft_model_cls, d):
    """``PeftModel.from_pretrained`` of an X-LoRA directory. PEFT 0.21.2 reads
    the experts from the config's ``adapters`` paths (the ``adapters=``
    keyword is not applied for a plain transformers model), relative to the
    working directory: load from inside the directory."""
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return peft_model_cls.from_pretrained(base(), ".").eval()
    finally:
        os.chdir(cwd)


def p_name(model, p):
    return next(n for n, q in model.named_parameters() if q is p)


if __name__ == "__main__":
    main()
