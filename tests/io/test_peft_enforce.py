"""``load_peft`` enforces ``adapter_config.json`` as Hugging Face PEFT applies it.

Two kinds of tests:

* the PEFT cross-check: ``tests/io/golden/peft_targets.json``
  (``scripts/golden/peft_targets.py``, run once with torch + PEFT 0.21.2, never
  importing peftjax) records, on the tiny random Llama of the PEFT goldens,
  which modules PEFT adapts for each config, the selection fields of the
  ``adapter_config.json`` it then saves, the rank / alpha / scaling / dropout
  it gives each module under ``rank_pattern`` / ``alpha_pattern`` /
  ``use_rslora`` / ``lora_dropout``, and which modules (IA)³ treats as
  feed-forward. A file holding tensors for exactly PEFT's modules, with
  PEFT's saved config (and the config as the user wrote it), must load to
  exactly those modules with PEFT's ranks and scalings;
* the refusals on a small dict-of-arrays model: tensors the config does not
  select (``target_modules``, ``exclude_modules``, ``layers_to_transform``),
  selected modules without tensors, unselectable targets, wrong-typed fields,
  malformed JSON (every JSON file peftjax reads from a user's directory).
"""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import adapters, factored, io, tree
from peftjax import models as pm
from peftjax.io import PeftKey, TensorLayout
from peftjax.models import llama
from tests.helpers import MATMUL_F32

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "io" / "golden" / "peft_targets.json").read_text())
CFG = llama.LlamaConfig.from_hf(json.loads(
    (ROOT / "tests" / "io" / "golden" / "peft" / "llama_base" / "config.json")
    .read_text()))
KEY_MAP = llama.peft_key_map(CFG)
SELECTION = ("target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "modules_to_save")
K, E, V = TensorLayout.KERNEL, TensorLayout.EMBEDDING, TensorLayout.VECTOR


@pytest.fixture(scope="module")
def llama_params():
    model = nnx.eval_shape(lambda: llama.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)))
    shapes = pm.split_params(model)[1]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _paths_of(modules):
    return {k.module: p for p, k in KEY_MAP.items()
            if k.module in modules and k.tensor == "weight"}


def _save_modules(d, params, modules, ranks=None, full_modules=(), ia3_ff=None):
    """A PEFT file with adapter tensors for exactly ``modules`` (via save_peft)."""
    ranks = ranks or {}
    rules = []
    for m, p in sorted(_paths_of(modules).items()):
        if ia3_ff is not None:
            side = adapters.Side.INPUT if ia3_ff[m] else adapters.Side.OUTPUT
            then = adapters.ia3(side)
        elif KEY_MAP[p].layout is E:
            then = adapters.lora(ranks.get(m, 2), init=adapters.LoRAInit.EMBEDDING)
        else:
            then = adapters.lora(ranks.get(m, 2))
        rules.append(tree.Rule(where=p.replace(".", r"\."), then=then))
    a = tree.assign(params, rules)
    st = _nonzero(adapters.init(a, jax.random.key(0), params))
    full = {p: params_flat(params)[p] for p in _paths_of(set(full_modules)).values()}
    return io.save_peft(d, a, st, params, key_map=KEY_MAP, full=full or None)


def _nonzero(state):
    """Random values for every trainable leaf (B = 0 at init would hide scalings)."""
    rng = np.random.default_rng(1)
    return adapters.AdapterState(jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state.trainable),
        state.frozen)


def params_flat(params):
    return {jax.tree_util.keystr(kp, simple=True, separator="/"): v
            for kp, v in jax.tree.leaves_with_path(params)}


def _edit_config(d, **fields):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(fields)
    p.write_text(json.dumps(cfg))


def _loaded_modules(ad):
    return sorted(KEY_MAP[p].module for p in ad.assignment)


def _expand_full(modules):
    """``modules_to_save`` names (suffixes) as the key map's full module names."""
    return {k.module for k in KEY_MAP.values()
            for m in modules if k.module == m or k.module.endswith("." + m)}


SUCCESS = sorted(n for n, c in GOLDEN["cases"].items() if "modules" in c)


@pytest.mark.parametrize("name", SUCCESS)
def test_peft_selection_is_enforced_as_peft_applies_it(tmp_path, llama_params, name):
    """PEFT's modules load, from its saved config and from the config as written;
    one module fewer (or one more) is an error naming it and the field."""
    case = GOLDEN["cases"][name]
    want = case["modules"]
    saved = case["saved"]
    full = _expand_full(saved["modules_to_save"] or [])
    d = _save_modules(tmp_path / "ad", llama_params, set(want), full_modules=full)
    for fields in (saved, {**dict.fromkeys(SELECTION), **case["config"]}):
        _edit_config(d, **fields)
        back = io.load_peft(d, llama_params, key_map=KEY_MAP, output_modules=("lm_head",))
        assert _loaded_modules(back) == want
        assert sorted(KEY_MAP[p].module for p in back.full) == sorted(full)
    # A selected module whose tensors are gone: named, with target_modules.
    if len(want) > 1:
        _save_modules(d, llama_params, set(want[1:]), full_modules=full)
        _edit_config(d, **saved)
        with pytest.raises(ValueError, match=rf"target_modules=.* no tensors in .*"
                                             rf"\['{re.escape(want[0])}'\]"):
            io.load_peft(d, llama_params, key_map=KEY_MAP, output_modules=("lm_head",))
    # Tensors of a module PEFT leaves out (one of the seven projections).
    projections = {k.module for k in KEY_MAP.values()
                   if k.layout is K and k.module != "lm_head"}
    others = sorted(projections - set(want) - full)
    if others:
        _save_modules(d, llama_params, set(want) | {others[0]}, full_modules=full)
        _edit_config(d, **saved)
        with pytest.raises(ValueError, match=rf"'{re.escape(others[0])}' .*: "
                                             "(target_modules|layers_to_transform|"
                                             "exclude_modules)"):
            io.load_peft(d, llama_params, key_map=KEY_MAP, output_modules=("lm_head",))


@pytest.mark.parametrize("name", sorted(n for n, c in GOLDEN["cases"].items()
                                        if "error" in c))
def test_configs_peft_refuses_are_refused(tmp_path, llama_params, name):
    """Each config PEFT rejects is rejected by load_peft too, naming the file."""
    d = _save_modules(tmp_path / "ad", llama_params, {"model.layers.0.self_attn.q_proj"})
    _edit_config(d, **{**dict.fromkeys(SELECTION), **GOLDEN["cases"][name]["config"]})
    with pytest.raises(ValueError, match="adapter_config.json: .*PEFT raises here too"):
        io.load_peft(d, llama_params, key_map=KEY_MAP, output_modules=("lm_head",))


@pytest.mark.parametrize("name", sorted(GOLDEN["patterns"]))
def test_rank_alpha_patterns_and_dropout_equal_peft(tmp_path, llama_params, name):
    case = GOLDEN["patterns"][name]
    mods = case["modules"]
    d = _save_modules(tmp_path / "ad", llama_params, set(mods),
                      ranks={m: v["r"] for m, v in mods.items()})
    _edit_config(d, **{"rank_pattern": {}, "alpha_pattern": {}, **case["config"]})
    if name == "pattern_needs_a_dot_boundary":  # PEFT warned about these keys too
        with pytest.warns(RuntimeWarning, match=r"\['rank_pattern: proj', "
                                                r"'rank_pattern: p_proj'\]"):
            back = io.load_peft(d, llama_params, key_map=KEY_MAP)
    else:
        back = io.load_peft(d, llama_params, key_map=KEY_MAP)
    assert _loaded_modules(back) == sorted(mods)
    paths = _paths_of(set(mods))
    # Scaling from the numbers: with W = 0, the materialised leaf is s·a@b.
    got = adapters.materialize(back.assignment, llama_params, *back.state,
                               deterministic=True)
    flat = params_flat(got)
    for m, ref in mods.items():
        p = paths[m]
        t = back.state.trainable[p]
        assert t.a.shape[-1] == ref["r"], m
        assert back.assignment[p].dropout == pytest.approx(ref["dropout"]), m
        ab = np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
        np.testing.assert_allclose(flat[p], ref["scaling"] * ab, **MATMUL_F32)


@pytest.mark.parametrize("name", sorted(GOLDEN["ia3"]))
def test_ia3_feedforward_modules_equal_peft(tmp_path, llama_params, name):
    case = GOLDEN["ia3"][name]
    ff = case["feedforward"]
    d = _save_modules(tmp_path / "ad", llama_params, set(ff), ia3_ff=ff)
    _edit_config(d, **case["config"])
    back = io.load_peft(d, llama_params, key_map=KEY_MAP)
    assert _loaded_modules(back) == sorted(ff)
    for m, is_ff in ff.items():
        assert ("side=input" in repr(back.assignment[_paths_of({m})[m]])) == is_ff, m


# A small dict-of-arrays model: two layers of q, v; a norm; an embedding; a head.
D, VOCAB, L = 6, 10, 2


def key_map():
    km = {"embed/embedding": PeftKey("embed", "weight", E),
          "head/kernel": PeftKey("head", "weight", K)}
    for i in range(L):
        for n in ("q", "v"):
            km[f"layers/{i}/{n}/kernel"] = PeftKey(f"model.blocks.{i}.{n}", "weight", K)
        km[f"layers/{i}/norm/scale"] = PeftKey(f"model.blocks.{i}.norm", "weight", V)
    return km


def make_params():
    rng = np.random.default_rng(0)

    def n(*s):
        return jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)

    return {"embed": {"embedding": n(VOCAB, D)}, "head": {"kernel": n(D, 3)},
            "layers": {i: {"q": {"kernel": n(D, D)}, "v": {"kernel": n(D, D)},
                           "norm": {"scale": n(D)}} for i in range(L)}}


def write(d, modules=("q", "v"), layers=range(L), dropout=0.0):
    params = make_params()
    alt = "|".join(str(i) for i in layers)
    rules = [tree.Rule(where=rf"layers/(?:{alt})/(?:{'|'.join(modules)})/kernel",
                       then=adapters.lora(2, alpha=4.0, dropout=dropout))]
    a = tree.assign(params, rules)
    st = adapters.init(a, jax.random.key(0), params)
    rng = np.random.default_rng(1)  # non-zero B: the adapter changes outputs
    st = adapters.AdapterState(
        {p: t._replace(b=jnp.asarray(rng.standard_normal(t.b.shape), jnp.float32))
         for p, t in st.trainable.items()}, st.frozen)
    return params, io.save_peft(d, a, st, params, key_map=key_map())


def load(d, params, **kw):
    return io.load_peft(d, params, key_map=key_map(), **kw)


def test_target_that_selects_nothing_is_an_error(tmp_path):
    params, d = write(tmp_path / "ad")
    _edit_config(d, target_modules=["zzz"])
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules="
                                         r"\['zzz'\] selects no module"):
        load(d, params)
    _edit_config(d, target_modules=r"model\.blocks\.\d\.norm")  # a norm: not adaptable
    with pytest.raises(ValueError, match=r"selects 'model.blocks.0.norm', a vector tensor"):
        load(d, params)


def test_tensors_of_unselected_modules_are_errors(tmp_path):
    params, d = write(tmp_path / "ad")  # q and v of both layers
    assert len(load(d, params).assignment) == 4
    _edit_config(d, target_modules=["q"])
    with pytest.raises(ValueError, match=r"tensors for 2 module\(s\) that .*adapter_"
                                         r"config.json does not select.*'model.blocks.0.v' "
                                         r"\('layers/0/v/kernel'\): target_modules="
                                         r"\['q'\] does not match it"):
        load(d, params)


def test_exclude_modules_excluding_tensors_is_an_error(tmp_path):
    params, d = write(tmp_path / "ad")
    _edit_config(d, exclude_modules=["v"])
    with pytest.raises(ValueError, match=r"'model.blocks.1.v' \('layers/1/v/kernel'\): "
                                         r"exclude_modules=\['v'\] excludes it"):
        load(d, params)
    _edit_config(d, exclude_modules=r".*1\.q")  # a regex, matched in full
    with pytest.raises(ValueError, match=r"'model.blocks.1.q' .*exclude_modules='\.\*1"):
        load(d, params)
    params, d = write(tmp_path / "ad2", modules=("q",))  # the file agrees: loads
    _edit_config(d, target_modules=["q", "v"], exclude_modules=["v"])
    assert sorted(load(d, params).assignment) == ["layers/0/q/kernel", "layers/1/q/kernel"]


def test_layers_to_transform_excluding_a_layer_with_tensors_is_an_error(tmp_path):
    params, d = write(tmp_path / "ad")
    _edit_config(d, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"'model.blocks.1.q' \('layers/1/q/kernel'\): "
                                         r"layers_to_transform=\[0\] \(layers_pattern="
                                         r"None\) leaves out its layer 1"):
        load(d, params)
    _edit_config(d, layers_to_transform=1, layers_pattern="blocks")
    with pytest.raises(ValueError, match=r"'model.blocks.0.q' .*layers_to_transform=1 "
                                         r"\(layers_pattern='blocks'\) leaves out its "
                                         "layer 0"):
        load(d, params)
    _edit_config(d, layers_to_transform=[0], layers_pattern="layers")  # no such name
    with pytest.raises(ValueError, match="selects no module"):
        load(d, params)
    params, d = write(tmp_path / "ad2", layers=(1,))  # the file agrees: loads
    _edit_config(d, target_modules=["q", "v"], layers_to_transform=[1])
    assert sorted(load(d, params).assignment) == ["layers/1/q/kernel", "layers/1/v/kernel"]
    _edit_config(d, target_modules=r".*\.(q|v)")  # PEFT refuses layers with a regex
    with pytest.raises(ValueError, match="cannot be used with a regex"):
        load(d, params)


def test_selected_module_without_tensors_is_an_error(tmp_path):
    params, d = write(tmp_path / "ad", layers=(0,))
    _edit_config(d, target_modules=["q", "v"])  # selects layer 1 too
    with pytest.raises(ValueError, match=r"target_modules=\['q', 'v'\] in .*adapter_"
                                         r"config.json selects 2 module\(s\) .* no "
                                         r"tensors in .*adapter_model.safetensors: "
                                         r"\['model.blocks.1.q', 'model.blocks.1.v'\]"):
        load(d, params)


def test_all_linear_needs_the_output_modules(tmp_path):
    params, d = write(tmp_path / "ad")
    _edit_config(d, target_modules="all-linear")
    with pytest.raises(ValueError, match="all-linear.*output_modules"):
        load(d, params)
    assert len(load(d, params, output_modules=("head",)).assignment) == 4
    with pytest.raises(ValueError, match=r"no tensors in .*: \['head'\]"):
        load(d, params, output_modules=())


def test_wrong_typed_fields_name_the_file(tmp_path):
    params, d = write(tmp_path / "ad")
    for field, value in [("target_modules", 3), ("layers_to_transform", "0"),
                         ("layers_to_transform", [True]), ("exclude_modules", [1]),
                         ("lora_dropout", "0.1"), ("lora_dropout", 1.5), ("r", 2.0),
                         ("rank_pattern", {"q": "2"}), ("use_rslora", "yes")]:
        _edit_config(d, **{field: value})
        with pytest.raises(ValueError, match=rf"adapter_config.json: wrong-typed "
                                             rf"fields: {field}="):
            load(d, params)
        params, d = write(tmp_path / "ad")


def test_vera_dropout_and_ia3_on_an_embedding_are_refused(tmp_path):
    params = make_params()
    for name, then in (("vera", adapters.vera(2, max_in=D, max_out=D)),
                       ("ia3", adapters.ia3())):
        a = tree.assign(params, [tree.Rule(where=r"layers/\d+/q/kernel", then=then)])
        d = io.save_peft(tmp_path / name, a, adapters.init(a, jax.random.key(0), params),
                         params, key_map=key_map())
        assert sorted(load(d, params).assignment) == ["layers/0/q/kernel",
                                                      "layers/1/q/kernel"]
        if name == "vera":  # peftjax's VeRA has no input dropout
            _edit_config(d, vera_dropout=0.1)
            with pytest.raises(ValueError, match=r"adapter_config.json: VERA .*"
                                                 r"vera_dropout=0.1"):
                load(d, params)
        else:  # PEFT's (IA)³ adapts Linear modules only
            _edit_config(d, target_modules=["q", "embed"])
            with pytest.raises(ValueError, match=r"selects the embedding\(s\) "
                                                 r"\['embed'\]; PEFT's IA3"):
                load(d, params)


def test_unmatched_pattern_key_warns_as_peft_does(tmp_path):
    params, d = write(tmp_path / "ad")
    _edit_config(d, alpha_pattern={"zz": 3.0})
    with pytest.warns(RuntimeWarning, match=r"\['alpha_pattern: zz'\]"):
        load(d, params)


def test_lora_dropout_is_kept_and_used_on_the_factored_training_path(tmp_path):
    """lora_dropout=0.1 reaches the adapters: training outputs differ from the
    evaluation ones, which equal the merged weights'; with 0.0 they are equal."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((64, D)), jnp.float32)

    def f(p, x):
        return jnp.tanh(x @ p["layers"][0]["q"]["kernel"]) @ p["layers"][1]["v"]["kernel"]

    outs = {}
    for rate in (0.1, 0.0):
        params, d = write(tmp_path / f"ad{rate}", dropout=rate)
        assert json.loads((d / "adapter_config.json").read_text())["lora_dropout"] == rate
        back = load(d, params)
        assert {a.dropout for a in back.assignment.values()} == {rate}
        run = factored.transform(f, back.assignment, *back.state, key=jax.random.key(3))
        ev = factored.transform(f, back.assignment, *back.state, deterministic=True)
        outs[rate] = (run(params, x), ev(params, x))
    train, ev = outs[0.1]
    merged = adapters.materialize(back.assignment, params, *back.state,
                                  deterministic=True)  # rate 0.0: same tensors
    np.testing.assert_allclose(ev, f(merged, x), **MATMUL_F32)  # eval: no dropout
    assert float(jnp.max(jnp.abs(train - ev))) > 0.05  # training: dropout acts
    train, ev = outs[0.0]
    np.testing.assert_allclose(train, ev, **MATMUL_F32)  # and only dropout does
    params, d = write(tmp_path / "ad0.1b", dropout=0.1)
    back = load(d, params)
    with pytest.raises(ValueError, match="input dropout"):  # not in weight space
        adapters.materialize(back.assignment, params, *back.state)


def _at(path):
    return re.escape(str(path))


def test_malformed_adapter_config_names_the_file(tmp_path):
    params, d = write(tmp_path / "ad")
    cfg = d / "adapter_config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-5])  # truncated
    with pytest.raises(ValueError, match=rf"load_peft: {_at(cfg)} is not valid JSON: "
                                         r".* at line \d+, column \d+ \(char \d+\)"):
        load(d, params)
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{_at(cfg)} must hold a JSON object, got list"):
        load(d, params)


def test_malformed_json_of_model_directories_names_the_file(tmp_path):
    from peftjax.models import bert, load_chat_template, load_tokenizer

    bad = '{"hidden_size": 16,,}'
    for name, fn in (("llama", llama.load_llama), ("bert", bert.load_bert)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(bad)
        with pytest.raises(ValueError, match=rf"{_at(d / 'config.json')} is not valid "
                                             r"JSON: .* at line 1, column 20"):
            fn(d)
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text('{"chat_template": "x"')
    with pytest.raises(ValueError, match=rf"{_at(d / 'tokenizer_config.json')} is not "
                                         "valid JSON"):
        load_chat_template(d)
    (d / "tokenizer.json").write_text('{"version": "1.0",')
    with pytest.raises(ValueError, match=rf"{_at(d / 'tokenizer.json')} is not a "
                                         "tokenizer.json .*line 1 column"):
        load_tokenizer(d)
    index = d / "model.safetensors.index.json"
    index.write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=rf"{_at(index)} is not valid JSON"):
        io.read_safetensors_index(index)
