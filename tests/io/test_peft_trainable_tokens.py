"""Trainable tokens against Hugging Face PEFT on the tiny Llama (tied, untied) and BERT goldens.

``tests/io/golden/peft_trainable_tokens/`` holds PEFT-made adapters with every
trained row perturbed away from its init (``scripts/golden/peft_trainable_tokens_make.py``):
on the untied tiny Llama (rows of the input table and of ``lm_head``) and on
the tied one (one shared table; PEFT ties a second layer on ``lm_head`` and
saves its tensor twice), and on the tiny BERT's ``word_embeddings`` (one of
three tables), the torch outputs and PEFT's trainable counts, and
peftjax-written files (``scripts/golden/peft_trainable_tokens_from_peftjax.py``)
with the max logit difference PEFT measured loading them (``peft.json``).
"""

import functools
import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import adapters, io, tree
from peftjax import models as pm
from peftjax.models import bert, llama
from tests import helpers as h

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "io" / "golden" / "peft_trainable_tokens"
BASES = {"untied": ROOT / "tests" / "io" / "golden" / "peft" / "llama_base",
         "tied": ROOT / "tests" / "io" / "golden" / "peft" / "export" / "llama_tied_base",
         "bert": ROOT / "tests" / "io" / "golden" / "peft" / "bert_base"}
NAMES = {"untied": "llama_tt_untied", "tied": "llama_tt_tied", "bert": "bert_tt"}
TABLE = {"untied": ("embed_tokens/embedding", "model.embed_tokens"),
         "tied": ("embed_tokens/embedding", "model.embed_tokens"),
         "bert": ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings")}
TIE = ("embed_tokens/embedding", "lm_head")
# The bar for torch vs peftjax logits (float32, different kernels).
TORCH_ATOL = 1e-4
# PEFT's counts: 4 rows x 16 of the table and of the head; 3 rows x 16 once
# for the tied table (the head's layer shares the embedding's tensor) and
# for BERT's word embeddings.
COUNTS = {"untied": 128, "tied": 48, "bert": 48}


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "torch_outputs.npz"))


@functools.cache
def _base(kind, scanned=False):
    """``(graphdef, params, key map)`` of a committed base (loaded once)."""
    if kind == "bert":
        m = bert.load_bert(BASES[kind])
        g, params = pm.split_params(m)
        return g, params, bert.peft_key_map(m.config)
    m = llama.load_llama(BASES[kind], scan_layers=scanned)
    g, params = pm.split_params(m)
    return g, params, llama.peft_key_map(m.config)


# One whole-model compile per case: the untied Llama unrolled, the tied one
# scanned (the reverse check covers both scanned), BERT.
@pytest.fixture(scope="module", params=[("untied", False), ("tied", True), ("bert", False)],
                ids=["untied-unrolled", "tied-scanned", "bert"])
def model(request, ref):
    """``(kind, forward(params) -> outputs at the compared positions, params, key map)``."""
    kind, scanned = request.param
    g, params, km = _base(kind, scanned)
    if kind == "bert":
        ids, mask = jnp.asarray(ref["inputs_bert"]), jnp.asarray(ref["mask_bert"])
        run = jax.jit(lambda p: pm.apply(g, p, ids, attention_mask=mask))
        keep = ref["mask_bert"].astype(bool)  # PEFT's outputs at unpadded positions
        return kind, lambda p: np.asarray(run(p))[keep], params, km
    ids = jnp.asarray(ref["inputs_llama"])
    run = jax.jit(lambda p: pm.apply(g, p, ids))
    return kind, lambda p: np.asarray(run(p)), params, km


def _at(x, kind, ref):
    """``x`` at the compared positions (BERT: PEFT's unpadded ones)."""
    return x[ref["mask_bert"].astype(bool)] if kind == "bert" else x


def _tie(kind):
    return TIE if kind == "tied" else None


@pytest.fixture(scope="module")
def loaded(model):
    kind, fwd, params, km = model
    return io.load_peft(GOLDEN / NAMES[kind], params, key_map=km, tied_head=_tie(kind))


def test_peft_made_file_logits_merge_count_roundtrip(model, loaded, ref, tmp_path):
    kind, fwd, params, km = model
    cfg = json.loads((GOLDEN / NAMES[kind] / "adapter_config.json").read_text())
    tensors, _ = io.read_safetensors(GOLDEN / NAMES[kind] / "adapter_model.safetensors")
    # by hand, without peftjax.io: PEFT's rows are the table's rows (and the
    # untied head's torch rows, i.e. its Flax kernel's columns)
    idx = cfg["token_indices"]
    path, module = TABLE[kind]
    table = np.asarray(tree.leaves_by_path(params)[path]).copy()
    table[idx] = tensors[f"base_model.model.{module}.trainable_tokens_delta"]
    materialized = tree.leaves_by_path(
        adapters.materialize(loaded.assignment, params, *loaded.state))
    np.testing.assert_array_equal(np.asarray(materialized[path]), table)
    assert sorted(loaded.assignment) == sorted(
        [path] + (["lm_head/kernel"] if kind == "untied" else []))
    if kind == "untied":
        head = np.asarray(params["lm_head"]["kernel"]).copy()
        head[:, idx] = tensors["base_model.model.lm_head.trainable_tokens_delta"].T
        np.testing.assert_array_equal(np.asarray(adapters.materialize(
            loaded.assignment, params, *loaded.state)["lm_head"]["kernel"]), head)
    elif kind == "tied":  # the tied copy PEFT writes is the table's
        assert sorted(tensors) == ["base_model.model.lm_head.trainable_tokens_delta",
                                   "base_model.model.model.embed_tokens.trainable_tokens_delta"]
    name = NAMES[kind]
    out = fwd(adapters.materialize(loaded.assignment, params, *loaded.state))
    np.testing.assert_allclose(out, _at(ref[name], kind, ref), rtol=0, atol=TORCH_ATOL)
    merged, aux = adapters.fold(loaded.assignment, params, *loaded.state, return_aux=True)
    np.testing.assert_allclose(fwd(merged), _at(ref[f"{name}_merged"], kind, ref),
                               rtol=0, atol=TORCH_ATOL)
    back = adapters.unfold(loaded.assignment, merged, *loaded.state, aux=aux)
    h.assert_tree_allclose(back, params, **h.EXACT)
    # the perturbed rows move the outputs well beyond the bar
    assert np.abs(_at(ref[name], kind, ref) - _at(ref[f"base_{kind}"], kind, ref)).max() > (
        100 * TORCH_ATOL)
    peft = json.loads((GOLDEN / "peft.json").read_text())
    n = adapters.num_trainable(loaded.state.trainable)
    assert n == peft[name]["trainable_params"] == COUNTS[kind]
    # written back: PEFT's key names (the tied copy too), read back exactly
    d = io.save_peft(tmp_path / "ad", loaded.assignment, loaded.state, params,
                     key_map=km, tied_head=_tie(kind))
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TRAINABLE_TOKENS"
    assert cfg["token_indices"] == loaded.config["token_indices"]
    back = io.load_peft(d, params, key_map=km, tied_head=_tie(kind))
    h.assert_tree_allclose(back.state.trainable, loaded.state.trainable, **h.EXACT)
    assert sorted(back.assignment) == sorted(loaded.assignment)
    t, _ = io.read_safetensors(d / "adapter_model.safetensors")
    assert sorted(t) == sorted(tensors)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "peft_trainable_tokens_from_peftjax",
        ROOT / "scripts" / "golden" / "peft_trainable_tokens_from_peftjax.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("pj_tt")
    return out, mod.build(out)


def test_peftjax_written_files_load_in_peft(regenerated, ref):
    out, logits = regenerated
    committed = GOLDEN / "from_peftjax"
    old = np.load(committed / "peftjax_outputs.npz")
    peft = json.loads((GOLDEN / "peft.json").read_text())
    names = ["pj_tt_untied_scanned", "pj_tt_tied_scanned", "pj_tt_bert_unrolled"]
    assert sorted(logits) == sorted(names)
    for name in names:
        kind = name.split("_")[2]
        new_t, _ = io.read_safetensors(out / name / "adapter_model.safetensors")
        old_t, _ = io.read_safetensors(committed / name / "adapter_model.safetensors")
        assert sorted(new_t) == sorted(old_t)
        for k in new_t:  # base rows + NumPy noise, one float32 addition
            np.testing.assert_allclose(new_t[k], old_t[k], rtol=1e-6, atol=0, err_msg=k)
        h.assert_verified_stats(peft[name]["tensor_stats"], old_t, name)  # what PEFT loaded
        assert (json.loads((out / name / "adapter_config.json").read_text())
                == json.loads((committed / name / "adapter_config.json").read_text()))
        # a different CPU's XLA kernels: well inside the torch bar
        np.testing.assert_allclose(logits[name], old[name], rtol=0, atol=1e-5)
        rec = peft[name]
        assert rec["passed"] and rec["peft_type"] == "TRAINABLE_TOKENS" and rec["base"] == kind
        assert rec["max_abs_diff"] <= TORCH_ATOL
        assert np.abs(_at(old[name], kind, ref) - _at(ref[f"base_{kind}"], kind, ref)).max() > (
            100 * TORCH_ATOL)  # not the base


def _edit(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t, _ = io.read_safetensors(src / "adapter_model.safetensors")
    io.write_safetensors(dst / "adapter_model.safetensors", tensors(t) if tensors else t)
    return dst


_HEAD = "base_model.model.lm_head.trainable_tokens_delta"
_EMB = "base_model.model.model.embed_tokens.trainable_tokens_delta"


@pytest.mark.parametrize("src,tie,config,tensors,match", [
    ("untied", False, {"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ("untied", False, {"token_indices": []}, None, "non-empty list of ints"),
    ("untied", False, {"token_indices": [3, 7, 60, 64]}, None,
     "token index 64 is out of range"),
    ("untied", False, {"token_indices": [3, 7, 60]}, None, "has shape (4, 16)"),
    ("untied", False, {"lora_alpha": 8}, None, "lora_alpha=8"),
    ("untied", False, {"target_modules": ["embed_tokens", "input_layernorm"]}, None,
     "is no embedding table or Linear"),
    ("untied", False, {"target_modules": ["embed_tokens"]}, None,
     "not trainable-token rows"),
    ("untied", False, None, lambda t: {_EMB: t[_EMB]}, "lacks"),
    ("tied", False, None, None, "pass tied_head"),
    ("tied", True, None, lambda t: {**t, _HEAD: t[_HEAD] + 1}, "not the tied copy"),
])
def test_config_fields_honoured_or_named(tmp_path, src, tie, config, tensors, match):
    _, params, km = _base(src)
    d = _edit(GOLDEN / f"llama_tt_{src}", tmp_path / "bad", config, tensors)
    with pytest.raises(ValueError, match=re.escape(match)):
        io.load_peft(d, params, key_map=km, tied_head=TIE if tie else None)


def test_default_target_is_the_input_embedding(tmp_path):
    """PEFT's target_modules=None: the model's input embedding (the key map's one table)."""
    _, params, km = _base("untied")
    d = _edit(GOLDEN / "llama_tt_untied", tmp_path / "ok", {"target_modules": None},
              lambda t: {_EMB: t[_EMB]})
    assert sorted(io.load_peft(d, params, key_map=km).assignment) == ["embed_tokens/embedding"]
    no_table = {p: k for p, k in km.items() if p != "embed_tokens/embedding"}
    with pytest.raises(ValueError, match="no target_modules, and the key map has 0"):
        io.load_peft(d, params, key_map=no_table)
    # BERT has three tables: which one is the input embedding is not in a key map
    _, bparams, bkm = _base("bert")
    d = _edit(GOLDEN / "bert_tt", tmp_path / "bert", {"target_modules": None})
    with pytest.raises(ValueError, match="the key map has 3 embedding tables"):
        io.load_peft(d, bparams, key_map=bkm)


def test_save_peft_refuses_what_peft_cannot_hold(tmp_path):
    _, params, km = _base("untied")

    def save(rules):
        a = tree.assign(params, rules)
        st = adapters.init(a, jax.random.key(0), params)
        return io.save_peft(tmp_path / "x", a, st, params, key_map=km)

    with pytest.raises(ValueError, match="one token_indices list"):
        save([tree.Rule(where="embed_tokens/embedding", then=adapters.trainable_tokens([1])),
              tree.Rule(where="lm_head/kernel", then=adapters.trainable_tokens(
                  [2], dimension_numbers=tree.DimensionNumbers(-1, -2)))])
    # a head kernel (d, vocab) viewed as (in, out) would train rows of d
    with pytest.raises(ValueError, match=r"takes rows along axis \(0,\).*along axis \(1,\)"):
        save([tree.Rule(where="lm_head/kernel", then=adapters.trainable_tokens([1]))])
    with pytest.raises(ValueError, match=r"full leaves \['norm/scale'\]"):
        a = tree.assign(params, [tree.Rule(where="embed_tokens/embedding",
                                           then=adapters.trainable_tokens([1]))])
        st = adapters.init(a, jax.random.key(0), params)
        io.save_peft(tmp_path / "y", a, st, params, key_map=km,
                     full={"norm/scale": params["norm"]["scale"]})
