# SPDX-License-Identifier: Apache-2.0
"""Layer replication: a deeper model whose repeated layers share the base weights.

Hugging Face PEFT's ``LoraConfig(layer_replication=[[0, 4], [2, 5]])``
(``tuners_utils.replicate_layers``, after the depth up-scaling of SOLAR,
https://arxiv.org/abs/2312.15166) rebuilds the layer list of a Llama or BERT
as the concatenation of the ``[start, end)`` ranges, here layers ``[0, 1, 2,
3, 2, 3, 4]``: the copies share their base weights (PEFT's ``clone_module(...,
share_weights=True)``) and each copy then carries its own LoRA, so a model
seven layers deep trains with five layers' base memory. ``num_hidden_layers``
becomes the new depth.

``replicate_layers`` is that transform on peftjax's parameter trees and
configs: a pure function of ``(params, config, layer_map)`` returning the
deeper ``(params, config)``. In the unrolled layout (``layers/{i}/...``) the
new layer ``j`` holds the very arrays of its source layer (no copy: the same
``jax.Array`` objects). The scanned layout stacks every layer leaf along one
axis, which one array cannot alias: there each stacked leaf is gathered
(``jnp.take`` along the layer axis), a new ``(L', ...)`` array; call it inside
the jitted step to keep the gather transient. Build the deeper model's
graph from the returned config (``nnx.eval_shape`` of the model class) and
its PEFT key map (``llama.peft_key_map(config)``); ``load_peft`` /
``save_peft`` then read and write PEFT files with ``layer_replication``.

Merging (``adapters.fold``) gives every copy its own merged kernel (the
copies differ once adapted); PEFT's ``merge_and_unload`` would add every
copy's delta into the one shared tensor.

Exports: ``replicate_layers``, ``replicated_layer_index``.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def replicated_layer_index(layer_map: Sequence[Sequence[int]], num_layers: int
                           ) -> list[int]:
    """The source layer of each layer of the replicated model.

    Args:
      layer_map: ``[[start, end), ...]`` (PEFT's ``layer_replication``).
      num_layers: the base model's depth.

    Returns:
      ``[source layer of new layer 0, 1, ...]``.

    Raises:
      ValueError: a range that is not ``0 <= start < end <= num_layers`` of
        ints, or an empty map.

    Example:
      >>> replicated_layer_index([[0, 4], [2, 5]], 5)
      [0, 1, 2, 3, 2, 3, 4]
    """
    if isinstance(layer_map, (str, bytes)) or not len(layer_map):
        raise ValueError(f"replicate_layers: layer_map must be a non-empty list of "
                         f"[start, end) pairs, got {layer_map!r}")
    index: list[int] = []
    for pair in layer_map:
        ok = (not isinstance(pair, (str, bytes)) and len(pair) == 2 and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in pair))
        if not ok or not 0 <= pair[0] < pair[1] <= num_layers:
            raise ValueError(f"replicate_layers: layer_map entry {pair!r} is not a "
                             f"[start, end) range of ints with 0 <= start < end <= "
                             f"{num_layers} (the model's num_hidden_layers)")
        index.extend(range(int(pair[0]), int(pair[1])))
    return index


def replicate_layers(params: dict, config: Any, layer_map: Sequence[Sequence[int]],
                     *, layers_prefix: str = "layers") -> tuple[dict, Any]:
    """Returns the deeper ``(params, config)`` of PEFT's ``layer_replication``.

    Args:
      params: a Llama or BERT parameter tree (``split_params``), unrolled
        (``layers`` a dict of int keys) or scanned (``layers`` leaves stacked
        along a leading axis).
      config: its ``LlamaConfig`` / ``BertConfig`` (any frozen dataclass with
        ``num_hidden_layers``).
      layer_map: ``[[start, end), ...]``, e.g. ``[[0, 4], [2, 5]]`` for layers
        ``0, 1, 2, 3, 2, 3, 4``.
      layers_prefix: the layer container's key in ``params``.

    Returns:
      ``(params, config)``: unrolled, new layer ``j`` holds the same arrays as
      its source layer; scanned, each stacked leaf is gathered to the new
      depth. ``config.num_hidden_layers`` is the new depth; everything else
      is unchanged (the input is not modified).

    Raises:
      ValueError: no ``layers_prefix`` container, a depth that disagrees
        with ``config.num_hidden_layers``, or a bad ``layer_map``.

    Example:
      >>> import dataclasses, jax.numpy as jnp
      >>> @dataclasses.dataclass(frozen=True)
      ... class Cfg:
      ...     num_hidden_layers: int
      >>> p = {"layers": {0: {"w": jnp.zeros(2)}, 1: {"w": jnp.ones(2)}}}
      >>> q, cfg = replicate_layers(p, Cfg(2), [[0, 2], [1, 2]])
      >>> sorted(q["layers"]), cfg.num_hidden_layers, q["layers"][2]["w"] is p["layers"][1]["w"]
      ([0, 1, 2], 3, True)
    """
    layers = params.get(layers_prefix) if isinstance(params, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"replicate_layers: params have no {layers_prefix!r} container "
                         "(a Llama or BERT tree from split_params)")
    depth = getattr(config, "num_hidden_layers", None)
    scanned = not all(isinstance(k, int) for k in layers)
    if scanned:
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(layers)}
        n = sizes.pop() if len(sizes) == 1 else None
    else:
        n = len(layers) if sorted(layers) == list(range(len(layers))) else None
    if n is None or n != depth:
        raise ValueError(f"replicate_layers: params[{layers_prefix!r}] is not a stack "
                         f"of config.num_hidden_layers={depth!r} layers")
    index = replicated_layer_index(layer_map, n)
    if scanned:
        idx = np.asarray(index, np.int32)
        new_layers = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), layers)
    else:  # fresh containers, the same arrays
        new_layers = {j: jax.tree.map(lambda x: x, layers[i]) for j, i in enumerate(index)}
    out = dict(params)
    out[layers_prefix] = new_layers
    return out, dataclasses.replace(config, num_hidden_layers=len(index))
