# SPDX-License-Identifier: Apache-2.0
"""The per-type plug-in behind ``load_peft``/``save_peft`` for weight tuners.

Most Hugging Face PEFT tuners store a few tensors per adapted module,
``base_model.model.<module>.<suffix>``, plus config fields. ``load_peft`` and
``save_peft`` do everything they share (key maps, module selection by
``target_modules``/``layers_to_transform``/..., ``modules_to_save``,
unrolled/scanned layouts, shape checks) and hand one module at a time to the
type's ``Tuner``: ``build`` turns the module's tensors into ``(adapter,
trainable, frozen)`` and ``write`` does the reverse. A type is one module
``peftjax/io/_peft_<type>.py`` defining ``TUNER`` and one line in
``_peft_tuners.TUNERS``.

Exports: ``Tuner``, ``ModuleRead``, ``ModuleWrite``, ``transposed``.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.io import _peft_keys


class ModuleRead(NamedTuple):
    """What ``Tuner.build`` gets for one module (one layer of a leaf).

    Attributes:
      config: the parsed ``adapter_config.json``.
      module: PEFT's module name (``model.layers.0.self_attn.q_proj``).
      tensors: ``{suffix: array}`` of this module, torch layout, as stored
        (the file's dtype), with exactly the suffixes ``Tuner.required``
        asked for.
      shared: ``{file key: array}`` of the tensors ``Tuner.is_shared``
        claimed (the whole file's, e.g. ``base_model.vera_A``).
      dtype: the ``param_dtype`` to build the adapter parameters in.
      source: the config file, for error messages.
      dims: the module's matrix view (``n_in``, ``n_out``; no layer axis).
      dimension_numbers: the view to give the adapter (with the layer axis
        of a scanned leaf), or None.
      key: the module's ``PeftKey``.
      modules: every adapted module of the file (sorted names), for types
        whose tensors are indexed by the module's position (TinyLoRA).
      shapes: ``{module: (n_in, n_out)}`` of every adapted module of the file
        (one layer), for types whose tensors depend on all of them (UniLoRA).
      base: ``() -> (n_in, n_out)`` NumPy array of this module's base kernel
        (one layer, its matrix view), for types whose frozen arrays PEFT
        recomputes from the base weight when loading (FRoD's ``U``, PSOFT's
        and OSF's SVD factors); None where not available. A call, so that
        other types never copy or slice the base.
      bias: ``() -> (n_out,)`` NumPy array of the module's sibling bias leaf
        (``.../bias`` beside the kernel, one layer), or None where the module
        has none (AdaMSS folds it into its SVD).
    """

    config: Mapping[str, Any]
    module: str
    tensors: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    dtype: Any
    source: str
    dims: tree.ResolvedDims
    dimension_numbers: tree.DimensionNumbers | None
    key: _peft_keys.PeftKey
    modules: tuple[str, ...] = ()
    shapes: Mapping[str, tuple[int, int]] = {}
    base: Callable[[], np.ndarray] | None = None
    bias: Callable[[], np.ndarray] | None = None


class ModuleWrite(NamedTuple):
    """What ``Tuner.write`` gets for one module (one layer of a leaf).

    Attributes:
      adapter: the leaf's adapter.
      trainable: this layer's trainable parameters (no layer axis).
      frozen: this layer's frozen parameters (no layer axis), or None.
      dims: the module's matrix view (``n_in``, ``n_out``; no layer axis).
      path: the unrolled params path (for error messages).
      module: PEFT's module name.
      state: the whole ``AdapterState`` (for parameters shared across leaves).
      key: the module's ``PeftKey`` (its layout tells a table from a kernel).
      base: ``() -> (n_in, n_out)`` NumPy array of this module's base kernel
        (one layer, its matrix view), for types that check the frozen arrays
        against what PEFT will recompute from the base (AdaMSS's groups);
        None where not available.
      bias: ``() -> (n_out,)`` of the module's sibling bias leaf (one layer),
        or None where it has none.
    """

    adapter: _adapters.Adapter
    trainable: Any
    frozen: Any
    dims: tree.ResolvedDims
    path: str
    module: str
    state: _adapters.AdapterState
    key: _peft_keys.PeftKey | None = None
    base: Callable[[], np.ndarray] | None = None
    bias: Callable[[], np.ndarray] | None = None


def _all(tuner: "Tuner") -> Callable[[set[str]], set[str]]:
    return lambda found: set(tuner.suffixes)


class Tuner(NamedTuple):
    """One PEFT ``peft_type``'s per-module tensors and config fields.

    Attributes:
      peft_type: PEFT's name (``"LOHA"``).
      params_types: the trainable NamedTuple type(s) ``save_peft`` writes as
        this type.
      suffixes: every tensor name after ``<module>.`` this type may store
        (``"hada_w1_a"``); a suffix must not end another one of the same
        type.
      build: ``ModuleRead -> (adapter, trainable, frozen)``; raises
        ``ValueError`` naming the module and the field for tensors that
        disagree with the config.
      write: ``ModuleWrite -> ({suffix: torch-layout array}, info)``; ``info``
        is anything ``config`` needs (ranks, seeds, ...).
      config: ``{module: info} -> (config fields, {file key: shared
        tensor})``; raises when no single PEFT config describes the modules.
      honoured: config fields ``build`` reads (besides the selection fields).
      defaults: config fields accepted only at PEFT's default value.
      field_types: ``{field: (predicate, description)}`` for ``honoured``
        fields (``None`` is always accepted).
      required: ``found suffixes -> suffixes a module must have`` (None:
        all of ``suffixes``), for types whose tensors depend on the config.
      is_shared: ``file key -> bool`` for tensors outside any module (None:
        there are none).
      check: ``(config, source) -> [problem, ...]`` for combinations of
        fields the type cannot honour (None: none).
      shared_trainable: ``(shared tensors, config, dtype) -> {key: value}``
        entries added to ``AdapterState.trainable`` beside the per-path
        ones (parameters shared by every module), or None.
      shared_frozen: the same for ``AdapterState.frozen`` (frozen arrays
        shared by every module, e.g. RandLoRA's bases), or None.
      embeddings: the type also adapts embedding tables (``TensorLayout.
        EMBEDDING`` keys; ``build``/``write`` see the layout in ``key``).
      modules_from_config: a module may have no tensors in the file
        (UniLoRA without ``save_indices``): every module the config selects
        is adapted, with whatever tensors it has.
    """

    peft_type: str
    params_types: tuple[type, ...]
    suffixes: tuple[str, ...]
    build: Callable[[ModuleRead], tuple[Any, Any, Any]]
    write: Callable[[ModuleWrite], tuple[dict[str, np.ndarray], Any]]
    config: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, np.ndarray]]]
    honoured: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = {}
    field_types: Mapping[str, tuple[Callable[[Any], bool], str]] = {}
    required: Callable[[set[str]], set[str]] | None = None
    is_shared: Callable[[str], bool] | None = None
    check: Callable[[Mapping[str, Any], str], list[str]] | None = None
    shared_trainable: Callable[..., dict[str, Any]] | None = None
    shared_frozen: Callable[..., dict[str, Any]] | None = None
    embeddings: bool = False
    modules_from_config: bool = False

    def needs(self, found: set[str]) -> set[str]:
        """The suffixes a module with tensors ``found`` must have."""
        return set(self.suffixes) if self.required is None else self.required(found)


def transposed(x: Any) -> np.ndarray:
    """A 2-D array (one layer) as a contiguous NumPy transpose (Flax <-> torch).

    Args:
      x: a 2-D array (JAX or NumPy).

    Returns:
      ``x.T`` on the host, C-contiguous.

    Example:
      >>> transposed(np.arange(6.0).reshape(2, 3)).shape
      (3, 2)
    """
    return np.ascontiguousarray(np.asarray(jax.device_get(x)).T)
