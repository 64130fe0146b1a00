# SPDX-License-Identifier: Apache-2.0
"""Loads peftjax's exports in transformers / PEFT and records the torch outputs.

Runs once in the side virtualenv (torch CPU, transformers, peft), after
``scripts/golden/peft_export_make.py``; never imports peftjax. For every
directory in ``tests/io/golden/peft/export/``:

* ``bert_merged`` / ``roberta_merged``: ``AutoModel.from_pretrained(d,
  add_pooling_layer=False)`` (a ``BertModel`` / ``RobertaModel`` by the
  exported config) -> last hidden states on the committed BERT inputs;
* ``llama_tied_base``: ``AutoModelForCausalLM`` (its head must be tied to
  the table) -> logits;
* ``pj_tied_embed`` / ``pj_tied_full``: ``PeftModel.from_pretrained`` on the
  tied base; ``pj_pissa`` / ``pj_olora`` / ``pj_lora_ga`` / ``pj_corda``: on
  the untied ``llama_base`` (the unmodified base) -> logits.

It also creates two PEFT adapters for the read direction, with their logits:
``peft_tied_embed`` (LoRA on ``embed_tokens`` and ``q_proj`` of the tied base
with ``ensure_weight_tying=True`` and non-zero B) and
``peft_pissa_converted`` (PiSSA on the untied base, "trained" by a seeded
perturbation, saved with ``path_initial_model_for_weight_conversion``: a
rank-2r LoRA over the original base; the logits are the trained model's over
its residual base).

Writes ``torch_outputs.npz`` (every output above) and ``verified.json``
(per export: max |torch - peftjax| against ``peftjax_outputs.npz``, the bar
1e-4, and for every tensor torch loaded its dtype, shape and float64 summary
statistics, ``tensor_stats``: sum, L2 norm, max |x| and a position-weighted
sum, so the test suite can tie the committed values to this run with a
tolerance instead of a hash of one CPU's floating-point bytes). Exits non-zero
when a difference exceeds the bar or the tied head is not tied.

Usage: ``.venv-torch/bin/python scripts/golden/peft_export_verify.py``
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
PEFT_DIR = os.path.join(HERE, "..", "..", "tests", "io", "golden", "peft")
EXPORT = os.path.join(PEFT_DIR, "export")
BAR = 1e-4
INITS = ("pj_pissa", "pj_olora", "pj_lora_ga", "pj_corda")


def tensor_stats(path):
    """Per tensor of a safetensors file: dtype, shape and float64 statistics."""
    out = {}
    for k, v in sorted(load_file(path).items()):
        x = np.asarray(v, np.float64).ravel()
        pos = np.arange(1, x.size + 1, dtype=np.float64) / max(x.size, 1)
        out[k] = {
            "dtype": str(v.dtype),
            "shape": list(v.shape),
            "sum": float(x.sum()),
            "l2": float(np.sqrt(x @ x)),
            "max_abs": float(np.abs(x).max(initial=0.0)),
            "weighted_sum": float(x @ pos),
        }
    return out


def main():
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    torch.set_num_threads(2)
    inp = np.load(os.path.join(PEFT_DIR, "torch_outputs.npz"))
    ref = np.load(os.path.join(EXPORT, "peftjax_outputs.npz"))
    ids = torch.tensor(inp["inputs_llama"])
    bids, mask = torch.tensor(inp["inputs_bert"]), torch.tensor(inp["mask_bert"])
    tied_dir = os.path.join(EXPORT, "llama_tied_base")

    def causal(path):
        return AutoModelForCausalLM.from_pretrained(path).eval()

    outputs, report, ok = {}, {}, True
    with torch.no_grad():
        for name in ("bert_merged", "roberta_merged"):
            d = os.path.join(EXPORT, name)
            model = AutoModel.from_pretrained(d, add_pooling_layer=False).eval()
            print(f"{name}: {type(model).__name__}")
            outputs[name] = model(
                input_ids=bids, attention_mask=mask
            ).last_hidden_state.numpy()
            report[name] = {
                "class": type(model).__name__,
                "tensor_stats": tensor_stats(os.path.join(d, "model.safetensors")),
            }
        base = causal(tied_dir)
        tied = (
            base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
        )
        ok &= tied
        outputs["llama_tied_base"] = base(ids).logits.numpy()
        report["llama_tied_base"] = {
            "tied": tied,
            "tensor_stats": tensor_stats(os.path.join(tied_dir, "model.safetensors")),
        }
        for name in ("pj_tied_embed", "pj_tied_full", *INITS):
            d = os.path.join(EXPORT, name)
            base = causal(
                tied_dir if "tied" in name else os.path.join(PEFT_DIR, "llama_base")
            )
            model = PeftModel.from_pretrained(base, d).eval()
            outputs[name] = model(ids).logits.numpy()
            report[name] = {
                "tensor_stats": tensor_stats(
                    os.path.join(d, "adapter_model.safetensors")
                )
            }

        # the read direction: a PEFT-made adapter on the tied table
        torch.manual_seed(300)  # init_lora_weights=False draws from torch's RNG
        model = get_peft_model(
            causal(tied_dir),
            LoraConfig(
                r=2,
                lora_alpha=4,
                target_modules=["embed_tokens", "q_proj"],
                ensure_weight_tying=True,
                init_lora_weights=False,
            ),
        ).eval()
        g = torch.Generator().manual_seed(300)
        for pname, p in model.named_parameters():
            if "lora_" in pname and "lm_head" not in pname:  # the head shares them
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        d = os.path.join(EXPORT, "peft_tied_embed")
        # A neutral name, not this machine's path to the base directory.
        model.peft_config["default"].base_model_name_or_path = "tiny-tied-llama"
        model.save_pretrained(d, save_embedding_layers=False)
        os.remove(os.path.join(d, "README.md"))  # PEFT's model-card template
        outputs["peft_tied_embed"] = model(ids).logits.numpy()

        model = get_peft_model(
            causal(os.path.join(PEFT_DIR, "llama_base")),
            LoraConfig(
                r=2,
                lora_alpha=4,
                target_modules=["q_proj", "v_proj"],
                init_lora_weights="pissa",
            ),
        ).eval()
        with tempfile.TemporaryDirectory() as tmp:
            initial = os.path.join(tmp, "initial")
            model.peft_config["default"].init_lora_weights = True  # PEFT's recipe
            model.save_pretrained(initial)
            model.peft_config["default"].init_lora_weights = "pissa"
            g = torch.Generator().manual_seed(301)
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            outputs["peft_pissa_converted"] = model(ids).logits.numpy()
            d = os.path.join(EXPORT, "peft_pissa_converted")
            model.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
            model.save_pretrained(d, path_initial_model_for_weight_conversion=initial)
            os.remove(os.path.join(d, "README.md"))

    for name, entry in sorted(report.items()):
        diff = float(np.max(np.abs(outputs[name] - ref[name])))
        entry.update(max_abs_diff=diff, bar=BAR)
        ok &= diff <= BAR
        print(f"{name:16s} max|torch - peftjax| = {diff:.3e}")
    import peft
    import transformers

    report["_versions"] = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
    }
    np.savez_compressed(os.path.join(EXPORT, "torch_outputs.npz"), **outputs)
    with open(os.path.join(EXPORT, "verified.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
