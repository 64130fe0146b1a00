# SPDX-License-Identifier: Apache-2.0
"""PEFT adaption prompts (LLaMA-Adapter), logits and greedy generations.

Runs in the side virtualenv. An ``AdaptionPromptConfig(adapter_len=3,
adapter_layers=1)`` on the 2-layer tiny Llama (only the top layer is
adapted); every ``adaption_prompt`` and ``adaption_gate`` perturbed by
N(0, 0.3²), so the zero-initialised gate is non-zero. Records in
``tests/io/golden/peft_adaption_prompt/``: ``llama_adaption_prompt/``
(PEFT's files), ``torch_outputs.npz`` (``inputs``, ``llama_adaption_prompt``
logits, ``llama_base``, ``generated``: PEFT's greedy ``generate`` with its
KV cache) and ``peft.json`` (trainable count; for
``from_peftjax/pj_llama_adaption_prompt`` written by
``peft_adaption_prompt_from_peftjax.py``, the max |torch - peftjax| logits
difference). PEFT supports Llama, Mistral and GPT-2 only: no BERT file.

Usage: ``.venv-torch/bin/python scripts/golden/peft_adaption_prompt_make.py``
"""

import json
import os
import platform

import _peft_golden
import numpy as np
import torch

IDS = _peft_golden.LLAMA_IDS
NEW_TOKENS = 5


def config():
    from peft import AdaptionPromptConfig

    return AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")


def main():
    import peft
    import transformers
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    out = os.path.join(_peft_golden.ROOT, "peft_adaption_prompt")
    os.makedirs(out, exist_ok=True)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        outputs = {"inputs": ids.numpy(),
                   "llama_base": _peft_golden.base("llama")(ids).logits.numpy()}
    torch.manual_seed(0)
    model = get_peft_model(_peft_golden.base("llama"), config()).eval()
    count = int(model.get_nb_trainable_parameters()[0])
    g = torch.Generator().manual_seed(300)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.peft_config["default"].base_model_name_or_path = "tiny-random-llama"
    d = os.path.join(out, "llama_adaption_prompt")
    model.save_pretrained(d)
    if os.path.exists(os.path.join(d, "README.md")):
        os.remove(os.path.join(d, "README.md"))
    with torch.no_grad():
        outputs["llama_adaption_prompt"] = model(input_ids=ids).logits.numpy()
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    outputs["generated"] = gen[:, ids.shape[1]:].numpy()
    np.savez_compressed(os.path.join(out, "torch_outputs.npz"), **outputs)
    report = {"trainable_params": {"llama": count},
              "_versions": {"torch": torch.__version__, "peft": peft.__version__,
                            "transformers": transformers.__version__,
                            "python": platform.python_version()}}
    src = os.path.join(out, "from_peftjax")
    ok = True
    if os.path.isdir(src):
        ref = np.load(os.path.join(src, "peftjax_outputs.npz"))
        for name in sorted(os.listdir(src)):
            p = os.path.join(src, name)
            if not os.path.isdir(p):
                continue
            m = PeftModel.from_pretrained(_peft_golden.base("llama"), p).eval()
            with torch.no_grad():
                got = m(input_ids=ids).logits.numpy()
            diff = float(np.abs(got - ref[name]).max())
            report[name] = {"max_abs_diff": diff, "bar": _peft_golden.BAR,
                            "passed": diff <= _peft_golden.BAR,
                            "peft_type": m.peft_config["default"].peft_type.value,
                            "tensor_stats": _peft_golden.tensor_stats(
                                os.path.join(p, "adapter_model.safetensors"))}
            ok &= diff <= _peft_golden.BAR
            print(f"{name}: max |torch - peftjax| = {diff:.3g}")
    with open(os.path.join(out, "peft.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps({k: v for k, v in report.items() if k != "_versions"}, indent=1)[:3000])
    print("generated", outputs["generated"].tolist())
    if not ok:
        raise SystemExit("a peftjax-written adapter misses the bar")


if __name__ == "__main__":
    main()
