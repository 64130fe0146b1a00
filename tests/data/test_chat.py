"""chat_format: HF-style chat templates rendered as transformers renders them."""

import json

import pytest

from peftjax import data

CONV = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": 'Say "hi" <b>'},
                     {"role": "assistant", "content": "hi"}]}

# Templates exercising what Hub templates use: bos/eos, loop.first/last,
# trim/lstrip of block tags, tojson (no HTML escaping), loop controls,
# namespace, {% generation %}, tools (None), add_generation_prompt.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama2_like": (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'system' %}\n"
        "<<SYS>>{{ m.content | trim }}<</SYS>>\n"
        "    {% elif m.role == 'user' %}\n"
        "[INST] {{ m.content }} [/INST]\n"
        "    {% else %}\n"
        "{% generation %} {{ m.content }} {{ eos_token }}{% endgeneration %}\n"
        "    {% endif %}\n"
        "{% endfor %}"),
    "tojson_namespace_break": (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}"
        "count={{ ns.n }} tools={{ tools }} {{ dict(a=1) | tojson }}"
        "{% if add_generation_prompt %}GEN{% endif %}"),
}


def _reference(template, messages, **kw):
    """transformers' own rendering (a trivial tokenizer: only its special tokens matter)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<s>", eos_token="</s>")
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_format_matches_transformers(name, gen):
    fmt = data.chat_format(TEMPLATES[name], bos_token="<s>", eos_token="</s>",
                           add_generation_prompt=gen)
    got = fmt(CONV)
    assert got == _reference(TEMPLATES[name], CONV["messages"], add_generation_prompt=gen)
    assert "hi" in got


def test_chat_format_passes_record_keys_and_drops_none():
    fmt = data.chat_format("{{ tools | tojson }}|{{ lang }}|{{ messages[0] | tojson }}"
                           "|{{ bos_token }}", bos_token="<s>")
    rec = {"messages": [{"role": "user", "content": "q", "name": None}],
           "tools": [{"name": "f"}], "lang": "fr", "bos_token": "IGNORED"}
    assert fmt(rec) == '[{"name": "f"}]|fr|{"role": "user", "content": "q"}|<s>'


def test_chat_format_allows_tool_calls_without_content():
    fmt = data.chat_format("{% for m in messages %}{{ m.role }}{% endfor %}")
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}]}
    assert fmt(rec) == "userassistant"


@pytest.mark.parametrize("record,match", [
    ({"text": "x"}, r"no 'messages' \(keys: \['text'\]\)"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": ["hi"]}, "message 0 is a str"),
    ({"messages": [{"content": "x"}]}, "message 0 has no string 'role'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user"}]},
     r"message 1 \(role 'user'\) has no 'content'"),
    ({"messages": [{"role": "user", "content": "a", "x": object()}]},
     r"messages\[0\]\['x'\] is a object"),
])
def test_chat_format_rejects_bad_records(record, match):
    fmt = data.chat_format("{{ messages[0].content }}")
    with pytest.raises(ValueError, match=match):
        fmt(record)


def test_chat_format_template_errors():
    with pytest.raises(ValueError, match=r"syntax error at line 2: .*endfor"):
        data.chat_format("ok\n{% for m in messages %}{{ m }}")
    with pytest.raises(ValueError, match="template must be a str"):
        data.chat_format(None)
    strict = data.chat_format("{% if messages[0].role != 'system' %}"
                              "{{ raise_exception('System role required') }}{% endif %}")
    with pytest.raises(ValueError, match="the chat template raised: System role required"):
        strict({"messages": [{"role": "user", "content": "q"}]})


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",  # immutable sandbox: no mutation of inputs
])
def test_chat_format_sandbox(template):
    with pytest.raises(ValueError, match="SecurityError"):
        data.chat_format(template)({"messages": [{"role": "user", "content": "q"}]})


def test_read_jsonl_with_chat_format_round_trip(tmp_path):
    template = TEMPLATES["chatml"]
    convs = [CONV, {"messages": [{"role": "user", "content": "ça va? 🙂"},
                                 {"role": "assistant", "content": "oui\nmerci"}]}]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in convs) + "\n\n",
                 encoding="utf-8")
    fmt = data.chat_format(template)
    docs = data.read_jsonl(p, format=fmt)
    assert docs == [fmt(c) for c in convs]
    assert docs[1] == ("<|im_start|>user\nça va? 🙂<|im_end|>\n"
                       "<|im_start|>assistant\noui\nmerci<|im_end|>\n")
    # a bad record is named by its line
    p.write_text(json.dumps(CONV) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: chat_format: the record has no 'messages'"):
        data.read_jsonl(p, format=fmt)
