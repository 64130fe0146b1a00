# SPDX-License-Identifier: Apache-2.0
"""PEFT-created adapters and torch logits for peftjax's PEFT-format tests.

Runs once in the side virtualenv (torch CPU, transformers, peft); never in CI,
never imports peftjax. It builds a tiny random Llama (untied head) and a tiny
random BERT, saves them as HF safetensors directories, creates PEFT adapters
with non-zero B (``init_lora_weights=False`` plus a perturbation of every
adapter tensor, so a wrong transpose or scaling cannot hide behind B = 0),
saves them with ``save_pretrained`` and records the torch outputs on fixed
inputs. Everything lands in ``tests/io/golden/peft/``:

* ``llama_base/``, ``bert_base/``: ``config.json`` + ``model.safetensors``;
* ``<name>/adapter_config.json`` + ``adapter_model.safetensors`` for
  ``llama_lora`` (rank/alpha patterns, ``modules_to_save=["lm_head"]``),
  ``llama_dora_rslora``, ``llama_embed`` (embedding LoRA),
  ``llama_ia3``, ``llama_vera`` (``save_projection=True``), ``bert_lora``;
* ``torch_outputs.npz``: ``<name>`` = logits (Llama) or last hidden states
  (BERT) with the adapter active, ``<name>_merged`` after
  ``merge_and_unload``, ``inputs_llama``, ``inputs_bert``, ``mask_bert``;
* ``torch_versions.json``.

Usage: ``.venv-torch/bin/python scripts/golden/peft_make.py``
"""

import json
import os
import platform

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                   "tests", "io", "golden", "peft")


def llama_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def bert_base():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=24,
                     max_position_embeddings=32, type_vocab_size=2)
    torch.manual_seed(1)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def perturb(model, seed):
    """Non-zero, random values in every adapter tensor (incl. modules_to_save)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "ia3_l", "vera_lambda", "modules_to_save")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def main():
    from peft import IA3Config, LoraConfig, VeraConfig, get_peft_model

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    outputs = {}
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]])
    bert_ids = torch.tensor([[2, 7, 11, 30, 3, 0], [2, 9, 5, 3, 0, 0]])
    bert_mask = (bert_ids != 0).long()
    outputs.update(inputs_llama=ids.numpy(), inputs_bert=bert_ids.numpy(),
                   mask_bert=bert_mask.numpy())
    llama_base().save_pretrained(os.path.join(OUT, "llama_base"))
    bert_base().save_pretrained(os.path.join(OUT, "bert_base"))
    outputs["llama_base"] = llama_base()(ids).logits.detach().numpy()

    llama = {
        "llama_lora": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16},
            modules_to_save=["lm_head"], init_lora_weights=False),
        "llama_dora_rslora": LoraConfig(
            r=4, lora_alpha=6, use_rslora=True, use_dora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
            init_lora_weights=False),
        "llama_embed": LoraConfig(
            r=2, lora_alpha=4, target_modules=["embed_tokens", "gate_proj"],
            init_lora_weights=False),
        "llama_ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                               feedforward_modules=["down_proj"]),
        "llama_vera": VeraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                 save_projection=True, projection_prng_key=3),
    }
    for seed, (name, cfg) in enumerate(llama.items()):
        model = get_peft_model(llama_base(), cfg).eval()
        perturb(model, 100 + seed)
        model.save_pretrained(os.path.join(OUT, name), save_embedding_layers=False)
        with torch.no_grad():
            outputs[name] = model(ids).logits.numpy()
            outputs[name + "_merged"] = model.merge_and_unload()(ids).logits.numpy()

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                     init_lora_weights=False)
    model = get_peft_model(bert_base(), cfg).eval()
    perturb(model, 200)
    model.save_pretrained(os.path.join(OUT, "bert_lora"))
    with torch.no_grad():
        outputs["bert_lora"] = model(input_ids=bert_ids, attention_mask=bert_mask
                                     ).last_hidden_state.numpy()
        outputs["bert_lora_merged"] = model.merge_and_unload()(
            input_ids=bert_ids, attention_mask=bert_mask).last_hidden_state.numpy()

    for name in [*llama, "bert_lora"]:  # PEFT's model-card template
        os.remove(os.path.join(OUT, name, "README.md"))
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **outputs)
    import peft
    import transformers

    with open(os.path.join(OUT, "torch_versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__, "python": platform.python_version()},
                  f, indent=1, sort_keys=True)
        f.write("\n")
    for root, _, files in sorted(os.walk(OUT)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            print(f"{os.path.relpath(p, OUT):55s} {os.path.getsize(p):8d}")


if __name__ == "__main__":
    main()
