# SPDX-License-Identifier: Apache-2.0
"""Reference outputs from PyTorch transformers for peftjax's model tests.

Runs in the side virtualenv (``make bench-env``: torch 2.13.0 CPU,
transformers 5.23.0, gguf), never in CI, and never imports peftjax. It feeds
the committed token ids of ``tests/models/golden/inputs.json`` to

* SmolLM2-135M-Instruct, loaded by transformers from the same Q4_1 GGUF the
  tests use (``gguf_file=``, dequantised to float32), and
* all-MiniLM-L6-v2 from its safetensors,

and writes small files next to the inputs: ``smollm2.npz`` (per-position
top-8 logits, logsumexp, argmax and top-1/top-2 margin, logits at 256 fixed
vocabulary columns, perplexity inputs), ``minilm.npz`` (last hidden states and
mean-pooled embeddings) and ``golden.json`` (scalars, greedy generations, the
SHA-256 of each weight file and the library versions). Usage::

    G=$(.venv/bin/python -c 'import peftjax.models as m; print(m.smollm2_gguf())')
    M=$(.venv/bin/python -c 'import peftjax.models as m; print(m.minilm_dir())')
    .venv-torch/bin/python scripts/golden/make_golden.py --gguf "$G" --minilm "$M"

(the main virtualenv only prints the offline fixtures' paths; this script
itself never imports peftjax).
"""

import argparse
import hashlib
import json
import os
import platform

import numpy as np
import torch

HERE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "models", "golden"
)
N_COLUMNS, TOP_K, GEN_TOKENS = 256, 8, 24


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2(gguf_path: str, inputs: dict) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path),
        gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32,
    )
    model.eval()
    s = inputs["smollm2"]
    ids = torch.tensor(s["logits_ids"])
    mask = torch.tensor(s["logits_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double().numpy()
    vocab = logits.shape[-1]
    columns = np.random.default_rng(0).choice(vocab, N_COLUMNS, replace=False)
    top = np.argsort(-logits, axis=-1)[..., :TOP_K]
    top_vals = np.take_along_axis(logits, top, axis=-1)
    m = mask.numpy().astype(bool)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(
        -1
    )
    max_abs = np.array([np.abs(logits[i][m[i]]).max() for i in range(len(m))])
    # Perplexity of the Shakespeare passage (next-token NLL, float64).
    ppl_ids = torch.tensor([s["ppl_ids"]])
    with torch.no_grad():
        pl = model(input_ids=ppl_ids).logits.double()[0, :-1]
    nll = torch.nn.functional.cross_entropy(pl, ppl_ids[0, 1:], reduction="mean").item()
    # Greedy generations by full recompute, with the top-1/top-2 margin per step.
    gens = []
    for prompt in s["generation_prompt_ids"]:
        seq = list(prompt)
        toks, margins = [], []
        for _ in range(GEN_TOKENS):
            with torch.no_grad():
                last = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
            v, i = torch.topk(last, 2)
            toks.append(int(i[0]))
            margins.append(float(v[0] - v[1]))
            seq.append(int(i[0]))
        gens.append({"tokens": toks, "margins": margins})
    arrays = {
        "logits_columns": columns.astype(np.int32),
        "logits_at_columns": logits[..., columns].astype(np.float32),
        "logits_top_ids": top.astype(np.int32),
        "logits_top_values": top_vals.astype(np.float32),
        "logits_logsumexp": lse.astype(np.float64),
        "logits_max_abs": max_abs.astype(np.float64),
    }
    scalars = {"ppl_mean_nll": nll, "ppl": float(np.exp(nll)), "generations": gens}
    return arrays, scalars


def minilm(directory: str, inputs: dict) -> dict:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    ids = torch.tensor(inputs["minilm"]["ids"])
    mask = torch.tensor(inputs["minilm"]["mask"])
    with torch.no_grad():
        hidden = model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state.double()
    w = mask.double()[..., None]
    pooled = (hidden * w).sum(1) / w.sum(1)
    return {"last_hidden_state": hidden.float().numpy(), "mean_pooled": pooled.numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--minilm", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with open(os.path.join(HERE, "inputs.json"), encoding="utf-8") as f:
        inputs = json.load(f)
    arrays, scalars = smollm2(args.gguf, inputs)
    np.savez(os.path.join(HERE, "smollm2.npz"), **arrays)
    np.savez(os.path.join(HERE, "minilm.npz"), **minilm(args.minilm, inputs))
    import gguf
    import safetensors
    import transformers

    meta = {
        "smollm2": scalars,
        "sha256": {
            "SmolLM2-135M-Instruct.Q4_1.gguf": sha256(args.gguf),
            "all-MiniLM-L6-v2/model.safetensors": sha256(
                os.path.join(args.minilm, "model.safetensors")
            ),
            "inputs.json": sha256(os.path.join(HERE, "inputs.json")),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "gguf": getattr(gguf, "__version__", "0.19.0 (no __version__ attribute)"),
            "numpy": np.__version__,
        },
        "dtype": "float32 model, float64 post-processing",
    }
    with open(os.path.join(HERE, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(json.dumps(meta["smollm2"]["generations"])[:400], meta["smollm2"]["ppl"])


if __name__ == "__main__":
    main()
