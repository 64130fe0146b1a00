# SPDX-License-Identifier: Apache-2.0
"""Shared torch-side code of the per-tuner PEFT golden scripts.

Runs in the side virtualenv (torch CPU, transformers, peft); never imported
by peftjax or its tests. ``run(name, configs)`` makes, for each model of
``configs`` (``"llama"``: the committed tiny Llama; ``"bert"``: the tiny BERT,
both under ``tests/io/golden/peft``), a PEFT adapter from the config with
every trainable tensor perturbed by ``N(0, scale²)`` (so no tensor stays at
its init and the check is not the identity), saves it with
``save_pretrained`` and records, in ``tests/io/golden/peft_<name>/``:

* ``<model>_<name>/``: ``adapter_config.json`` + ``adapter_model.safetensors``;
* ``torch_outputs.npz``: ``<model>_<name>`` outputs with the adapter active
  (Llama logits, BERT last hidden states), ``<model>_<name>_merged`` after
  ``merge_and_unload`` (when ``merge``), ``<model>_base`` without adapter,
  ``inputs_llama``, ``inputs_bert``, ``mask_bert``;
* ``peft.json``: PEFT's trainable-parameter count per model
  (``trainable_params``), versions, and, for every directory
  ``from_peftjax/pj_<model>_<name>*`` written by the peftjax side
  (``_peftjax_golden.build``), the max |torch - peftjax| output difference
  with PEFT's ``PeftModel.from_pretrained`` (BERT: unpadded positions) and
  the statistics of each tensor.

A script per tuner is a few lines::

    import _peft_golden
    def llama(): from peft import HiraConfig; return HiraConfig(r=4, ...)
    if __name__ == "__main__":
        _peft_golden.run("hira", {"llama": llama, "bert": bert})

Usage: ``.venv-torch/bin/python scripts/golden/peft_<name>_make.py`` (after
``.venv/bin/python scripts/golden/peft_<name>_from_peftjax.py`` for the
reverse check; run the torch script again after it).
"""

import json
import os
import platform

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                    "tests", "io", "golden")
BASES = {"llama": os.path.join(ROOT, "peft", "llama_base"),
         "bert": os.path.join(ROOT, "peft", "bert_base")}
BAR = 1e-4
LLAMA_IDS = [[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 12, 0, 7, 50, 3]]
BERT_IDS = [[2, 7, 11, 30, 3, 0], [2, 9, 5, 3, 0, 0]]


def tensor_stats(path):
    """Per tensor of a safetensors file: dtype, shape and float64 statistics."""
    from safetensors.numpy import load_file

    out = {}
    for k, v in sorted(load_file(path).items()):
        x = np.asarray(v, np.float64).ravel()
        pos = np.arange(1, x.size + 1, dtype=np.float64) / max(x.size, 1)
        out[k] = {"dtype": str(v.dtype), "shape": list(v.shape),
                  "sum": float(x.sum()), "l2": float(np.sqrt(x @ x)),
                  "max_abs": float(np.abs(x).max(initial=0.0)),
                  "weighted_sum": float(x @ pos)}
    return out


def base(model):
    """The committed tiny base model (``"llama"`` or ``"bert"``), float32, eval."""
    if model == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(BASES[model], dtype=torch.float32).eval()
    from transformers import BertModel

    return BertModel.from_pretrained(BASES[model], dtype=torch.float32,
                                     add_pooling_layer=False).eval()


def inputs():
    ids = torch.tensor(LLAMA_IDS)
    bert_ids = torch.tensor(BERT_IDS)
    return ids, bert_ids, (bert_ids != 0).long()


def forward(kind, m):
    """Llama logits or BERT last hidden states of the fixed inputs."""
    ids, bert_ids, mask = inputs()
    with torch.no_grad():
        if kind == "llama":
            return m(ids).logits.numpy()
        return m(input_ids=bert_ids, attention_mask=mask).last_hidden_state.numpy()


def perturb_trainable(model, *, seed=300, scale=0.3, perturb=None):
    """Adds ``N(0, scale²)`` to every trainable tensor of ``model`` (in name
    order, from a generator seeded with ``seed``), or calls ``perturb(name,
    tensor, generator)`` on each instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if p.requires_grad:
                if perturb is None:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
                else:
                    perturb(pname, p, g)


def save(model, d, kind):
    """``save_pretrained`` to ``d`` with a stable base name, without PEFT's README."""
    model.peft_config["default"].base_model_name_or_path = f"tiny-random-{kind}"
    model.save_pretrained(d)
    if os.path.exists(os.path.join(d, "README.md")):
        os.remove(os.path.join(d, "README.md"))


def versions():
    """The versions recorded in every ``peft.json``."""
    import peft
    import transformers

    return {"torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def peft_type(m):
    """The report entry naming a loaded adapter's PEFT type."""
    return {"peft_type": m.peft_config["default"].peft_type.value}


def reverse(out, compare, extra=peft_type):
    """PEFT's outputs on the peftjax-written directories ``out/from_peftjax/*``.

    ``compare(name, directory, reference) -> (model, got, want)`` loads one
    directory with PEFT and returns the arrays to compare (``None`` skips the
    directory); ``extra(model)`` adds fields to its report entry.

    Returns ``({name: entry}, all within BAR)``.
    """
    src = os.path.join(out, "from_peftjax")
    entries, ok = {}, True
    if not os.path.isdir(src):
        return entries, ok
    ref = np.load(os.path.join(src, "peftjax_outputs.npz"))
    for name in sorted(os.listdir(src)):
        d = os.path.join(src, name)
        if not os.path.isdir(d):
            continue
        got = compare(name, d, ref[name] if name in ref else None)
        if got is None:
            continue
        m, have, want = got
        diff = float(np.abs(have - want).max())
        entries[name] = {"max_abs_diff": diff, "bar": BAR, "passed": diff <= BAR,
                         **extra(m), "tensor_stats": tensor_stats(
                             os.path.join(d, "adapter_model.safetensors"))}
        ok &= diff <= BAR
        print(f"{name}: max |torch - peftjax| = {diff:.3g}")
    return entries, ok


def finish(out, report, ok, *, show=3000):
    """Writes ``out/peft.json``, prints it, fails when a reverse check missed the bar."""
    with open(os.path.join(out, "peft.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps({k: v for k, v in report.items() if k != "_versions"}, indent=1)[:show])
    if not ok:
        raise SystemExit("a peftjax-written adapter misses the bar")


def run(name, configs, *, scale=0.3, seed=300, merge=True, perturb=None):
    """Makes the PEFT adapters of ``configs`` and checks the peftjax-written ones.

    Args:
      name: the tuner (``"hira"``): files go to ``tests/io/golden/peft_<name>``.
      configs: ``{"llama" | "bert": () -> PeftConfig}``.
      scale: standard deviation of the perturbation of every trainable tensor.
      seed: of the perturbation's torch generator.
      merge: record ``merge_and_unload`` outputs (False for a tuner that
        cannot merge).
      perturb: ``(parameter name, tensor, generator) -> None`` to perturb in
        place instead of adding ``N(0, scale²)`` (e.g. to keep a constraint).
    """
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    out = os.path.join(ROOT, f"peft_{name}")
    os.makedirs(out, exist_ok=True)
    ids, bert_ids, mask = inputs()
    outputs = {"inputs_llama": ids.numpy(), "inputs_bert": bert_ids.numpy(),
               "mask_bert": mask.numpy()}
    counts = {}
    for kind, make in sorted(configs.items()):
        outputs[f"{kind}_base"] = forward(kind, base(kind))
        torch.manual_seed(0)  # PEFT's inits draw from the global generator
        model = get_peft_model(base(kind), make()).eval()
        counts[kind] = int(model.get_nb_trainable_parameters()[0])
        perturb_trainable(model, seed=seed, scale=scale, perturb=perturb)
        save(model, os.path.join(out, f"{kind}_{name}"), kind)
        outputs[f"{kind}_{name}"] = forward(kind, model)
        if merge:
            outputs[f"{kind}_{name}_merged"] = forward(kind, model.merge_and_unload())
    np.savez_compressed(os.path.join(out, "torch_outputs.npz"), **outputs)

    keep = mask.numpy().astype(bool)

    def compare(d_name, d, want):
        kind = d_name.split("_")[1]  # pj_<model>_...
        m = PeftModel.from_pretrained(base(kind), d).eval()
        got = forward(kind, m)
        if kind == "bert":
            got, want = got[keep], want[keep]
        return m, got, want

    entries, ok = reverse(out, compare)
    finish(out, {"trainable_params": counts, "_versions": versions(), **entries}, ok,
           show=4000)


def run_causal(name, config, ids, new_tokens, *, extra=peft_type):
    """One adapter on the tiny Llama with logits and a greedy generation.

    Records in ``tests/io/golden/peft_<name>/``: ``llama_<name>/`` (PEFT's
    files, every trainable tensor perturbed by ``N(0, 0.3²)``),
    ``torch_outputs.npz`` (``inputs``, ``llama_base`` and ``llama_<name>``
    logits, ``generated``: PEFT's greedy ``generate`` of ``new_tokens`` with
    its KV cache) and ``peft.json`` (trainable count, versions, the reverse
    check of ``from_peftjax/*`` with ``extra(model)`` in each entry).
    """
    from peft import PeftModel, get_peft_model

    torch.set_num_threads(2)
    out = os.path.join(ROOT, f"peft_{name}")
    os.makedirs(out, exist_ok=True)
    ids = torch.tensor(ids)
    with torch.no_grad():
        outputs = {"inputs": ids.numpy(), "llama_base": base("llama")(ids).logits.numpy()}
    torch.manual_seed(0)
    model = get_peft_model(base("llama"), config).eval()
    count = int(model.get_nb_trainable_parameters()[0])
    perturb_trainable(model)
    save(model, os.path.join(out, f"llama_{name}"), "llama")
    with torch.no_grad():
        outputs[f"llama_{name}"] = model(input_ids=ids).logits.numpy()
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    outputs["generated"] = gen[:, ids.shape[1]:].numpy()
    np.savez_compressed(os.path.join(out, "torch_outputs.npz"), **outputs)

    def compare(d_name, d, want):
        m = PeftModel.from_pretrained(base("llama"), d).eval()
        with torch.no_grad():
            return m, m(input_ids=ids).logits.numpy(), want

    entries, ok = reverse(out, compare, extra)
    print("generated", outputs["generated"].tolist())
    finish(out, {"trainable_params": {"llama": count}, "_versions": versions(), **entries},
           ok)
