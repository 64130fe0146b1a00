# SPDX-License-Identifier: Apache-2.0
"""peftjax-written PEFT trainable-tokens adapters for the reverse check (PEFT loads them).

Runs in the main virtualenv. On the committed untied tiny Llama
(``tests/io/golden/peft/llama_base``: trainable tokens on the input table and
on the ``lm_head`` kernel, viewed with its vocabulary axis as rows) and the
tied one (``tests/io/golden/peft/export/llama_tied_base``: on the shared
table, written with ``tied_head=``), both in the scanned layout (the tests
read the PEFT-made files in both layouts), and the tiny BERT encoder (``tests/io/golden/peft/bert_base``:
trainable tokens on ``word_embeddings``, one of its three tables), with
NumPy-seeded rows (no JAX random bits) added to the initial copies, it writes
``tests/io/golden/peft_trainable_tokens/from_peftjax/pj_tt_{untied,tied}_scanned/``
and ``pj_tt_bert_unrolled/``
with ``peftjax.io.save_peft`` and ``peftjax_outputs.npz`` (peftjax's logits).
``scripts/golden/peft_trainable_tokens_make.py`` (torch side) then loads each
with ``PeftModel.from_pretrained`` on its base and records the max logit
difference in ``peft.json``; the test suite regenerates the files with
:func:`build` and compares them with the committed ones within a stated
tolerance.

Usage: ``.venv/bin/python scripts/golden/peft_trainable_tokens_from_peftjax.py``
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import bert, llama

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests" / "io" / "golden"
BASES = {"untied": GOLDEN / "peft" / "llama_base",
         "tied": GOLDEN / "peft" / "export" / "llama_tied_base",
         "bert": GOLDEN / "peft" / "bert_base"}
TIE = ("embed_tokens/embedding", "lm_head")
# Other rows than the PEFT-made adapters', in no particular order.
INDICES = {"untied": [2, 9, 63, 33, 40], "tied": [12, 1, 50, 7], "bert": [1, 20, 39, 11]}
BERT_IDS = [[2, 7, 11, 30, 3, 0], [2, 9, 5, 3, 0, 0]]
# A Dense head kernel (d, vocab): its vocabulary axis is the rows.
HEAD_VIEW = tree.DimensionNumbers(reduction_axis=-1, output_axis=-2)


def rules(kind: str) -> list[tree.Rule]:
    """The trainable-tokens rules of one base."""
    idx = INDICES[kind]
    if kind == "bert":
        return [tree.Rule(where="embeddings/word_embeddings/embedding",
                          then=adapters.trainable_tokens(idx))]
    out = [tree.Rule(where="embed_tokens/embedding", then=adapters.trainable_tokens(idx))]
    if kind == "untied":
        out.append(tree.Rule(where="lm_head/kernel", then=adapters.trainable_tokens(
            idx, dimension_numbers=HEAD_VIEW)))
    return out


def build(out) -> dict[str, np.ndarray]:
    """Writes ``out/pj_tt_{kind}_{layout}``; returns their peftjax logits
    (BERT: last hidden states, every position)."""
    out = pathlib.Path(out)
    ids = jnp.asarray(np.load(GOLDEN / "peft_trainable_tokens" / "torch_outputs.npz")
                      ["inputs_llama"])
    logits = {}
    for kind in ("untied", "tied", "bert"):
        for scanned in (kind != "bert",):
            if kind == "bert":
                model = bert.load_bert(BASES[kind])
                g, params = pm.split_params(model)
                km = bert.peft_key_map(model.config)
                bids = jnp.asarray(BERT_IDS)
                mask = (bids != 0).astype(jnp.int32)
                fwd = jax.jit(lambda p, g=g, bids=bids, mask=mask: pm.apply(
                    g, p, bids, attention_mask=mask))
            else:
                model = llama.load_llama(BASES[kind], scan_layers=scanned)
                g, params = pm.split_params(model)
                km = llama.peft_key_map(model.config)
                fwd = jax.jit(lambda p, g=g: pm.apply(g, p, ids))
            a = tree.assign(params, rules(kind))
            st = adapters.init(a, jax.random.key(0), params)
            rng = np.random.default_rng(44)  # the same rows in both layouts
            trainable = {p: adapters.TrainableTokensParams(jnp.asarray(
                np.asarray(t.values) + rng.standard_normal(t.values.shape) * 0.5,
                jnp.float32)) for p, t in sorted(st.trainable.items())}
            st = adapters.AdapterState(trainable, st.frozen)
            name = f"pj_tt_{kind}_{'scanned' if scanned else 'unrolled'}"
            io.save_peft(out / name, a, st, params, key_map=km,
                         tied_head=TIE if kind == "tied" else None,
                         base_model_name_or_path=("tiny-bert" if kind == "bert"
                                                  else f"tiny-{kind}-llama"))
            logits[name] = np.asarray(fwd(adapters.materialize(a, params, *st)))
    return logits


def main():
    out = GOLDEN / "peft_trainable_tokens" / "from_peftjax"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "peftjax_outputs.npz", **build(out))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(GOLDEN)}  {p.stat().st_size}")


if __name__ == "__main__":
    main()
