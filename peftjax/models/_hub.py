# SPDX-License-Identifier: Apache-2.0
"""Resolving checkpoint locations: local directories and Hugging Face Hub ids.

A local path is used as is. A string that is not a local path but looks like a
Hub id (``"org/name"``) is fetched through ``huggingface_hub`` (config,
tokenizer and safetensors files only) into its cache, and the cached directory
goes through the same directory loaders. Offline (``HF_HUB_OFFLINE=1`` or no
network) this fails with a ``ValueError`` that says to pass a local path.

Exports: ``resolve_directory``, ``read_hf_weights``.
"""

import os
import re

import numpy as np

from peftjax import io as pio

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_directory(path: str | os.PathLike, *, what: str) -> str:
    """Returns a local checkpoint directory for a path or a Hub id.

    Args:
      path: a local directory, or a Hub id such as ``"HuggingFaceTB/SmolLM2-135M"``.
      what: the caller's name, for error messages.

    Returns:
      The directory.

    Raises:
      ValueError: a missing local path, or a Hub id that cannot be fetched
        (offline, unknown repository).

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> resolve_directory(d, what="doc") == d
      True
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not _HUB_ID.fullmatch(path):
        raise ValueError(
            f"{what}: {path!r} is not a checkpoint directory (expected a "
            "directory with config.json and safetensors, a .gguf file, "
            "or a Hugging Face Hub id)"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        import huggingface_hub

        return huggingface_hub.snapshot_download(
            path, allow_patterns=_PATTERNS, local_files_only=offline
        )
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise ValueError(
            f"{what}: {path!r} is not a local path and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}). Offline, pass a local "
            "path: a directory with config.json + model.safetensors, or a .gguf file."
        ) from e


def read_hf_weights(directory: str, *, what: str) -> dict[str, np.ndarray]:
    """Reads ``model.safetensors`` or the sharded ``model.safetensors.index.json``.

    Args:
      directory: the checkpoint directory.
      what: the caller's name, for error messages.

    Returns:
      ``{tensor name: array}`` in the stored dtype and torch layout.

    Raises:
      ValueError: neither file exists (pickled ``.bin`` checkpoints are refused).
    """
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return pio.read_safetensors(single)[0]
    if os.path.isfile(index):
        return pio.read_safetensors_index(index)[0]
    pickled = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (
        (
            f"; found pickled weights {pickled[:3]}, which peftjax never loads "
            "(convert them to safetensors)"
        )
        if pickled
        else ""
    )
    raise ValueError(
        f"{what}: {directory!r} has neither model.safetensors nor "
        f"model.safetensors.index.json{hint}"
    )
