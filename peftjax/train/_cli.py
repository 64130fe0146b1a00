# SPDX-License-Identifier: Apache-2.0
"""A frozen dataclass as a command line: ``--field=value`` flags, ``--help``, ``--smoke``.

The experiments and benchmarks describe their settings as one frozen
dataclass; ``parse_config`` builds it from ``sys.argv[1:]``. Field types
``bool``, ``int``, ``float``, ``str``, ``tuple[T, ...]`` (comma-separated) and
``T | None`` (``none`` or an empty value gives ``None``) are understood.
``--flag`` alone sets a bool field to true. ``--help`` prints every field
with its default and help sentence (``option(default, help)``). A script's
small settings (its "smoke" mode) are a dict handed to ``parse_config``:
``--smoke`` fills the fields that were not given with them; fields given on
the command line are kept, even when equal to their default.

Exports: ``parse_config``, ``option``, ``config_help``.
"""

import dataclasses
import os
import sys
import textwrap
import types
import typing
from typing import Any

_TRUE = ("1", "true", "yes", "")
_FALSE = ("0", "false", "no")


def option(default: Any, help: str) -> Any:  # noqa: A002  (argparse's name)
    """A configuration field with its ``--help`` sentence.

    Args:
      default: the field's default value (an immutable value: the
        configuration is frozen).
      help: one sentence saying what the field sets; ``--help`` prints it.

    Returns:
      A ``dataclasses.field`` carrying the help sentence in its metadata.

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class Config:
      ...     rank: int = option(8, "LoRA rank.")
      >>> dataclasses.fields(Config)[0].metadata["help"]
      'LoRA rank.'
    """
    if not isinstance(help, str) or not help.strip():
        raise ValueError(f"option(default={default!r}): every option needs a help sentence, "
                         f"got help={help!r}")
    return dataclasses.field(default=default, metadata={"help": help.strip()})


def _check_class(cls: Any, where: str) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{where}: cls must be a dataclass type, got {cls!r}")
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{where}: {cls.__name__} must be a frozen dataclass "
                        "(@dataclasses.dataclass(frozen=True))")


def _shown(value: Any) -> str:
    """A value as it would be typed on the command line, where that is clear."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        return repr(value)
    return str(value)


def _convert(name: str, typ: Any, text: str) -> Any:
    """``text`` given for ``--name`` as a value of type ``typ``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == len(typing.get_args(typ)) or len(args) != 1:
            raise TypeError(f"--{name}: unions other than `T | None` are not supported, "
                            f"got {typ}")
        if text.lower() in ("none", ""):
            return None
        typ = args[0]
        origin = typing.get_origin(typ)
    if typ is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"--{name}: expected true/false, got {text!r}")
    if origin is tuple:
        args = typing.get_args(typ)
        items = [t for t in text.split(",") if t]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(name, args[0], t) for t in items)
        if len(items) != len(args):
            raise ValueError(f"--{name}: expected {len(args)} comma-separated values "
                             f"({typ}), got {text!r}")
        return tuple(_convert(name, a, t) for a, t in zip(args, items, strict=True))
    if typ not in (int, float, str):
        raise TypeError(f"--{name}: fields of type {typ} cannot be set on the command line "
                        "(bool, int, float, str, tuple[T, ...] and T | None can)")
    try:
        return typ(text)
    except ValueError as e:
        raise ValueError(f"--{name}: cannot parse {text!r} as {typ.__name__}") from e


def config_help(cls: type, *, smoke: dict[str, Any] | None = None,
                prog: str | None = None) -> str:
    """The ``--help`` text of a configuration dataclass.

    Args:
      cls: the frozen configuration dataclass; its docstring heads the text.
      smoke: the settings ``--smoke`` implies, shown next to each default.
      prog: the program name in the usage line (default: the running script).

    Returns:
      One line per field (``--name  (default: value; --smoke: value)``)
      followed by its help sentence, wrapped.

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class Config:
      ...     '''Train.'''
      ...     steps: int = option(100, "Optimizer updates.")
      ...     smoke: bool = option(False, "Tiny settings.")
      >>> print(config_help(Config, smoke={"steps": 2}, prog="x.py").splitlines()[5])
        --steps  (default: 100; --smoke: 2)
    """
    _check_class(cls, "config_help")
    prog = prog or os.path.basename(sys.argv[0]) or "script"
    lines = [f"usage: {prog} [--option=value ...]   (--flag alone sets a flag to true)",
             "", (cls.__doc__ or "").strip(), "", "options:"]
    for f in dataclasses.fields(cls):
        default = ("required" if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING
                   else "default: " + _shown(f.default if f.default is not dataclasses.MISSING
                                             else f.default_factory()))
        line = f"  --{f.name}  ({default}"
        if smoke and f.name in smoke:
            line += f"; --smoke: {_shown(smoke[f.name])}"
        lines.append(line + ")")
        text = f.metadata.get("help", "")
        lines += ["      " + t for t in textwrap.wrap(text, 74)] if text else []
    lines += ["  -h, --help", "      Print this help and exit."]
    return "\n".join(lines)


def parse_config(cls: type, argv: list[str], *,
                 smoke: dict[str, Any] | None = None) -> Any:
    """Builds a frozen configuration dataclass from ``--field=value`` arguments.

    ``--flag`` alone sets a bool field to true; ``--field-name`` and
    ``--field_name`` are the same flag. ``--help`` (or ``-h``) prints
    ``config_help(cls, smoke=smoke)`` and exits with status 0. With
    ``smoke`` given and ``--smoke`` (a bool field named ``smoke``) set to
    true, ``smoke``'s values fill the fields *not* given on the command line:
    ``--smoke --rank=8`` keeps rank 8 even when 8 is the default.

    Args:
      cls: the frozen configuration dataclass. Field types: ``bool``,
        ``int``, ``float``, ``str``, ``tuple[T, ...]`` (comma-separated
        values) and ``T | None`` (``none`` or an empty value is ``None``).
      argv: the arguments, e.g. ``sys.argv[1:]``.
      smoke: the small settings ``--smoke`` implies (field -> value).

    Returns:
      An instance of ``cls``.

    Raises:
      SystemExit: on ``--help`` (status 0), and with a message naming the
        flag on an unknown flag, a positional argument or a value that does
        not parse.
      TypeError: ``cls`` is not a frozen dataclass, or ``smoke`` is given
        and ``cls`` has no bool ``smoke`` field.
      ValueError: ``smoke`` names fields ``cls`` does not have.

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class Config:
      ...     rank: int = option(8, "LoRA rank.")
      ...     steps: int = option(100, "Optimizer updates.")
      ...     smoke: bool = option(False, "Tiny settings.")
      >>> parse_config(Config, ["--smoke", "--rank=8"], smoke={"rank": 2, "steps": 3})
      Config(rank=8, steps=3, smoke=True)
    """
    _check_class(cls, "parse_config")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if smoke is not None:
        unknown = sorted(set(smoke) - set(fields))
        if unknown:
            raise ValueError(f"parse_config: smoke settings {unknown} are not fields of "
                             f"{cls.__name__} (fields: {sorted(fields)})")
        if "smoke" not in fields or hints["smoke"] is not bool:
            raise TypeError(f"parse_config: smoke= given but {cls.__name__} has no "
                            "`smoke: bool` field")
    if any(arg in ("-h", "--help") for arg in argv):
        print(config_help(cls, smoke=smoke))
        raise SystemExit(0)
    given: dict[str, Any] = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}; use --field=value")
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise SystemExit(f"unknown option --{name}; known: "
                             + ", ".join(f"--{n}" for n in fields))
        try:
            given[name] = _convert(name, hints[name], value)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    kw = {**smoke, **given} if smoke and given.get("smoke") else given  # given wins
    missing = [n for n, f in fields.items() if n not in kw and f.init
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SystemExit("missing required option(s): "
                         + ", ".join(f"--{n}=..." for n in missing))
    return cls(**kw)
