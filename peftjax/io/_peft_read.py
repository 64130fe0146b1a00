# SPDX-License-Identifier: Apache-2.0
"""Reading a Hugging Face PEFT adapter directory into a peftjax adapter state.

The inverse of ``save_peft`` (see ``_peft_write`` for the key and layout
table): torch ``lora_A (r, in)`` / ``lora_B (out, r)`` become Flax
``a = A.T (in, r)``, ``b = B.T (r, out)``; per-layer modules are stacked when
``params`` has the scanned layout. Every tensor in the file is placed or the
read fails: unknown keys, missing keys, shape mismatches, an unsupported
``peft_type`` and config fields peftjax cannot honour are errors that list
them. The config is enforced as PEFT applies it: the file's adapter tensors
must be exactly those of the modules its ``target_modules`` /
``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern`` /
``modules_to_save`` select over the key map. Only safetensors files are read
(never ``adapter_model.bin`` pickles).

Exports: ``PeftAdapter``, ``load_peft``.
"""

import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import inits as _inits
from peftjax import tree
from peftjax.io import (
    _json,
    _peft_checks,
    _peft_config,
    _peft_keys,
    _peft_lora_variants,
    _peft_tuner,
    _peft_tuners,
    _peft_write,
    _safetensors,
)
from peftjax.io._peft_keys import PeftKey, TensorLayout  # noqa: F401 (doctest)
from peftjax.io._peft_write import save_peft  # noqa: F401 (doctest)

_SUFFIXES = (
    (".lora_A.weight", "a", _peft_keys.TensorLayout.KERNEL),
    (".lora_B.weight", "b", _peft_keys.TensorLayout.KERNEL),
    (".lora_embedding_A", "a", _peft_keys.TensorLayout.EMBEDDING),
    (".lora_embedding_B", "b", _peft_keys.TensorLayout.EMBEDDING),
    (".lora_magnitude_vector", "magnitude", _peft_keys.TensorLayout.KERNEL),
    (".ia3_l", "ia3", _peft_keys.TensorLayout.KERNEL),
    (".vera_lambda_b", "lambda_b", _peft_keys.TensorLayout.KERNEL),
    (".vera_lambda_d", "lambda_d", _peft_keys.TensorLayout.KERNEL),
    *((x, f, _peft_keys.TensorLayout.KERNEL) for x, f in _peft_lora_variants.MC_SUFFIXES),
    (*_peft_lora_variants.KASA_SUFFIX, _peft_keys.TensorLayout.KERNEL),
)
_NEEDS = {"LORA": {"a", "b"}, "IA3": {"ia3"}, "VERA": {"lambda_b", "lambda_d"}}


class PeftAdapter(NamedTuple):
    """A PEFT adapter read for a peftjax parameter tree.

    Attributes:
      assignment: ``{path: Adapter}`` (paths of ``params``, either layout).
      state: the ``AdapterState`` for ``materialize``/``merge``.
      full: ``{path: array}`` of the ``modules_to_save`` leaves (Flax layout),
        to replace the base leaves (``peftjax.tree.replace_leaves``).
      config: the parsed ``adapter_config.json``.
    """

    assignment: dict[str, _adapters.Adapter]
    state: _adapters.AdapterState
    full: dict[str, jax.Array]
    config: dict[str, Any]


def _params_path(upath: str, flat: Mapping[str, Any], prefix: str
                 ) -> tuple[str, int | None]:
    """``(path in params, layer index or None)`` of an unrolled path."""
    if upath in flat:
        return upath, None
    head = prefix.split("/")
    parts = upath.split("/")
    if parts[:len(head)] == head and len(parts) > len(head) + 1:
        scanned = "/".join(head + parts[len(head) + 1:])
        if scanned in flat:
            return scanned, int(parts[len(head)])
    raise ValueError(f"load_peft: the key map's {upath!r} is not a leaf of params "
                     "(neither unrolled nor scanned)")


def _base_matrix(leaf: Any, layer: int | None, dims: tree.ResolvedDims):
    """``() -> (n_in, n_out)`` host copy of one layer of a base kernel (on demand)."""
    def get() -> np.ndarray:
        x = leaf if layer is None else leaf[layer]
        return np.asarray(jax.device_get(tree.to_matrix(jnp.asarray(x), dims)))

    return get


def _sibling_bias(flat: Mapping[str, Any], path: str, layer: int | None):
    """``() -> (n_out,)`` host copy of the kernel's sibling ``bias`` leaf, or None."""
    sib = path.rsplit("/", 1)[0] + "/bias" if "/" in path else "bias"
    if sib == path or sib not in flat:
        return None

    def get() -> np.ndarray:
        x = flat[sib] if layer is None else flat[sib][layer]
        return np.asarray(jax.device_get(x)).reshape(-1)

    return get


def _stack_layers(items: dict[int, Any], path: str, n: int, what: str) -> Any:
    missing = sorted(set(range(n)) - set(items))
    if missing:
        raise ValueError(
            f"load_peft: the file has {what} for layers {sorted(items)} of the "
            f"scanned leaf {path!r} but not for layers {missing}; a scanned model "
            "needs every layer (load with the unrolled layout instead)"
        )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[items[i] for i in range(n)])


def _read_dir(directory: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    cfg_path = directory / _peft_write.CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(
            f"load_peft: no {_peft_write.CONFIG_NAME} in {str(directory)!r}")
    config = _json.read_json(cfg_path, "load_peft")
    weights = directory / _peft_write.WEIGHTS_NAME
    if not weights.is_file():
        legacy = directory / "adapter_model.bin"
        why = (" (only a pickled adapter_model.bin, which peftjax never loads; "
               "convert it to safetensors)") if legacy.exists() else ""
        raise ValueError(f"load_peft: no {_peft_write.WEIGHTS_NAME} in "
                         f"{str(directory)!r}{why}")
    tensors, _ = _safetensors.read_safetensors(weights)
    return config, tensors


def load_peft(
    directory: str | os.PathLike,
    params: Any,
    *,
    key_map: Mapping[str, _peft_keys.PeftKey],
    layers_prefix: str = "layers",
    param_dtype: Any = jnp.float32,
    tied_head: tuple[str, str] | None = None,
    output_modules: Sequence[str] | None = None,
) -> PeftAdapter:
    """Reads a PEFT adapter: LoRA (rsLoRA, DoRA), VeRA, (IA)³ and 17 other tuner types.

    The config is enforced as Hugging Face PEFT (0.21) applies it when it
    builds the adapter, over the modules of ``key_map``:

    * ``target_modules``: a list selects modules whose full name is an item
      or ends with ``"." + item`` (items are not regexes); a string is a regex
      that must ``re.fullmatch`` the full name; ``"all-linear"`` (any case)
      selects every Linear (``KERNEL``) module except ``output_modules``.
      Selecting a norm or a container module, or nothing, is an error.
    * ``layers_to_transform`` (an int or a list; ``[]`` keeps every layer)
      with ``layers_pattern`` (the name before the layer index; default: the
      first ``.<name>.<index>.`` in the module name) filter a list's matches
      by layer index; with a regex ``target_modules`` they are an error.
    * ``exclude_modules`` (a list with suffix semantics, or a fullmatch
      regex) and ``modules_to_save`` (trained in full) remove modules.
    * The file must hold adapter tensors for exactly the selected modules: a
      tensor of a module the config does not select, or a selected module
      without tensors, is an error naming the module and the field that
      decides. (PEFT itself only warns and then ignores such tensors, or
      leaves such modules at their initialisation.)
    * ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in file
      order) with ``re.match(rf"(.*\\.)?({k})$", module)`` gives the rank and
      alpha; the rank must equal the tensors'. Keys that match no selected
      module are ignored with a ``RuntimeWarning``, as in PEFT.
    * ``lora_dropout`` is kept on the returned adapters (``adapter.dropout``):
      the factored path (``peftjax.factored.transform``) applies it to the adapter
      input when ``deterministic=False`` (training, with a ``key``), never in
      evaluation; ``materialize`` refuses it unless ``deterministic=True``.
    * ``alora_invocation_tokens`` (aLoRA): the LoRA state is read as
      plain LoRA and the ids stay in ``config``; the update must then be
      applied through ``adapters.alora_hook`` (with ``alora_starts``), not
      ``materialize``: a ``UserWarning`` says so on every such file.
    * (IA)³'s ``feedforward_modules``: a list matches by plain ``endswith``,
      a string in full; it decides which side the scale vector is on.
    * Per ``peft_type`` (tensors, fields honoured or accepted only at
      PEFT's default, differences from PEFT): docs/peft_format.md.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base tree (unrolled or scanned layout): paths and shapes.
      key_map: ``{unrolled path: PeftKey}`` of the model family.
      layers_prefix: the layer container path of a scanned ``params``.
      param_dtype: dtype of the returned adapter parameters.
      tied_head: ``(table path, head module)`` when the model's head shares an
        embedding table (``("embed_tokens/embedding", "lm_head")`` for a tied
        Llama): the head's tensors in the file must be the copies PEFT's
        ``ensure_weight_tying`` writes, and a file that adapts the table
        without it (PEFT then leaves the tied head unadapted) is refused;
        for TRAINABLE_TOKENS, the head's copy of the table's rows (PEFT's
        tied layer) must equal them.
      output_modules: the model's output head modules, which
        ``target_modules="all-linear"`` leaves out (``("lm_head",)`` for a
        causal LM, ``()`` for none); only needed for such a config (PEFT
        itself writes the expanded list of names into the files it saves).

    Returns:
      A ``PeftAdapter(assignment, state, full, config)``.

    Raises:
      ValueError: an ``adapter_config.json`` that is not valid JSON (naming
        the file and the position), not an object or has wrong-typed
        fields; an unsupported ``peft_type`` or config field; a
        ``target_modules`` that selects nothing (or a norm or container);
        tensors of modules the config does not select, or unknown to the key
        map; selected modules (``target_modules`` / ``modules_to_save``)
        that the file lacks; shapes that disagree with ``params`` or the
        config's ranks; a scanned leaf whose layers are not all adapted; a
        tied head that PEFT would leave unadapted.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile
      >>> from peftjax import adapters, tree
      >>> params = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> km = {"q/kernel": PeftKey("attn.q", "weight", TensorLayout.KERNEL)}
      >>> a = tree.assign(params, [tree.Rule(where="q/kernel",
      ...                                    then=adapters.lora(2, alpha=4.0))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> d = save_peft(tempfile.mkdtemp(), a, st, params, key_map=km)
      >>> back = load_peft(d, params, key_map=km)
      >>> back.assignment["q/kernel"], back.state.trainable["q/kernel"].a.shape
      (lora(rank=2, alpha=4, scaling=alpha/r), (4, 2))
    """
    key_map = _peft_keys.check_key_map(key_map, "load_peft")
    directory = pathlib.Path(directory)
    config, tensors = _read_dir(directory)
    source = str(directory / _peft_write.CONFIG_NAME)
    if str(config.get("peft_type", "")).upper() == "ADAPTION_PROMPT":
        raise ValueError(f"{source}: peft_type='ADAPTION_PROMPT' is a model hook, not "
                         "a weight adapter: read it with io.load_peft_adaption_prompt")
    peft_type = _peft_config.check_config(config, source, _peft_tuners.TUNERS)
    tuner = _peft_tuners.TUNERS.get(peft_type)
    suffixes = (_SUFFIXES if tuner is None else tuple(
        ("." + x, x, _peft_keys.TensorLayout.KERNEL) for x in tuner.suffixes))
    if peft_type == "LN_TUNING":
        from peftjax.io import _peft_ln_tuning

        a, st = _peft_ln_tuning.read(config, tensors, params, key_map,
                                     layers_prefix=layers_prefix,
                                     param_dtype=param_dtype, source=source,
                                     weights=str(directory / _peft_write.WEIGHTS_NAME))
        return PeftAdapter(a, st, {}, config)
    if peft_type == "TRAINABLE_TOKENS":
        from peftjax.io import _peft_trainable_tokens

        a, st = _peft_trainable_tokens.read(
            config, tensors, params, key_map, layers_prefix=layers_prefix,
            param_dtype=param_dtype, source=source, tied_head=tied_head,
            weights=str(directory / _peft_write.WEIGHTS_NAME))
        return PeftAdapter(a, st, {}, config)
    selection = _peft_config.selection(config, key_map, source, output_modules)
    _peft_lora_variants.check_replication(config, key_map, layers_prefix, source)
    flat = tree.leaves_by_path(params)
    use_dora = bool(config.get("use_dora", False))
    saved = set(config.get("modules_to_save") or [])

    adapted = {k.module: (p, k) for p, k in key_map.items()
               if k.layout is not _peft_keys.TensorLayout.VECTOR
               and k.tensor == "weight"}
    full_names = {f"{k.module}.{k.tensor}": (p, k) for p, k in key_map.items()}
    parts: dict[str, dict[str, np.ndarray]] = {}
    full_u: dict[str, np.ndarray] = {}
    vera_shared: dict[str, np.ndarray] = {}  # VeRA's projections, a tuner's shared
    tied_copies: dict[str, np.ndarray] = {}
    head = ("" if tied_head is None
            else _peft_keys.check_tied_head(tied_head, key_map, "load_peft"))
    unknown: list[str] = []
    for key, arr in sorted(tensors.items()):
        if peft_type == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
            vera_shared[key[-1]] = arr
            continue
        if tuner is not None and tuner.is_shared is not None and tuner.is_shared(key):
            vera_shared[key] = arr
            continue
        pre = _peft_write.PREFIX
        name = key[len(pre):] if key.startswith(pre) else None
        if head and name is not None and name.startswith(head + "."):
            tied_copies[name[len(head) + 1:]] = arr
            continue
        placed = False
        for suffix, field, layout in suffixes if name is not None else ():
            module = name[: -len(suffix)]
            if name.endswith(suffix) and module in adapted:
                upath, k = adapted[module]
                if field in ("a", "b") and k.layout is not layout:
                    break
                parts.setdefault(upath, {})[field] = arr
                placed = True
                break
        if placed or name is None:
            unknown += [] if placed else [key]
            continue
        base_name = name.replace(".base_layer.", ".")
        owner = full_names.get(base_name)
        owner_module = owner[1].module if owner is not None else ""
        if owner is not None and (owner_module in saved or any(
                owner_module.endswith("." + m) for m in saved)):
            full_u[owner[0]] = _flax_full(owner[0], owner[1], arr, flat,
                                          layers_prefix)
        elif owner is not None and ".base_layer." in name:
            _check_base_copy(owner[0], _flax_full(owner[0], owner[1], arr, flat,
                                                  layers_prefix),
                             flat, layers_prefix, key)
        else:
            unknown.append(key)
    if unknown:
        hint = ("; a head tied to the embedding (ensure_weight_tying)? pass "
                "tied_head=(table path, head module)"
                if config.get("ensure_weight_tying") and tied_head is None else "")
        raise ValueError(
            f"load_peft: {len(unknown)} tensor(s) in {str(directory)!r} match no "
            f"module of the key map for {peft_type}: {unknown[:8]}{hint}"
        )
    if tuner is not None and tuner.modules_from_config:  # modules with no tensors
        for m in selection.selected:
            if m in adapted:
                parts.setdefault(adapted[m][0], {})
    _peft_checks._check_selection(selection, config, key_map, parts, peft_type, source,
                     str(directory / _peft_write.WEIGHTS_NAME))
    _peft_checks._check_saved(config, key_map, full_u, source)
    if tied_head is not None:
        _peft_checks._check_tied(tied_head, key_map, parts, full_u, tied_copies, config, source)
    if not parts:
        raise ValueError(f"load_peft: {str(directory)!r} holds no {peft_type} tensors")
    needs = _NEEDS.get(peft_type, set()) | ({"magnitude"} if use_dora else set())
    needs |= _peft_lora_variants.extra_needs(peft_type, config)  # MonteCLoRA's
    for upath, got in sorted(parts.items()):
        want = tuner.needs(set(got)) if tuner is not None else needs
        if set(got) != want:
            raise ValueError(
                f"load_peft: module {key_map[upath].module!r} ({upath!r}) has "
                f"{sorted(got)}, a {peft_type}{' DoRA' if use_dora else ''} adapter "
                f"needs {sorted(want)}"
            )
    shapes: dict[str, tuple[int, int]] = {}  # every module's (n_in, n_out)
    for upath in parts:
        path, layer = _params_path(upath, flat, layers_prefix)
        d = _peft_keys.layer_dims(key_map[upath], tuple(np.shape(flat[path]))[
            0 if layer is None else 1:], 0, upath)
        shapes[key_map[upath].module] = (d.n_in, d.n_out)
    per_leaf: dict[str, dict[int | None, tuple]] = {}
    for upath, got in parts.items():
        path, layer = _params_path(upath, flat, layers_prefix)
        shape = tuple(np.shape(flat[path]))
        nb = 0 if layer is None else 1
        dims = _peft_keys.layer_dims(key_map[upath], shape[nb:], 0, upath)
        dn = _peft_keys.leaf_dimension_numbers(key_map[upath], len(shape), nb)
        built = (_build(peft_type, config, upath, key_map[upath], got, vera_shared,
                        use_dora, param_dtype, source, dims, dn,
                        _base_matrix(flat[path], layer, dims)) if tuner is None
                 else tuner.build(_peft_tuner.ModuleRead(
                     config, key_map[upath].module, got, vera_shared, param_dtype,
                     source, dims, dn, key_map[upath],
                     tuple(sorted(key_map[u].module for u in parts)), shapes,
                     _base_matrix(flat[path], layer, dims),
                     _sibling_bias(flat, path, layer))))
        per_leaf.setdefault(path, {})[layer] = built
    assignment: dict[str, _adapters.Adapter] = {}
    trainable: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for path, layers in sorted(per_leaf.items()):
        adapters = {repr(b[0]) for b in layers.values()}
        if len(adapters) != 1:
            raise ValueError(f"load_peft: the layers of scanned leaf {path!r} differ "
                             f"in hyperparameters {sorted(adapters)}; load unrolled")
        adapter = next(iter(layers.values()))[0]
        if None in layers:
            t, f = layers[None][1], layers[None][2]
        else:
            n = flat[path].shape[0]
            t = _stack_layers({i: b[1] for i, b in layers.items()}, path, n, "adapters")
            f = (None if next(iter(layers.values()))[2] is None else
                 _stack_layers({i: b[2] for i, b in layers.items()}, path, n, "bases"))
        _check_shapes(path, adapter, flat[path], t, f)
        assignment[path], trainable[path], frozen[path] = adapter, t, f
    for into, hook in ((trainable, tuner and tuner.shared_trainable),
                       (frozen, tuner and tuner.shared_frozen)):  # shared by all modules
        into.update(hook(vera_shared, config, param_dtype) if hook else {})
    full = _assemble_full(full_u, flat, layers_prefix, param_dtype)
    if config.get("alora_invocation_tokens"):
        warnings.warn(
            f"load_peft: {source} is an aLoRA (alora_invocation_tokens="
            f"{config['alora_invocation_tokens']}): apply it with adapters.alora_hook; "
            "materialize or fold would apply it at every position", UserWarning,
            stacklevel=2)
    return PeftAdapter(assignment, _adapters.AdapterState(trainable, frozen), full, config)


def _flax_full(upath: str, key: _peft_keys.PeftKey, arr: np.ndarray,
               flat: Mapping[str, Any], prefix: str) -> np.ndarray:
    """A full torch tensor of ``upath`` in the layout of one layer of params."""
    if key.layout is not _peft_keys.TensorLayout.KERNEL:
        return arr
    path, layer = _params_path(upath, flat, prefix)
    shape = tuple(np.shape(flat[path]))[0 if layer is None else 1:]
    dims = _peft_keys.layer_dims(key, shape, 0, upath)
    if np.shape(arr) != (dims.n_out, dims.n_in):
        raise ValueError(
            f"load_peft: the tensor for {upath!r} ({key.module}.{key.tensor}) has "
            f"shape {np.shape(arr)} (dtype {arr.dtype}); params {path!r} need "
            f"(out, in) = {(dims.n_out, dims.n_in)}")
    return _peft_write.from_torch(arr, dims)


def _check_base_copy(upath: str, arr: np.ndarray, flat: Mapping[str, Any],
                     prefix: str, key: str) -> None:
    path, layer = _params_path(upath, flat, prefix)
    base = np.asarray(flat[path] if layer is None else flat[path][layer])
    if base.shape != arr.shape or not np.array_equal(base, arr.astype(base.dtype)):
        raise ValueError(
            f"load_peft: {key!r} is a base-layer copy (PEFT's save_embedding_layers) "
            f"with shape {arr.shape} that differs from params {path!r} "
            f"{base.shape}; a resized or changed base is not supported"
        )


def _assemble_full(full_u: dict[str, np.ndarray], flat: Mapping[str, Any],
                   prefix: str, dtype: Any) -> dict[str, jax.Array]:
    grouped: dict[str, dict[int | None, jax.Array]] = {}
    for upath, arr in full_u.items():
        path, layer = _params_path(upath, flat, prefix)
        grouped.setdefault(path, {})[layer] = jnp.asarray(arr, dtype)
    out: dict[str, jax.Array] = {}
    for path, layers in grouped.items():
        value = (layers[None] if None in layers else _stack_layers(
            layers, path, flat[path].shape[0], "modules_to_save tensors"))
        if tuple(value.shape) != tuple(np.shape(flat[path])):
            raise ValueError(f"load_peft: modules_to_save tensor for {path!r} has "
                             f"shape {tuple(value.shape)}, params have "
                             f"{tuple(np.shape(flat[path]))}")
        out[path] = value
    return out


def _build(peft_type: str, config: dict, upath: str, key: _peft_keys.PeftKey,
           got: dict[str, np.ndarray], shared: dict[str, np.ndarray],
           use_dora: bool, dtype: Any, source: str,
           dims: tree.ResolvedDims, dn: tree.DimensionNumbers | None,
           base: Any = None) -> tuple:
    """``(adapter, trainable, frozen)`` of one unrolled module (its matrix ``dims``).

    ``base`` returns the module's ``(in, out)`` base matrix (KaSA rebuilds its
    truncation from it).
    """
    def arr(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, dtype)

    module = key.module
    if peft_type == "LORA":
        a, b = got["a"], got["b"]
        if a.ndim != 2 or b.ndim != 2 or (a.shape[0] != b.shape[1]
                                          and not config.get("use_bdlora")):
            raise ValueError(f"load_peft: {module!r} has lora_A {a.shape} and lora_B "
                             f"{b.shape}; expected (r, in) and (out, r)")
        r = int(a.shape[0])
        want_r = _peft_config.pattern_value(config.get("rank_pattern") or {}, module,
                                            config.get("r", 8))
        if r != want_r:
            raise ValueError(f"load_peft: {module!r} has rank {r} in the file but "
                             f"{want_r} in {source} (r/rank_pattern)")
        alpha = _peft_config.pattern_value(config.get("alpha_pattern") or {}, module,
                                           config.get("lora_alpha", 8))
        scaling = (_adapters.Scaling.ALPHA_OVER_SQRT_RANK if config.get("use_rslora")
                   else _adapters.Scaling.ALPHA_OVER_RANK)
        emb = key.layout is _peft_keys.TensorLayout.EMBEDDING
        kw = dict(alpha=alpha, scaling=scaling, param_dtype=dtype,
                  dimension_numbers=dn,
                  dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                  init=(_adapters.LoRAInit.EMBEDDING if emb
                        else _adapters.LoRAInit.KAIMING_UNIFORM))
        variant = _peft_lora_variants.read_module(config, module, got, kw, dims, emb,
                                                  use_dora, arr, source, base)
        if variant is not None:  # QA-LoRA, BD-LoRA, MonteCLoRA, KaSA
            return variant
        if use_dora:
            if emb:
                raise ValueError(f"load_peft: DoRA on the embedding {module!r} is not "
                                 "supported")
            return (_adapters.dora(r, **kw),
                    _adapters.DoRAParams(arr(a.T), arr(b.T), arr(got["magnitude"])), None)
        if config.get("init_lora_weights") == "mica":  # PEFT's MiCA: lora_B frozen
            if emb:
                raise ValueError(f"load_peft: MiCA on the embedding {module!r} is not "
                                 "supported")
            ini = _inits.mica(r, alpha=alpha, scaling=scaling, dimension_numbers=dn,
                              param_dtype=dtype, dropout=kw["dropout"])
            return ini.adapter, _inits.MiCAParams(arr(a.T)), _inits.MiCABasis(arr(b.T))
        return _adapters.lora(r, **kw), _adapters.LoRAParams(arr(a.T), arr(b.T)), None
    if peft_type == "IA3":
        v = got["ia3"]
        if v.ndim != 2 or 1 not in v.shape:
            raise ValueError(f"load_peft: {module!r}.ia3_l has shape {v.shape}; "
                             "expected (out, 1) or (1, in)")
        is_ff = _peft_config.is_feedforward(config, module)
        side = _adapters.Side.INPUT if v.shape[0] == 1 else _adapters.Side.OUTPUT
        if is_ff != (side is _adapters.Side.INPUT):
            raise ValueError(f"load_peft: {module!r}.ia3_l has shape {v.shape}, which "
                             f"disagrees with feedforward_modules in {source}")
        return (_adapters.ia3(side, param_dtype=dtype, dimension_numbers=dn),
                _adapters.ScaleParams(arr(v.reshape(-1))), None)
    if set(shared) != {"A", "B"}:
        raise ValueError(f"load_peft: VeRA file lacks base_model.vera_A/vera_B "
                         f"(has {sorted(shared)}); save with save_projection=True")
    big_a, big_b = shared["A"], shared["B"]
    r = int(got["lambda_d"].shape[0])
    n_out = int(got["lambda_b"].shape[0])
    if big_a.shape[0] != r or big_b.shape[1] != r:
        raise ValueError(f"load_peft: vera_A {big_a.shape} / vera_B {big_b.shape} "
                         f"disagree with {module!r}'s rank {r}")
    adapter = _adapters.vera(r, max_in=int(big_a.shape[1]), max_out=int(big_b.shape[0]),
                         projection_seed=int(config.get("projection_prng_key", 0)),
                         d_initial=float(config.get("d_initial", 0.1)),
                         dimension_numbers=dn, param_dtype=dtype)
    n_in = dims.n_in
    if n_in > big_a.shape[1] or n_out > big_b.shape[0]:
        raise ValueError(f"load_peft: {module!r} (in={n_in}, out={n_out}) exceeds "
                         f"the shared vera_A {big_a.shape} / vera_B {big_b.shape}")
    t = _adapters.VeRAParams(arr(got["lambda_d"]), arr(got["lambda_b"]))
    return adapter, t, _adapters.VeRABasis(arr(big_a[:, :n_in].T), arr(big_b[:n_out].T))


def _check_shapes(path: str, adapter: _adapters.Adapter, leaf: Any, t: Any, f: Any) -> None:
    spec = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
    try:
        want_t, want_f = jax.eval_shape(lambda k, w: adapter.init(k, w),
                                        jax.random.key(0), spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"load_peft: {adapter!r} does not fit {path!r} "
                         f"(shape {tuple(np.shape(leaf))}): {e}") from e
    for what, want, got in (("adapter", want_t, t), ("basis", want_f, f)):
        ws = jax.tree.map(lambda x: tuple(x.shape), want)
        gs = jax.tree.map(lambda x: tuple(x.shape), got)
        if ws != gs:
            raise ValueError(
                f"load_peft: the file's {what} tensors for {path!r} give shapes "
                f"{gs}, but params {tuple(np.shape(leaf))} need {ws}")
