# SPDX-License-Identifier: Apache-2.0
"""The key map between peftjax paths and Hugging Face module tensors.

Format code knows no model: the caller gives ``{path: PeftKey}`` for the
*unrolled* layout (``layers/{i}/...``); scanned paths (``layers/...`` with a
leading layer axis) are split over it. peftjax's models provide theirs
(``peftjax.models.llama.peft_key_map``, ``peftjax.models.bert.peft_key_map``).

Exports: ``TensorLayout``, ``PeftKey``, ``per_layer``.
"""

import enum
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax


class TensorLayout(enum.Enum):
    """How a peftjax leaf and its torch tensor relate.

    Attributes:
      KERNEL: a Flax kernel ``(in, out)`` of a torch ``nn.Linear`` weight
        ``(out, in)`` (transposed; LoRA keys ``lora_A.weight``/``lora_B.weight``).
      EMBEDDING: an embedding table ``(num_embeddings, dim)``, the same in
        both (LoRA keys ``lora_embedding_A``/``lora_embedding_B``).
      VECTOR: a bias or norm scale, the same in both.
    """

    KERNEL = "kernel"
    EMBEDDING = "embedding"
    VECTOR = "vector"


class PeftKey(NamedTuple):
    """Where one peftjax leaf lives in a Hugging Face (torch) model.

    Attributes:
      module: the module name, e.g. ``"model.layers.0.self_attn.q_proj"``
        (PEFT files prefix it with ``base_model.model.``).
      tensor: the parameter name in that module (``"weight"``, ``"bias"``).
      layout: a ``TensorLayout``.

    Example:
      >>> PeftKey("lm_head", "weight", TensorLayout.KERNEL).module
      'lm_head'
    """

    module: str
    tensor: str
    layout: TensorLayout


def check_key_map(key_map: Any, fn: str) -> dict[str, PeftKey]:
    """Validates a key map (a dict of ``PeftKey``) and returns it as a dict."""
    if not isinstance(key_map, Mapping):
        raise TypeError(f"{fn}: key_map must be a dict {{path: PeftKey}}, got "
                        f"{type(key_map).__name__}")
    for path, key in key_map.items():
        if not isinstance(key, PeftKey) or not isinstance(key.layout, TensorLayout):
            raise TypeError(f"{fn}: key_map[{path!r}] must be a PeftKey, got {key!r}")
    return dict(key_map)


def per_layer(path: str, value: Any, n_batch: int, key_map: Mapping[str, PeftKey],
              prefix: str, fn: str) -> list[tuple[str, Any]]:
    """Splits a (possibly scanned) path's per-matrix value into unrolled paths.

    Args:
      path: the state's path (unrolled, or scanned under ``prefix``).
      value: a pytree whose leaves carry ``n_batch`` leading batch axes.
      n_batch: 0 (an unrolled leaf) or 1 (the layer axis of a scanned leaf).
      key_map: the unrolled key map.
      prefix: the layer container path (``"layers"``).
      fn: the caller's name, for errors.

    Returns:
      ``[(unrolled path, per-matrix value), ...]``.

    Raises:
      ValueError: a path the key map does not cover, or other batch axes.

    Example:
      >>> import jax.numpy as jnp
      >>> km = {f"layers/{i}/w": PeftKey(f"l.{i}", "weight", TensorLayout.KERNEL)
      ...       for i in range(2)}
      >>> [p for p, _ in per_layer("layers/w", jnp.zeros((2, 3)), 1, km, "layers", "f")]
      ['layers/0/w', 'layers/1/w']
    """
    if n_batch == 0 and path in key_map:
        return [(path, value)]
    head = prefix + "/"
    if n_batch == 1 and path.startswith(head):
        rest = path[len(head):]
        if f"{head}0/{rest}" in key_map:
            n = jax.tree.leaves(value)[0].shape[0]
            out = [(f"{head}{i}/{rest}", jax.tree.map(lambda x, i=i: x[i], value))
                   for i in range(n)]
            missing = [p for p, _ in out if p not in key_map]
            if missing:
                raise ValueError(f"{fn}: {path!r} stacks {n} layers, but the key "
                                 f"map lacks {missing[:4]}")
            return out
    if n_batch > 1 or (n_batch == 1 and path in key_map):
        raise ValueError(
            f"{fn}: {path!r} has {n_batch} batch axes; only a scanned layer axis "
            f"under {prefix!r} can be split into PEFT modules"
        )
    near = [k for k in key_map if k.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]]
    hint = re.sub(r"/\d+/", "/{i}/", near[0]) if near else "none"
    raise ValueError(
        f"{fn}: {path!r} is not in the key map (unrolled paths such as {hint!r}); "
        "pass the key map of this model"
    )
