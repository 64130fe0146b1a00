# SPDX-License-Identifier: Apache-2.0
"""PEFT trainable-tokens adapters and torch logits for peftjax's tests.

Runs once in the side virtualenv (torch CPU, transformers, peft); never in CI,
never imports peftjax. Two bases, both committed elsewhere:

* the untied tiny Llama ``tests/io/golden/peft/llama_base``, with a
  ``TrainableTokensConfig(token_indices=[3, 7, 60, 11],
  target_modules=["embed_tokens", "lm_head"])``: two independent layers, the
  input table's rows and the head's rows (torch's ``lm_head.weight`` rows);
* the tied tiny Llama ``tests/io/golden/peft/export/llama_tied_base``
  (``tie_word_embeddings=True``, SmolLM2's layout) with the default
  ``target_modules`` (PEFT infers ``model.embed_tokens``) and
  ``token_indices=[5, 0, 63]``: PEFT ties a second layer on ``lm_head`` to
  the embedding's and saves its tensor twice;
* the tiny BERT encoder ``tests/io/golden/peft/bert_base`` (``BertModel``,
  three tables) with the default ``target_modules`` (PEFT infers
  ``embeddings.word_embeddings``) and ``token_indices=[7, 3, 30]``.

Every ``trainable_tokens_delta`` gets ``N(0, 0.5²)`` added (at init the rows
equal the base rows, so an adapter that was never loaded would still pass).
It saves them with ``save_pretrained`` and records, in
``tests/io/golden/peft_trainable_tokens/``:

* ``llama_tt_untied/``, ``llama_tt_tied/``, ``bert_tt/``:
  ``adapter_config.json`` + ``adapter_model.safetensors``;
* ``torch_outputs.npz``: the Llama logits / BERT last hidden states with each
  adapter active (``llama_tt_*``, ``bert_tt``), after ``merge_and_unload``
  (``*_merged``), of each base (``base_*``), and ``inputs_llama``,
  ``inputs_bert``, ``mask_bert``;
* ``peft.json``: PEFT's trainable-parameter count of each config on the
  freshly created model, versions, and (when ``from_peftjax/`` exists, written
  by ``scripts/golden/peft_trainable_tokens_from_peftjax.py``) the max
  |torch - peftjax| logit difference of each peftjax-written adapter loaded
  with ``PeftModel.from_pretrained`` on its base (``*tied*``: the tied one;
  BERT: unpadded positions) and the statistics of each tensor it loaded.

Usage: ``.venv-torch/bin/python scripts/golden/peft_trainable_tokens_make.py``
"""

import json
import os
import platform
import sys

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "tests", "io", "golden")
BASES = {"untied": os.path.join(ROOT, "peft", "llama_base"),
         "tied": os.path.join(ROOT, "peft", "export", "llama_tied_base"),
         "bert": os.path.join(ROOT, "peft", "bert_base")}
NAMES = {"untied": "llama_tt_untied", "tied": "llama_tt_tied", "bert": "bert_tt"}
IDS = [[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]]
BERT_IDS = [[2, 7, 11, 30, 3, 0], [2, 9, 5, 3, 0, 0]]
OUT = os.path.join(ROOT, "peft_trainable_tokens")
BAR = 1e-4
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peft_golden import tensor_stats  # noqa: E402  (the shared per-tensor record)


def base(kind):
    from transformers import BertModel, LlamaForCausalLM

    if kind == "bert":
        return BertModel.from_pretrained(BASES[kind], dtype=torch.float32,
                                         add_pooling_layer=False).eval()
    m = LlamaForCausalLM.from_pretrained(BASES[kind], dtype=torch.float32).eval()
    tied = m.lm_head.weight is m.model.embed_tokens.weight
    assert tied == (kind == "tied"), (kind, tied)
    return m


def config(kind):
    from peft import TrainableTokensConfig

    if kind == "untied":
        return TrainableTokensConfig(token_indices=[3, 7, 60, 11],
                                     target_modules=["embed_tokens", "lm_head"])
    if kind == "bert":
        return TrainableTokensConfig(token_indices=[7, 3, 30])
    return TrainableTokensConfig(token_indices=[5, 0, 63])


def forward(kind, m):
    """Llama logits or BERT last hidden states of the fixed inputs."""
    with torch.no_grad():
        if kind != "bert":
            return m(torch.tensor(IDS)).logits.numpy()
        ids = torch.tensor(BERT_IDS)
        return m(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state.numpy()


def main():
    import peft
    import transformers
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    bert_ids = np.asarray(BERT_IDS)
    outputs = {"inputs_llama": np.asarray(IDS), "inputs_bert": bert_ids,
               "mask_bert": (bert_ids != 0).astype(np.int64)}
    report = {"_versions": {"torch": torch.__version__, "peft": peft.__version__,
                            "transformers": transformers.__version__,
                            "python": platform.python_version()}}
    g = torch.Generator().manual_seed(401)
    for kind in ("untied", "tied", "bert"):
        outputs[f"base_{kind}"] = forward(kind, base(kind))
        model = get_peft_model(base(kind), config(kind)).eval()
        trainable, _ = model.get_nb_trainable_parameters()
        n_perturbed = 0
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "trainable_tokens_delta" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
                    n_perturbed += p.numel()
        assert n_perturbed == trainable, (n_perturbed, trainable)
        model.peft_config["default"].base_model_name_or_path = (
            "tiny-bert" if kind == "bert" else f"tiny-{kind}-llama")
        name = NAMES[kind]
        model.save_pretrained(os.path.join(OUT, name))
        os.remove(os.path.join(OUT, name, "README.md"))
        outputs[name] = forward(kind, model)
        outputs[f"{name}_merged"] = forward(kind, model.merge_and_unload())
        report[name] = {"trainable_params": int(trainable)}
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **outputs)

    src = os.path.join(OUT, "from_peftjax")
    ok = True
    if os.path.isdir(src):
        ref = np.load(os.path.join(src, "peftjax_outputs.npz"))
        for name in sorted(os.listdir(src)):
            d = os.path.join(src, name)
            if not os.path.isdir(d):
                continue
            kind = name.split("_")[2]  # pj_tt_<kind>_...
            m = PeftModel.from_pretrained(base(kind), d).eval()
            got, want = forward(kind, m), ref[name]
            if kind == "bert":
                keep = bert_ids != 0
                got, want = got[keep], want[keep]
            diff = float(np.abs(got - want).max())
            report[name] = {"max_abs_diff": diff, "bar": BAR, "passed": diff <= BAR,
                            "base": kind,
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
