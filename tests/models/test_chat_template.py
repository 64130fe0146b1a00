"""load_chat_template: the template a checkpoint stores (GGUF and HF), rendered
against transformers' own ``apply_chat_template``; the recipe's chat JSONL path."""

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest

from peftjax import data, models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONV = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."}]

# SmolLM2's template is ChatML with a default system prompt added when the
# conversation has none: written out by hand as a second, independent check.
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
          "<|im_start|>assistant\n4.<|im_end|>\n")


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2 GGUF's stored template (reads the metadata only, ~4 s)."""
    return models.load_chat_template(models.smollm2_gguf())


def _transformers_render(t, messages, **kw):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tm.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token=t.bos_token, eos_token=t.eos_token)
    return tok.apply_chat_template(messages, chat_template=t.template, tokenize=False, **kw)


@pytest.mark.parametrize("gen", [False, True])
def test_smollm2_gguf_template_renders_as_transformers(smollm2, gen):
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    fmt = data.chat_format(smollm2.template, bos_token=smollm2.bos_token,
                           eos_token=smollm2.eos_token, add_generation_prompt=gen)
    got = fmt({"messages": CONV})
    assert got == _transformers_render(smollm2, CONV, add_generation_prompt=gen)
    assert got == CHATML + ("<|im_start|>assistant\n" if gen else "")


def _write_gguf(path, **kv):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["<unk>", "<s>", "</s>"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for k, v in kv.items():
        w.add_string(k, v)
    w.add_tensor("t", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_and_without_template(tmp_path):
    p = tmp_path / "chat.gguf"
    _write_gguf(p, **{"tokenizer.chat_template": "{{ bos_token }}x"})
    assert models.load_chat_template(p) == models.ChatTemplate("{{ bos_token }}x", "<s>", "</s>")
    q = tmp_path / "plain.gguf"
    _write_gguf(q)
    with pytest.raises(ValueError, match=r"plain\.gguf' has no tokenizer\.chat_template"):
        models.load_chat_template(q)


def _hf_dir(root, name, config=None, jinja=None):
    d = root / name
    d.mkdir()
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    return d


def test_hf_directory_forms(tmp_path):
    toks = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    d = _hf_dir(tmp_path, "str", {"chat_template": "A", **toks})
    assert models.load_chat_template(d) == models.ChatTemplate("A", "<s>", "</s>")
    d = _hf_dir(tmp_path, "list", {"chat_template": [{"name": "tool_use", "template": "T"},
                                                     {"name": "default", "template": "D"}]})
    assert models.load_chat_template(d) == models.ChatTemplate("D", "", "")
    d = _hf_dir(tmp_path, "jinja", {"chat_template": "old", **toks}, jinja="new")
    assert models.load_chat_template(d) == models.ChatTemplate("new", "<s>", "</s>")
    d = _hf_dir(tmp_path, "nodefault", {"chat_template": [{"name": "rag", "template": "R"}]})
    with pytest.raises(ValueError, match=r"lists chat templates \['rag'\] but none named"):
        models.load_chat_template(d)
    with pytest.raises(ValueError, match="stores no chat template"):
        models.load_chat_template(models.minilm_dir())  # a BERT: no template
    with pytest.raises(ValueError, match="neither a .gguf file nor a directory"):
        models.load_chat_template(tmp_path / "missing")


@pytest.fixture(scope="module")
def lm_module():
    spec = importlib.util.spec_from_file_location(
        "_lm_chat_test", os.path.join(ROOT, "experiments", "_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_documents_formats_chat_jsonl(tmp_path, lm_module, smollm2):
    model = _hf_dir(tmp_path, "model", {"chat_template": smollm2.template,
                                        "bos_token": smollm2.bos_token,
                                        "eos_token": smollm2.eos_token})
    src = tmp_path / "mixed.jsonl"
    src.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    docs = lm_module.documents(str(src), model=str(model))
    assert docs == {"000000": CHATML, "000001": "plain"}
    # plain text records need no checkpoint; chat records do
    txt = tmp_path / "text.jsonl"
    txt.write_text(json.dumps({"text": "a"}) + "\n")
    assert lm_module.documents(str(txt)) == {"000000": "a"}
    with pytest.raises(ValueError, match=r"line 1: .*holds chat records"):
        lm_module.documents(str(src))
    bare = _hf_dir(tmp_path, "bare", {"eos_token": "</s>"})
    with pytest.raises(ValueError, match=r"'.*bare' stores no chat template"):
        lm_module.documents(str(src), model=str(bare))
