# SPDX-License-Identifier: Apache-2.0
"""PEFT prompt-learning goldens on the tiny Llama (torch side).

Runs in the side virtualenv (torch CPU, transformers, peft). For each
prompt-learning method (prompt tuning, prefix tuning with and without the
projection, P-tuning with its MLP and LSTM encoders, multitask prompt
tuning, CPT, cartridges) it makes a PEFT model on the committed tiny Llama,
perturbs every trainable tensor by ``N(0, 0.3²)`` (so nothing is at its
init), saves it with ``save_pretrained`` and records, in
``tests/io/golden/peft_prompts/``:

* ``llama_<name>/``: the adapter files;
* ``llama_<name>_encoder.safetensors`` (P-tuning, prefix projection, CPT):
  the prompt encoder's state dict (torch names), to check peftjax's encoder
  math on PEFT's own weights;
* ``torch_outputs.npz``: the logits of the fixed inputs with each adapter
  (``llama_<name>``; MPT with ``task_ids`` ``MPT_TASKS``; CPT over the
  ``P + T`` positions), CPT's labels/type mask inputs and its losses, and a
  cartridge initialised from the KV cache of ``CARTRIDGE_TEXT``;
* ``bert_<name>/`` and ``bert_<name>`` outputs (last hidden states):
  prefix tuning and a cartridge on the tiny BERT (``FEATURE_EXTRACTION``);
  PEFT's BERT places the real tokens at positions ``P..P+T-1`` (Hugging
  Face BERT offsets its absolute positions by the cache length);
* ``peft.json``: trainable counts, versions, and for every
  ``from_peftjax/pj_llama_<name>`` written by ``peft_prompts_from_peftjax.py``
  the max |torch - peftjax| logit difference with PEFT's loader.

Usage: ``.venv-torch/bin/python scripts/golden/peft_prompts_make.py``.
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peft_golden  # noqa: E402

OUT = os.path.join(_peft_golden.ROOT, "peft_prompts")
MPT_TASKS = [2, 0]
CPT_IDS = [5, 9, 11, 3, 20, 7, 30]
CPT_TYPES = [1, 2, 2, 3, 4, 5, 6]
CPT_INPUT_TYPES = [[1, 2, 2, 2, 3, 4, 4, 0], [1, 2, 3, 4, 1, 2, 3, 4]]
CARTRIDGE_TEXT = [1, 12, 44, 7, 19, 3]


def configs():
    from peft import (
        CartridgeConfig,
        CPTConfig,
        MultitaskPromptTuningConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
    )

    lm = "CAUSAL_LM"
    return {
        "prompt_tuning": PromptTuningConfig(task_type=lm, num_virtual_tokens=3),
        "prefix_tuning": PrefixTuningConfig(task_type=lm, num_virtual_tokens=3),
        "prefix_projection": PrefixTuningConfig(task_type=lm, num_virtual_tokens=3,
                                                prefix_projection=True,
                                                encoder_hidden_size=6),
        "p_tuning_mlp": PromptEncoderConfig(task_type=lm, num_virtual_tokens=3,
                                            encoder_hidden_size=6),
        "p_tuning_lstm": PromptEncoderConfig(task_type=lm, num_virtual_tokens=3,
                                             encoder_hidden_size=5,
                                             encoder_reparameterization_type="LSTM",
                                             encoder_num_layers=2),
        "multitask_prompt_tuning": MultitaskPromptTuningConfig(
            task_type=lm, num_virtual_tokens=3, num_tasks=3, num_ranks=2),
        "cpt": CPTConfig(task_type=lm, cpt_token_ids=CPT_IDS, cpt_mask=[1] * 7,
                         cpt_tokens_type_mask=CPT_TYPES, opt_weighted_loss_type="decay",
                         opt_loss_decay_factor=0.6, opt_projection_epsilon=2.0,
                         opt_projection_format_epsilon=1.0),
        "cartridge": CartridgeConfig(task_type=lm, num_virtual_tokens=4, num_frozen_tokens=1),
    }


def bert_configs():
    """PEFT's BERT prompt learning that peftjax's BERT could take (prefixes)."""
    from peft import CartridgeConfig, PrefixTuningConfig

    fe = "FEATURE_EXTRACTION"
    return {"prefix_tuning": PrefixTuningConfig(task_type=fe, num_virtual_tokens=3),
            "cartridge": CartridgeConfig(task_type=fe, num_virtual_tokens=3,
                                         num_frozen_tokens=1)}


def logits(name, model, ids):
    with torch.no_grad():
        if name == "multitask_prompt_tuning":
            return model(input_ids=ids, task_ids=torch.tensor(MPT_TASKS)).logits.numpy()
        return model(input_ids=ids).logits.numpy()


def main():
    from peft import PeftModel, get_peft_model
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    ids = torch.tensor(_peft_golden.LLAMA_IDS)
    outputs = {"inputs_llama": ids.numpy(), "llama_base": _peft_golden.forward(
        "llama", _peft_golden.base("llama"))}
    counts = {}
    for name, cfg in configs().items():
        torch.manual_seed(0)
        model = get_peft_model(_peft_golden.base("llama"), cfg).eval()
        counts[name] = int(model.get_nb_trainable_parameters()[0])
        _peft_golden.perturb_trainable(model)
        enc = model.prompt_encoder["default"]
        if name.startswith(("p_tuning", "prefix_projection", "cpt")):
            save_file({k: v.detach().contiguous() for k, v in enc.state_dict().items()},
                      os.path.join(OUT, f"llama_{name}_encoder.safetensors"))
        d = os.path.join(OUT, f"llama_{name}")
        _peft_golden.save(model, d, "llama")
        outputs[f"llama_{name}"] = logits(name, model, ids)
        if name == "cpt":
            labels = ids.clone()
            itm = torch.tensor(CPT_INPUT_TYPES)
            outputs["cpt_input_types"] = itm.numpy()
            with torch.no_grad():
                out = model(input_ids=ids, labels=labels, input_type_mask=itm.clone())
            outputs["cpt_loss"] = np.asarray(out.loss.item())
            outputs["cpt_logits_with_labels"] = out.logits.numpy()
        if name == "cartridge":
            from peft import initialize_kv_prefix_from_past_key_values

            text = torch.tensor([CARTRIDGE_TEXT])
            with torch.no_grad(), model.disable_adapter():
                pkv = model(input_ids=text, use_cache=True).past_key_values
            emb = initialize_kv_prefix_from_past_key_values(model, past_key_values=pkv)
            outputs["cartridge_from_text"] = emb.numpy()
            outputs["llama_cartridge_from_text"] = logits(name, model, ids)
        loaded = PeftModel.from_pretrained(_peft_golden.base("llama"), d).eval()
        diff = float(np.abs(logits(name, loaded, ids) - outputs[f"llama_{name}"]).max())
        assert diff < 1e-5, (name, diff)
    _, bert_ids, bert_mask = _peft_golden.inputs()
    outputs.update(inputs_bert=bert_ids.numpy(), mask_bert=bert_mask.numpy())
    for name, cfg in bert_configs().items():
        torch.manual_seed(0)
        model = get_peft_model(_peft_golden.base("bert"), cfg).eval()
        counts[f"bert_{name}"] = int(model.get_nb_trainable_parameters()[0])
        _peft_golden.perturb_trainable(model, seed=301)
        _peft_golden.save(model, os.path.join(OUT, f"bert_{name}"), "bert")
        with torch.no_grad():
            outputs[f"bert_{name}"] = model(input_ids=bert_ids, attention_mask=bert_mask
                                            ).last_hidden_state.numpy()
    np.savez_compressed(os.path.join(OUT, "torch_outputs.npz"), **outputs)


    def compare(d_name, d, want):
        m = PeftModel.from_pretrained(_peft_golden.base("llama"), d).eval()
        got = logits(d_name[len("pj_llama_"):], m, ids)[:, -ids.shape[1]:]  # real tokens
        return m, got, want

    entries, ok = _peft_golden.reverse(OUT, compare)
    _peft_golden.finish(OUT, {"trainable_params": counts,
                              "_versions": _peft_golden.versions(), **entries}, ok)


if __name__ == "__main__":
    main()
