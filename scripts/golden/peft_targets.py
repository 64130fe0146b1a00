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

For each case that PEFT accepts it also records the selection fields of the
``adapter_config.json`` that ``save_pretrained`` writes (``saved``: what a
reader of the file sees, e.g. ``"all-linear"`` expanded to full names).

``PATTERNS`` records, per adapted module, the rank, ``lora_alpha``, scaling
and dropout rate PEFT gives it under ``rank_pattern`` / ``alpha_pattern`` /
``use_rslora`` / ``lora_dropout``; ``IA3`` records which modules (IA)³ treats
as feed-forward (``feedforward_modules``: a list is matched by plain
``str.endswith``, a string by ``re.fullmatch``).

Output: ``tests/io/golden/peft_targets.json`` =
``{"versions": {...}, "cases": {name: {"config": {...}, "modules": [...],
"saved": {...}} | {"config": {...}, "error": {"type": ..., "message": ...}}},
"patterns": {name: {"config": {...}, "modules": {module: {"r": .., "alpha":
.., "scaling": .., "dropout": ..}}}}, "ia3": {name: {"config": {...},
"feedforward": {module: bool}}}}``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_targets.py``
"""

import json
import os
import platform
import tempfile

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
    "layers_to_transform_empty_list": {"target_modules": ["q_proj"],
                                       "layers_to_transform": []},
    "layers_to_transform_both": {"target_modules": ["k_proj"],
                                 "layers_to_transform": [0, 1]},
    "layers_pattern_list": {"target_modules": ["v_proj", "up_proj"],
                            "layers_to_transform": [1],
                            "layers_pattern": ["blocks", "layers"]},
    "layers_and_exclude_regex": {"target_modules": ["q_proj", "v_proj"],
                                 "layers_to_transform": [0],
                                 "exclude_modules": r".*\.v_proj"},
    "exclude_full_name_list": {"target_modules": ["gate_proj"],
                               "exclude_modules": ["model.layers.1.mlp.gate_proj"]},
    "error_layers_pattern_no_match": {"target_modules": ["q_proj"],
                                      "layers_to_transform": [0],
                                      "layers_pattern": "blocks"},
    "error_layers_to_transform_out_of_range": {"target_modules": ["q_proj"],
                                               "layers_to_transform": [5]},
    "error_layers_to_transform_with_regex": {"target_modules": r".*q_proj",
                                             "layers_to_transform": [0]},
    "error_layers_pattern_with_regex": {"target_modules": r".*q_proj",
                                        "layers_pattern": "layers"},
    "error_layers_pattern_without_layers": {"target_modules": ["q_proj"],
                                            "layers_pattern": "layers"},
    "error_list_items_are_not_regexes": {"target_modules": [".*_proj"]},
    "error_suffix_is_whole_segments": {"target_modules": ["_proj"]},
}
# The fields of a saved adapter_config.json that decide which modules are adapted.
SELECTION = ("target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "modules_to_save")

PATTERNS = {
    "rank_alpha_patterns": {
        "target_modules": ALL7, "r": 2, "lora_alpha": 4,
        "rank_pattern": {"q_proj": 4, r"model\.layers\.1\.mlp\..*": 3},
        "alpha_pattern": {"v_proj": 8, r"layers\.0\.self_attn\.(k|o)_proj": 1}},
    "first_matching_key_wins": {
        "target_modules": ["q_proj", "k_proj", "down_proj"], "r": 2, "lora_alpha": 2,
        "rank_pattern": {r".*_proj": 3, "q_proj": 5},
        "alpha_pattern": {"model.layers.1.self_attn.k_proj": 6, r".*\.k_proj": 7}},
    "pattern_needs_a_dot_boundary": {
        "target_modules": ["q_proj", "up_proj"], "r": 2, "lora_alpha": 2,
        "rank_pattern": {"proj": 5, "p_proj": 6, "layers.0.mlp.up_proj": 4}},
    "rslora_with_patterns_and_dropout": {
        "target_modules": ["o_proj", "gate_proj"], "r": 4, "lora_alpha": 4,
        "use_rslora": True, "rank_pattern": {"gate_proj": 2},
        "alpha_pattern": {"o_proj": 9}, "lora_dropout": 0.1},
}

IA3 = {
    "feedforward_list": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                         "feedforward_modules": ["down_proj"]},
    "feedforward_plain_endswith": {"target_modules": r".*\.(k|down)_proj",
                                   "feedforward_modules": ["n_proj"]},
    "feedforward_regex": {"target_modules": ["up_proj", "down_proj", "q_proj"],
                          "feedforward_modules": r".*layers\.1\.mlp\..*"},
}


def _saved_selection(peft_model):
    """The selection fields of the adapter_config.json PEFT writes."""
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        with open(os.path.join(d, "adapter_config.json")) as f:
            cfg = json.load(f)
    out = {k: cfg.get(k) for k in SELECTION}
    if isinstance(out["target_modules"], list):  # written from a set
        out["target_modules"] = sorted(out["target_modules"])
    return out


def main():
    from peft import IA3Config, LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    cases = {}
    for name, kw in CASES.items():
        model = LlamaForCausalLM.from_pretrained(BASE).eval()
        try:
            peft_model = get_peft_model(model, LoraConfig(r=2, **kw))
            out = {"modules": sorted(peft_model.base_model.targeted_module_names),
                   "saved": _saved_selection(peft_model)}
        except ValueError as e:
            out = {"error": {"type": type(e).__name__, "message": str(e)}}
        cases[name] = {"config": kw, **out}
        print(f"{name:40s} {out}")
    patterns = {}
    for name, kw in PATTERNS.items():
        model = LlamaForCausalLM.from_pretrained(BASE).eval()
        peft_model = get_peft_model(model, LoraConfig(**kw))
        mods = {}
        for mname, m in peft_model.base_model.model.named_modules():
            if isinstance(m, LoraLayer) and "default" in m.r:
                drop = m.lora_dropout["default"]
                mods[mname] = {"r": m.r["default"], "alpha": m.lora_alpha["default"],
                               "scaling": m.scaling["default"],
                               "dropout": float(getattr(drop, "p", 0.0))}
        patterns[name] = {"config": kw, "modules": mods}
        print(f"{name:40s} {mods}")
    ia3 = {}
    for name, kw in IA3.items():
        model = LlamaForCausalLM.from_pretrained(BASE).eval()
        peft_model = get_peft_model(model, IA3Config(**kw))
        ff = {mname: bool(m.is_feedforward)
              for mname, m in peft_model.base_model.model.named_modules()
              if hasattr(m, "is_feedforward")}
        ia3[name] = {"config": kw, "feedforward": ff}
        print(f"{name:40s} {ff}")
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "python": platform.python_version()}
    with open(OUT, "w") as f:
        # Not sort_keys: rank_pattern / alpha_pattern keys are tried in order.
        json.dump({"versions": versions, "cases": cases, "patterns": patterns,
                   "ia3": ia3}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
