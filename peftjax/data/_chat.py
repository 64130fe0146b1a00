# SPDX-License-Identifier: Apache-2.0
"""Instruction data rendered with a checkpoint's own Jinja chat template.

Hugging Face and GGUF checkpoints store how a conversation becomes text as a
Jinja template (``tokenizer_config.json`` ``chat_template``, GGUF
``tokenizer.chat_template``; ``peftjax.models.load_chat_template`` reads it).
``chat_format`` renders it the way transformers' ``apply_chat_template`` does:
an ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension and ``{% generation %}``
blocks, the ``raise_exception``, ``strftime_now``, ``namespace`` and ``dict``
globals and a ``tojson`` filter that does not escape HTML. Templates are data,
never code run outside the sandbox, and a record reaches them as plain JSON
values only.

Requires ``jinja2>=3.1.6`` (installed with transformers; imported when
``chat_format`` is called). Earlier versions have known sandbox escapes.

Exports: ``chat_format``.
"""

import datetime
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

_CONTEXT = ("bos_token", "eos_token", "add_generation_prompt")


@functools.cache
def _environment() -> Any:
    """The shared sandboxed environment (immutable, so one serves all templates)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:  # pragma: no cover - jinja2 ships with transformers
        raise ImportError("chat_format needs jinja2>=3.1.6 (pip install jinja2)") from e
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < (3, 1, 6):
        raise ImportError(f"chat_format needs jinja2>=3.1.6 (earlier versions have "
                          f"sandbox escapes); found {jinja2.__version__}")

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore attributes (as transformers)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r} starts with an underscore")

    class Dict:
        """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       namespace=Namespace, dict=Dict())
    return env


def _plain(value: Any, where: str) -> Any:
    """A copy made of JSON types only (what the template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"chat_format: {where} is a {type(value).__name__}; records must "
                     f"hold JSON values only (str, int, float, bool, None, list, dict)")


def _messages(record: Any) -> list[dict]:
    if not isinstance(record, Mapping) or "messages" not in record:
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"chat_format: the record has no 'messages' (keys: {keys})")
    messages = record["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"chat_format: 'messages' must be a non-empty list of "
                         f"{{'role', 'content'}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"chat_format: message {i} is a {type(m).__name__}, "
                             f"not a {{'role', 'content'}} dict")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"chat_format: message {i} has no string 'role' "
                             f"(keys: {sorted(m)})")
        content = m.get("content")
        tool_call = content is None and m.get("tool_calls")
        if not (isinstance(content, (str, list)) or tool_call):
            raise ValueError(f"chat_format: message {i} (role {m['role']!r}) has no "
                             f"'content' string or list (keys: {sorted(m)})")
        # as transformers: keys set to None are dropped (templates test presence)
        out.append({k: v for k, v in m.items() if v is not None})
    return _plain(out, "messages")


def chat_format(template: str, *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = False) -> Callable[[Mapping], str]:
    """A ``record -> text`` function: ``record["messages"]`` through a chat template.

    The template sees ``messages``, ``bos_token``, ``eos_token``,
    ``add_generation_prompt``, ``tools`` and ``documents`` (None unless the
    record has them) and every other key of the record (e.g. a per-record
    system prompt variable); the arguments here win over record keys of the
    same name. The output matches transformers' ``apply_chat_template(...,
    tokenize=False)`` for the same template and special tokens. Pass the
    result to ``read_jsonl(path, format=...)``.

    Requires ``jinja2>=3.1.6`` (imported here, not by ``peftjax.data``).

    Args:
      template: the Jinja chat template, e.g. from
        ``peftjax.models.load_chat_template(path).template``.
      bos_token: the string ``{{ bos_token }}`` renders (the checkpoint's BOS).
      eos_token: the string ``{{ eos_token }}`` renders (the checkpoint's EOS).
      add_generation_prompt: end with the template's assistant header (for
        prompting; training data usually wants False).

    Returns:
      ``format(record) -> str``. It raises ``ValueError`` for a record
      without a non-empty ``"messages"`` list, a message without a string
      ``"role"`` or without ``"content"`` (a string or a list of content
      blocks; None is allowed only beside ``"tool_calls"``), a non-JSON value,
      or a template that fails while rendering (``raise_exception``'s message
      and Jinja errors are quoted).

    Raises:
      ValueError: ``template`` is not a string or has a Jinja syntax error
        (the line and the problem are named).
      ImportError: jinja2 is missing or older than 3.1.6.

    Example:
      >>> fmt = chat_format(
      ...     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\\n"
      ...     "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
      ...     eos_token="</s>")
      >>> print(fmt({"messages": [{"role": "user", "content": "Hi"},
      ...                         {"role": "assistant", "content": "Hello."}]}))
      <|user|>Hi</s>
      <|assistant|>Hello.</s>
      <BLANKLINE>
    """
    if not isinstance(template, str):
        raise ValueError(f"chat_format: template must be a str, "
                         f"got {type(template).__name__}")
    env = _environment()
    import jinja2

    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_format: the chat template has a syntax error at line "
                         f"{e.lineno}: {e.message}") from e
    fixed = {"bos_token": bos_token, "eos_token": eos_token,
             "add_generation_prompt": bool(add_generation_prompt)}

    def format(record: Mapping) -> str:
        messages = _messages(record)
        extra = {k: _plain(v, repr(k)) for k, v in record.items()
                 if k != "messages" and k not in _CONTEXT}
        context = {"tools": None, "documents": None, **extra, **fixed,
                   "messages": messages}
        try:
            return compiled.render(**context)
        except jinja2.TemplateError as e:  # raise_exception, undefined, sandbox
            kind = "raised" if type(e) is jinja2.TemplateError else type(e).__name__
            raise ValueError(f"chat_format: the chat template {kind}: {e}") from e

    return format
