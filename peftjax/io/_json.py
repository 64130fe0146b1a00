# SPDX-License-Identifier: Apache-2.0
"""Reading a JSON file from a user's directory, with errors that name the file.

``json.load`` raises a bare ``JSONDecodeError`` ("Expecting ',' delimiter:
line 3 column 5") that says nothing of which file of a checkpoint or adapter
directory is broken. ``read_json`` reports the path and the position.

Exports: ``read_json``.
"""

import json
import os
from typing import Any


def read_json(path: str | os.PathLike, what: str, *, want_object: bool = True
              ) -> Any:
    """Parses the JSON file at ``path``.

    Args:
      path: the file.
      what: the caller's name, for error messages (``"load_peft"``).
      want_object: require a JSON object (a dict) at the top level.

    Returns:
      The parsed value (a dict when ``want_object``).

    Raises:
      ValueError: the file is not UTF-8, not valid JSON (the message gives
        the path, line, column and character offset), or not an object.

    Example:
      >>> import os, tempfile
      >>> p = os.path.join(tempfile.mkdtemp(), "config.json")
      >>> with open(p, "w") as f:
      ...     _ = f.write('{"a": 1}')
      >>> read_json(p, "demo")
      {'a': 1}
      >>> with open(p, "w") as f:
      ...     _ = f.write('{"a": 1,}')
      >>> read_json(p, "demo")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ValueError: demo: .../config.json is not valid JSON: Expecting property name \
enclosed in double quotes at line 1, column 9 (char 8)
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text (byte {e.start}): "
                         f"{e.reason}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e.msg} at line "
                         f"{e.lineno}, column {e.colno} (char {e.pos})") from e
    if want_object and not isinstance(value, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got "
                         f"{type(value).__name__}")
    return value
