# SPDX-License-Identifier: Apache-2.0
"""Loads the peftjax-written adapters in PEFT and checks peftjax's outputs.

Runs once in the side virtualenv (torch CPU, transformers, peft), after
``scripts/golden/peft_from_peftjax.py``; never imports peftjax. For each
adapter in ``tests/io/golden/peft/from_peftjax/`` it loads the committed base
with transformers, applies the adapter with ``PeftModel.from_pretrained`` and
compares the torch logits (Llama) or last hidden states (BERT) with
``peftjax_outputs.npz``; the merged export ``pj_lora_merged`` is loaded by
``AutoModelForCausalLM`` alone. It writes ``verified.json``: per adapter the
max |torch - peftjax|, the bar (1e-4) and, for every tensor it verified,
its dtype, shape and float64 summary statistics (``tensor_stats``: sum, L2
norm, max |x| and a position-weighted sum, so a permuted or transposed tensor
does not pass), so the test suite can tie the verdict to the committed values
with a tolerance (a hash of floating-point bytes would tie it to one CPU's
kernels). It exits non-zero when a difference exceeds the bar.

Usage: ``.venv-torch/bin/python scripts/golden/peft_verify.py``
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                      "tests", "io", "golden", "peft")
BAR = 1e-4


def tensor_stats(path):
    """Per tensor of a safetensors file: dtype, shape and float64 statistics."""
    out = {}
    for k, v in sorted(load_file(path).items()):
        x = np.asarray(v, np.float64).ravel()
        pos = np.arange(1, x.size + 1, dtype=np.float64) / max(x.size, 1)
        out[k] = {"dtype": str(v.dtype), "shape": list(v.shape),
                  "sum": float(x.sum()), "l2": float(np.sqrt(x @ x)),
                  "max_abs": float(np.abs(x).max(initial=0.0)),
                  "weighted_sum": float(x @ pos)}
    return out


def main():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BertModel

    torch.set_num_threads(2)
    ref = np.load(os.path.join(GOLDEN, "peftjax_outputs.npz"))
    inp = np.load(os.path.join(GOLDEN, "torch_outputs.npz"))
    ids = torch.tensor(inp["inputs_llama"])
    bids, mask = torch.tensor(inp["inputs_bert"]), torch.tensor(inp["mask_bert"])
    src = os.path.join(GOLDEN, "from_peftjax")
    report, ok = {}, True
    for name in sorted(os.listdir(src)):
        d = os.path.join(src, name)
        with torch.no_grad():
            if name.endswith("_merged"):
                model = AutoModelForCausalLM.from_pretrained(d).eval()
                out = model(ids).logits.numpy()
                files = os.path.join(d, "model.safetensors")
            elif name == "pj_bert":
                base = BertModel.from_pretrained(os.path.join(GOLDEN, "bert_base"),
                                                 add_pooling_layer=False)
                model = PeftModel.from_pretrained(base, d).eval()
                out = model(input_ids=bids, attention_mask=mask).last_hidden_state.numpy()
                files = os.path.join(d, "adapter_model.safetensors")
            else:
                base = AutoModelForCausalLM.from_pretrained(
                    os.path.join(GOLDEN, "llama_base"))
                model = PeftModel.from_pretrained(base, d).eval()
                out = model(ids).logits.numpy()
                files = os.path.join(d, "adapter_model.safetensors")
        diff = float(np.max(np.abs(out - ref[name])))
        ok &= diff <= BAR
        report[name] = {"max_abs_diff": diff, "bar": BAR, "passed": diff <= BAR,
                        "tensor_stats": tensor_stats(files)}
        print(f"{name:16s} max|torch - peftjax| = {diff:.3e}")
    import peft
    import transformers

    report["_versions"] = {"torch": torch.__version__, "peft": peft.__version__,
                           "transformers": transformers.__version__}
    with open(os.path.join(GOLDEN, "verified.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
