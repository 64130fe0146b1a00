# SPDX-License-Identifier: Apache-2.0
"""Which modules Hugging Face PEFT adapts for a ``target_modules`` input.

Runs once in the side virtualenv (torch CPU, transformers, peft); never in
CI, never imports peftjax. It loads the tiny random Llama of the PEFT-format
goldens (``tests/io/golden/peft/llama_base``, untied head), and for each case
below builds ``get_peft_model(model, LoraConfig(r=2, **case))`` on a fresh
copy and records the module names PEFT adapted
(``model.base_model.targeted_module_names``, sorted), or the error PEFT
raised (its class and message). Cases cover lists (suffix and full-name
semantics), regex strings (``re.fullmatch`` on the full name), ``"all-linear"``
(any case), ``layers_to_transform`` / ``layers_pattern``, ``exclude_modules``
(list and regex), ``modules_to_save`` and inputs PEFT rejects.

Output: ``tests/io/golden/peft_targets.json`` =
``{"versions": {...}, "cases": {name: {"config": {...}, "modules": [...]}
| {"config": {...}, "error": {"type": ..., "message": ...}}}}``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_targets.py``
"""

import json
import os
import platform

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BASE = os.path.join(ROOT, "tests", "io", "golden", "peft", "llama_base")
OUT = os.path.join(ROOT, "tests", "io", "golden", "peft_targets.json")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "list_qv": {"target_modules": ["q_proj", "v_proj"]},
    "list_all_projections": {"target_modules": ALL7},
    "all_linear": {"target_modules": "all-linear"},
    "all_linear_upper_case": {"target_modules": "ALL-LINEAR"},
    "regex_qv": {"target_modules": r".*\.(q|v)_proj"},
    "regex_layer1_attention": {
        "target_modules": r"model\.layers\.1\.self_attn\.(q|k|v|o)_proj"},
    "regex_gate_up": {"target_modules": r".*mlp\.(gate|up)_proj"},
    "list_dotted_suffixes": {"target_modules": ["self_attn.q_proj", "mlp.down_proj"]},
    "list_full_name_and_suffix": {
        "target_modules": ["model.layers.0.self_attn.k_proj", "up_proj"]},
    "list_embedding_and_head": {"target_modules": ["embed_tokens", "lm_head"]},
    "layers_to_transform": {"target_modules": ["q_proj", "o_proj"],
                            "layers_to_transform": [1]},
    "layers_to_transform_int_and_pattern": {
        "target_modules": ["q_proj", "down_proj"], "layers_to_transform": 0,
        "layers_pattern": "layers"},
    "layers_to_transform_full_name_bypass": {
        "target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"],
        "layers_to_transform": [1]},
    "exclude_list": {
        "target_modules": "all-linear",
        "exclude_modules": ["down_proj", "model.layers.0.self_attn.q_proj"]},
    "exclude_regex": {"target_modules": ["q_proj", "k_proj"],
                      "exclude_modules": r".*layers\.0\..*"},
    "modules_to_save_excluded": {"target_modules": ["q_proj", "lm_head"],
                                 "modules_to_save": ["lm_head"]},
    "all_linear_modules_to_save": {"target_modules": "all-linear",
                                   "modules_to_save": ["down_proj"]},
    "error_container": {"target_modules": ["mlp"]},
    "error_norm": {"target_modules": ["input_layernorm"]},
    "error_not_found": {"target_modules": ["nonexistent"]},
    "error_regex_must_fullmatch": {"target_modules": "q_proj"},
    "error_all_excluded": {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
}


def main():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    cases = {}
    for name, kw in CASES.items():
        model = LlamaForCausalLM.from_pretrained(BASE).eval()
        try:
            peft_model = get_peft_model(model, LoraConfig(r=2, **kw))
            out = {"modules": sorted(peft_model.base_model.targeted_module_names)}
        except ValueError as e:
            out = {"error": {"type": type(e).__name__, "message": str(e)}}
        cases[name] = {"config": kw, **out}
        print(f"{name:40s} {out}")
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "python": platform.python_version()}
    with open(OUT, "w") as f:
        json.dump({"versions": versions, "cases": cases}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
