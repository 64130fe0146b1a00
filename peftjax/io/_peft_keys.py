# SPDX-License-Identifier: Apache-2.0
"""The key map between peftjax paths and Hugging Face module tensors.

Format code knows no model: the caller gives ``{path: PeftKey}`` for the
*unrolled* layout (``layers/{i}/...``); scanned paths (``layers/...`` with a
leading layer axis) are split over it. peftjax's models provide theirs
(``peftjax.models.llama.peft_key_map``, ``peftjax.models.bert.peft_key_map``).

A kernel that is not a plain ``(in, out)`` matrix (a head-split einsum
kernel ``(embed, heads, head_dim)``, an Equinox ``(out, in)`` weight) carries
its ``DimensionNumbers`` in its ``PeftKey``: the file holds its matrix view
(``(heads·head_dim, embed)`` in torch layout, C order, as the torch module
flattens it) and the reader reshapes it back.

Exports: ``TensorLayout``, ``PeftKey``, ``per_layer``, ``leaf_dimension_numbers``,
``layer_dims``, ``check_tied_head``.
"""

import enum
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from peftjax import tree


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
      dimension_numbers: the matrix view of a ``KERNEL`` leaf in the unrolled
        layout (None: a 2-D Flax ``(in, out)`` kernel), e.g.
        ``DimensionNumbers(reduction_axis=0, output_axis=(1, 2))`` for an
        ``(embed, heads, head_dim)`` kernel; scanned leaves shift it by their
        layer axis.

    Example:
      >>> PeftKey("lm_head", "weight", TensorLayout.KERNEL).module
      'lm_head'
    """

    module: str
    tensor: str
    layout: TensorLayout
    dimension_numbers: tree.DimensionNumbers | None = None


def check_key_map(key_map: Any, fn: str) -> dict[str, PeftKey]:
    """Validates a key map (a dict of ``PeftKey``) and returns it as a dict."""
    if not isinstance(key_map, Mapping):
        raise TypeError(f"{fn}: key_map must be a dict {{path: PeftKey}}, got "
                        f"{type(key_map).__name__}")
    for path, key in key_map.items():
        if not isinstance(key, PeftKey) or not isinstance(key.layout, TensorLayout):
            raise TypeError(f"{fn}: key_map[{path!r}] must be a PeftKey, got {key!r}")
        dn = key.dimension_numbers
        if dn is not None and (not isinstance(dn, tree.DimensionNumbers)
                               or dn.batch_axis
                               or key.layout is not TensorLayout.KERNEL):
            raise TypeError(
                f"{fn}: key_map[{path!r}].dimension_numbers must be a "
                "DimensionNumbers without batch axes, on a KERNEL key; got "
                f"{dn!r} on {key.layout}")
    return dict(key_map)


def check_tied_head(tied_head: Any, key_map: Mapping[str, PeftKey], fn: str) -> str:
    """Validates ``tied_head=(table path, head module)`` and returns the head module.

    Args:
      tied_head: the argument of ``save_peft``/``load_peft``.
      key_map: the unrolled key map.
      fn: the caller's name, for errors.

    Returns:
      The head's module name.

    Raises:
      TypeError / ValueError: not a pair of str, a table that is not an
        ``EMBEDDING`` key, or a head the key map has (an untied head).

    Example:
      >>> km = {"emb": PeftKey("model.embed", "weight", TensorLayout.EMBEDDING)}
      >>> check_tied_head(("emb", "lm_head"), km, "f")
      'lm_head'
    """
    if (not isinstance(tied_head, tuple) or len(tied_head) != 2
            or not all(isinstance(x, str) for x in tied_head)):
        raise TypeError(f"{fn}: tied_head must be (table path, head module), got "
                        f"{tied_head!r}")
    path, head = tied_head
    k = key_map.get(path)
    if k is None or k.layout is not TensorLayout.EMBEDDING:
        raise ValueError(f"{fn}: tied_head's table {path!r} is not an EMBEDDING "
                         f"leaf of the key map (got {k})")
    if any(x.module == head for x in key_map.values()):
        raise ValueError(f"{fn}: tied_head's {head!r} is a module of the key map, "
                         "i.e. an untied head with its own weight")
    return head


def leaf_dimension_numbers(key: PeftKey, ndim: int, n_batch: int
                           ) -> tree.DimensionNumbers | None:
    """``key.dimension_numbers`` for a rank-``ndim`` leaf with ``n_batch`` layer axes.

    Args:
      key: the unrolled key.
      ndim: the leaf's rank (with its leading layer axis when scanned).
      n_batch: 0 (unrolled) or 1 (scanned).

    Returns:
      None for the Flax default of an unrolled leaf, else the key's axes
      (default ``(in, out)``) shifted past the layer axis, which becomes
      ``batch_axis``: a scanned leaf's view is always explicit.

    Example:
      >>> k = PeftKey("q", "weight", TensorLayout.KERNEL,
      ...             tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2)))
      >>> leaf_dimension_numbers(k, 4, 1)
      DimensionNumbers(reduction_axis=(1,), output_axis=(2, 3), batch_axis=(0,))
    """
    dn = key.dimension_numbers
    if not n_batch:
        return dn
    if dn is None:
        dn = tree.default_dimension_numbers(2)
    rank = ndim - n_batch

    def shift(axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(a % rank + n_batch for a in axes)

    return tree.DimensionNumbers(reduction_axis=shift(dn.reduction_axis),
                                    output_axis=shift(dn.output_axis),
                                    batch_axis=tuple(range(n_batch)))


def layer_dims(key: PeftKey, shape: tuple[int, ...], n_batch: int,
               path: str) -> tree.ResolvedDims:
    """The matrix view of a leaf of ``shape`` under ``key`` (scanned: ``n_batch=1``).

    Args:
      key: the unrolled key (its ``dimension_numbers``, or the Flax default).
      shape: the leaf's shape (with its leading layer axis when scanned).
      n_batch: 0 (unrolled) or 1 (scanned).
      path: for errors.

    Returns:
      The resolved dims.

    Example:
      >>> k = PeftKey("q", "weight", TensorLayout.KERNEL,
      ...             tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2)))
      >>> d = layer_dims(k, (2, 8, 4, 2), 1, "layers/q/kernel")
      >>> d.batch, d.reduction, d.output, d.n_in, d.n_out
      ((0,), (1,), (2, 3), 8, 8)
    """
    dn = leaf_dimension_numbers(key, len(shape), n_batch)
    return tree.resolve(dn, tuple(shape), path=path)


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
