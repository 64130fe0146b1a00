# SPDX-License-Identifier: Apache-2.0
"""Writing a peftjax adapter state as a Hugging Face PEFT adapter directory.

``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``.lora_B.weight``
``(out, r)`` (torch layout: ``a = A.T``, ``b = B.T`` of peftjax's Flax
``a (in, r)``, ``b (r, out)``); embeddings use ``lora_embedding_A`` ``(r, V)``
/ ``lora_embedding_B`` ``(d, r)`` (``ΔE = s·(B·A)ᵀ``, the same transposes);
DoRA adds ``lora_magnitude_vector`` ``(out,)``; (IA)³ writes ``ia3_l``
(``(out, 1)``, or ``(1, in)`` for input-side, feed-forward modules); VeRA
writes ``vera_lambda_b`` ``(out,)``, ``vera_lambda_d`` ``(r,)`` and the shared
``base_model.vera_A`` ``(r, max_in)`` / ``base_model.vera_B`` ``(max_out, r)``
(``save_projection=True``: JAX cannot reproduce torch's generator).

The method of each path comes from its trainable NamedTuple (``LoRAParams``,
``DoRAParams``, ``VeRAParams``, ``ScaleParams``, and each ``_peft_tuners``
type's, e.g. ``LoHaParams``; every type's tensors and config are in
docs/peft_format.md); the scaling of LoRA/DoRA is
read off the adapter's factored form (``delta`` of unit factors), so any
``Scaling`` exports: ``lora_alpha`` is the shortest decimal whose
``alpha/r`` (or ``alpha/√r`` with ``use_rslora``) equals it in float32.

A tied embedding (SmolLM2) that carries LoRA, or is trained in full, also
changes the head in peftjax (one table feeds both). PEFT adapts only the
embedding lookup unless ``ensure_weight_tying`` is set: its head then carries
the same LoRA, ``lora_A = lora_embedding_Bᵀ`` and ``lora_B =
lora_embedding_Aᵀ`` (a full table is also saved as the head's weight). Pass
``tied_head=(table path, head module)`` and ``save_peft`` writes exactly that,
so PEFT reproduces peftjax's tied model; ``load_peft`` checks the head's
copies against the table's and refuses a file that leaves the tied head
unadapted.

Exports: ``save_peft``.
"""

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import inits as _inits
from peftjax import tree
from peftjax.io import (
    _peft_config,
    _peft_keys,
    _peft_lora_variants,
    _peft_tuner,
    _peft_tuners,
    _safetensors,
)
from peftjax.io._peft_keys import PeftKey, TensorLayout  # noqa: F401 (doctest)

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_TYPES = {
    _adapters.LoRAParams: "LORA",
    _adapters.DoRAParams: "LORA",
    _inits.MiCAParams: "LORA",  # lora_B is its frozen basis; init_lora_weights="mica"
    _adapters.QALoRAParams: "LORA",
    _adapters.BdLoRAParams: "LORA",
    _adapters.MonteCLoRAParams: "LORA",
    _adapters.KaSAParams: "LORA",
    _adapters.VeRAParams: "VERA",
    _adapters.ScaleParams: "IA3",
    _adapters.LNTuningParams: "LN_TUNING",
    _adapters.TrainableTokensParams: "TRAINABLE_TOKENS",
}


def _np(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def to_torch(arr: np.ndarray, dims: tree.ResolvedDims) -> np.ndarray:
    """A kernel (no batch axes) as the torch weight ``(out, in)`` of its matrix view."""
    m = np.transpose(arr, dims.reduction + dims.output).reshape(dims.n_in, dims.n_out)
    return np.ascontiguousarray(m.T)


def from_torch(arr: np.ndarray, dims: tree.ResolvedDims) -> np.ndarray:
    """The inverse of :func:`to_torch`: a torch ``(out, in)`` weight as the kernel."""
    axes = dims.reduction + dims.output
    m = np.asarray(arr).T.reshape(tuple(dims.shape[a] for a in axes))
    return np.ascontiguousarray(np.transpose(m, np.argsort(axes)))


def _probe_scaling(adapter: _adapters.Adapter, t: Any, n_in: int, n_out: int,
                   path: str) -> float:
    """The adapter's float32 scaling ``s``: ``delta(e_0)`` with unit factors."""
    if _peft_lora_variants.is_variant(t):  # QA-LoRA pools, BD-LoRA has blocks
        return float(np.float32(dict(adapter.hyperparameters)["s"]))
    if adapter.factored is None or adapter.factored.terms is None:
        raise ValueError(f"save_peft: {adapter!r} on {path!r} has no factored "
                         "form to read its scaling from")
    r = t.a.shape[-1]
    # Unit factors built on the host (no per-shape scatter compiles).
    a, b, x = (np.zeros((n_in, r), np.float32), np.zeros((r, n_out), np.float32),
               np.zeros((1, n_in), np.float32))
    a[0, 0] = b[0, 0] = x[0, 0] = 1.0
    unit_f = None
    if isinstance(t, _inits.MiCAParams):
        unit, unit_f = _inits.MiCAParams(jnp.asarray(a)), _inits.MiCABasis(jnp.asarray(b))
    else:
        unit = (_adapters.LoRAParams(jnp.asarray(a), jnp.asarray(b))
                if isinstance(t, _adapters.LoRAParams)
                else _adapters.DoRAParams(jnp.asarray(a), jnp.asarray(b),
                                      jnp.ones((n_out,), jnp.float32)))
    terms = adapter.factored.terms(jnp.zeros((n_in, n_out), jnp.float32), unit, unit_f)
    return float(terms.delta(jnp.asarray(x))[0, 0])


def _targets(modules: list[str], key_map: Mapping[str, _peft_keys.PeftKey]
             ) -> list[str]:
    """Short names (``q_proj``) when they select exactly ``modules``."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = {k.module for k in key_map.values()
             if k.layout is not _peft_keys.TensorLayout.VECTOR}
    selected = {m for m in every if m.rsplit(".", 1)[-1] in short}
    return short if selected == set(modules) else sorted(modules)


def _full_tensors(full: Mapping[str, Any], params_flat: dict[str, Any],
                  key_map: dict[str, _peft_keys.PeftKey], prefix: str
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """``modules_to_save``: every tensor of each module, full leaves or base."""
    unrolled: dict[str, Any] = {}
    for path, value in full.items():
        nb = 0 if path in key_map else 1
        unrolled.update(_peft_keys.per_layer(path, value, nb, key_map, prefix,
                                             "save_peft"))
    modules = sorted({key_map[p].module for p in unrolled})
    tensors: dict[str, np.ndarray] = {}
    for upath, k in sorted(key_map.items()):
        if k.module not in modules:
            continue
        value = (unrolled[upath] if upath in unrolled
                 else _unrolled_leaf(upath, params_flat, prefix))
        arr = _np(value)
        if k.layout is _peft_keys.TensorLayout.KERNEL:
            arr = to_torch(arr, _peft_keys.layer_dims(k, arr.shape, 0, upath))
        tensors[f"{PREFIX}{k.module}.{k.tensor}"] = arr
    return tensors, modules


def _unrolled_leaf(upath: str, params_flat: dict[str, Any], prefix: str) -> Any:
    if upath in params_flat:
        return params_flat[upath]
    parts = upath.split("/")
    head = prefix.split("/")
    scanned = "/".join(head + parts[len(head) + 1:])
    if scanned in params_flat:
        return params_flat[scanned][int(parts[len(head)])]
    raise ValueError(f"save_peft: params have no leaf for {upath!r}")


def _base_layer(leaf: Any, dims: tree.ResolvedDims, path: str, upath: str,
                key_map: Mapping[str, PeftKey], prefix: str):
    """``() -> (n_in, n_out)`` host copy of ``upath``'s layer of a base kernel (on demand)."""
    def get() -> np.ndarray:
        m = tree.to_matrix(jnp.asarray(leaf), dims)
        layers = dict(_peft_keys.per_layer(path, m, len(dims.batch), key_map, prefix,
                                           "save_peft"))
        return np.asarray(jax.device_get(layers[upath]))

    return get


def _bias_layer(flat: Mapping[str, Any], path: str, upath: str, prefix: str):
    """``() -> (n_out,)`` host copy of ``upath``'s layer of the sibling bias, or None."""
    sib = path.rsplit("/", 1)[0] + "/bias" if "/" in path else "bias"
    if sib == path or sib not in flat:
        return None
    layer = None
    if upath != path:  # a scanned leaf: upath is "<prefix>/<i>/<rest>"
        layer = int(upath[len(prefix) + 1:].split("/", 1)[0])

    def get() -> np.ndarray:
        x = flat[sib] if layer is None else flat[sib][layer]
        return np.asarray(jax.device_get(x)).reshape(-1)

    return get


def save_peft(
    directory: str | os.PathLike,
    assignment: Mapping[str, _adapters.Adapter],
    state: _adapters.AdapterState,
    params: Any,
    *,
    key_map: Mapping[str, _peft_keys.PeftKey],
    full: Mapping[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
    use_rslora: bool = False,
    task_type: str | None = None,
    layers_prefix: str = "layers",
    tied_head: tuple[str, str] | None = None,
    layer_replication: list[list[int]] | None = None,
    alora_invocation_tokens: list[int] | None = None,
) -> pathlib.Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` for PEFT.

    Args:
      directory: created if missing.
      assignment: ``{path: Adapter}`` the state was made with.
      state: the ``AdapterState`` (unrolled or scanned paths).
      params: the base tree (shapes and, for ``modules_to_save`` modules,
        the tensors not trained in full).
      key_map: ``{unrolled path: PeftKey}`` of the model family.
      full: leaves trained in full (``trainable["full"]``): their modules are
        written as PEFT ``modules_to_save``.
      base_model_name_or_path: recorded in the config.
      use_rslora: write ``lora_alpha`` for ``alpha/√r`` (rsLoRA) instead of
        ``alpha/r``; the numeric scaling is the adapter's either way.
      task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), or None.
      layers_prefix: the layer container path of scanned states.
      tied_head: ``(table path, head module)`` when the model's head shares
        an embedding table, e.g. ``("embed_tokens/embedding", "lm_head")``
        for a tied Llama (SmolLM2): LoRA on (or full training of) that table
        is written for the head too, with ``ensure_weight_tying=True``.
      layer_replication: LoRA only: the ``[[start, end), ...]`` map that
        ``peftjax.models.replicate_layers`` made ``params`` with (PEFT's
        ``layer_replication``: PEFT replicates its base model the same way
        before loading the adapter).
      alora_invocation_tokens: a plain LoRA written as PEFT's aLoRA
        (``adapters.alora_hook``): the invocation token ids.

    Returns:
      The directory.

    Raises:
      ValueError / TypeError: a path missing from the key map, a method PEFT
        has no format for (SSF, LoRA-XS, AdaLoRA, ...), methods mixed in one
        adapter, VeRA leaves with different projections, embedding DoRA/VeRA,
        an adapter not made by its type's factory, or per-module settings no
        single PEFT config of the type describes (docs/peft_format.md).

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, json
      >>> from peftjax import adapters, tree
      >>> params = {"q": {"kernel": jnp.ones((4, 6))}}
      >>> km = {"q/kernel": PeftKey("attn.q", "weight", TensorLayout.KERNEL)}
      >>> a = tree.assign(params, [tree.Rule(where="q/kernel",
      ...                                    then=adapters.lora(2, alpha=4.0))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> d = save_peft(tempfile.mkdtemp(), a, st, params, key_map=km)
      >>> cfg = json.loads((d / "adapter_config.json").read_text())
      >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      (2, 4, ['q'])
    """
    key_map = _peft_keys.check_key_map(key_map, "save_peft")
    params_flat = tree.leaves_by_path(params)
    kinds: dict[str, str] = {}
    for path, adapter in assignment.items():
        t = state.trainable.get(path)
        tuner = _peft_tuners.for_params(t)
        kind = _TYPES.get(type(t)) or (tuner.peft_type if tuner else None)
        if kind is None:
            raise TypeError(
                f"save_peft: {adapter!r} on {path!r} (trainable "
                f"{type(t).__name__}) has no Hugging Face PEFT format; save_peft "
                "writes the types listed in docs/peft_format.md"
            )
        kinds[path] = kind
    types = sorted(set(kinds.values()))
    dora = {p for p in assignment if isinstance(state.trainable[p], _adapters.DoRAParams)}
    mica = {p for p in assignment if isinstance(state.trainable[p], _inits.MiCAParams)}
    if len(types) > 1 or (dora and len(dora) != len(assignment)) or (
            mica and len(mica) != len(assignment)):
        raise ValueError(f"save_peft: one PEFT adapter holds one method; got {kinds}")
    if not types:
        raise ValueError("save_peft: the assignment is empty")
    peft_type = types[0]
    tuner = _peft_tuners.TUNERS.get(peft_type)
    variants = _peft_lora_variants.write_checks(assignment, state.trainable,
                                                layer_replication, peft_type)
    infos: dict[str, Any] = {}
    if peft_type == "LN_TUNING":
        from peftjax.io import _peft_ln_tuning

        return _peft_ln_tuning.write(
            directory, assignment, state, params, key_map=key_map, full=full,
            base_model_name_or_path=base_model_name_or_path, task_type=task_type,
            layers_prefix=layers_prefix)
    if peft_type == "TRAINABLE_TOKENS":
        from peftjax.io import _peft_trainable_tokens

        return _peft_trainable_tokens.write(
            directory, assignment, state, params, key_map=key_map, full=full,
            base_model_name_or_path=base_model_name_or_path, task_type=task_type,
            layers_prefix=layers_prefix, tied_head=tied_head)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, Any] = {}
    dropouts: set[float] = set()
    modules: list[str] = []
    feedforward: list[str] = []
    vera_bases: list[tuple[str, Any]] = []
    vera_cfg: set[tuple] = set()
    bd_sides: dict[str, tuple[str, int]] = {}  # BD-LoRA: module -> (side, nblocks)
    for path in sorted(assignment):
        adapter, t, f = assignment[path], state.trainable[path], state.frozen[path]
        leaf = params_flat.get(path)
        if leaf is None:
            raise ValueError(f"save_peft: {path!r} is not a leaf of params")
        dn = adapter.dimension_numbers  # set for stacked leaves, factored form or not
        dims = tree.resolve(dn, tuple(np.shape(leaf)), path=path)
        nb = len(dims.batch)
        if peft_type == "LORA":  # one adapter (one scaling) for all layers
            s = _probe_scaling(adapter, t, dims.n_in, dims.n_out, path)
        for upath, (tu, fu) in _peft_keys.per_layer(path, (t, f), nb, key_map,
                                                    layers_prefix, "save_peft"):
            k = key_map[upath]
            base = PREFIX + k.module
            modules.append(k.module)
            emb = k.layout is _peft_keys.TensorLayout.EMBEDDING
            if k.layout is _peft_keys.TensorLayout.VECTOR or (
                    emb and (not (peft_type == "LORA" or (
                        tuner is not None and tuner.embeddings)) or dora)):
                raise ValueError(f"save_peft: {adapter!r} on {upath!r} ({k}) has no "
                                 "PEFT format (embedding LoRA only)")
            try:
                kd = _peft_keys.layer_dims(k, tuple(np.shape(leaf)), nb, path)
                key_axes = (kd.batch, kd.reduction, kd.output)
            except ValueError:  # a rank without a default view
                key_axes = None
            if key_axes != (dims.batch, dims.reduction, dims.output):
                raise ValueError(
                    f"save_peft: {adapter!r} on {path!r} (shape "
                    f"{tuple(np.shape(leaf))}) views it with reduction axes "
                    f"{dims.reduction} / output axes {dims.output}, but key_map"
                    f"[{upath!r}].dimension_numbers={k.dimension_numbers} does "
                    "not; give the key the adapter's dimension_numbers (without "
                    "the layer axis) so the file reads back")
            if tuner is not None:
                tt, infos[k.module] = tuner.write(_peft_tuner.ModuleWrite(
                    adapter, tu, fu, dims, upath, k.module, state, k,
                    _base_layer(leaf, dims, path, upath, key_map, layers_prefix),
                    _bias_layer(params_flat, path, upath, layers_prefix)))
                tensors.update({f"{base}.{x}": v for x, v in tt.items()})
            elif peft_type == "LORA" and _peft_lora_variants.is_variant(tu):
                r, tt, side = _peft_lora_variants.write_module(adapter, tu, fu, _np)
                ranks[k.module], alphas[k.module] = r, _peft_config.alpha_for(
                    s, r, use_rslora)
                dropouts.add(adapter.dropout)
                tensors.update({base + x: v for x, v in tt.items()})
                bd_sides.update({k.module: side} if side else {})
            elif peft_type == "LORA":
                r = int(tu.a.shape[-1])
                ranks[k.module] = r
                alphas[k.module] = _peft_config.alpha_for(s, r, use_rslora)
                dropouts.add(adapter.dropout)
                a, b = _np(tu.a).T, _np(fu.b if mica else tu.b).T
                if emb:
                    tensors[base + ".lora_embedding_A"] = np.ascontiguousarray(a)
                    tensors[base + ".lora_embedding_B"] = np.ascontiguousarray(b)
                else:
                    tensors[base + ".lora_A.weight"] = np.ascontiguousarray(a)
                    tensors[base + ".lora_B.weight"] = np.ascontiguousarray(b)
                if dora:
                    tensors[base + ".lora_magnitude_vector"] = _np(tu.magnitude)
            elif peft_type == "IA3":
                unit = _adapters.ScaleParams(jnp.ones_like(tu.scale))
                terms = adapter.factored.terms(
                    jnp.zeros((dims.n_in, dims.n_out), tu.scale.dtype), unit, None)
                vec = _np(tu.scale)
                if terms.in_scale is not None:
                    feedforward.append(k.module)
                    tensors[base + ".ia3_l"] = vec.reshape(1, -1)
                else:
                    tensors[base + ".ia3_l"] = vec.reshape(-1, 1)
            else:
                tensors[base + ".vera_lambda_b"] = _np(tu.lambda_b)
                tensors[base + ".vera_lambda_d"] = _np(tu.lambda_d)
                vera_bases.append((upath, fu))
                vera_cfg.add((int(tu.lambda_d.shape[-1]),))
    if peft_type == "VERA":
        tensors.update(_vera_shared(vera_bases, vera_cfg))
    tuner_fields: dict[str, Any] = {}
    if tuner is not None:
        tuner_fields, shared = tuner.config(infos)
        tensors.update(shared)
    full_modules: list[str] = []
    if full:
        ft, full_modules = _full_tensors(full, params_flat, key_map, layers_prefix)
        clash = sorted(set(full_modules) & set(modules))
        if clash:
            raise ValueError(f"save_peft: modules {clash} are both adapted and "
                             "trained in full")
        tensors.update(ft)
    tied = False
    if tied_head is not None:
        tied = _tie_head(tied_head, key_map, tensors, ranks, alphas)
        if tied and peft_type != "LORA":
            raise ValueError(f"save_peft: a {peft_type} adapter with the tied table "
                             f"{tied_head[0]!r} trained in full has no PEFT format "
                             "(PEFT ties heads for LoRA only)")
    config: dict[str, Any] = {
        "peft_type": peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "target_modules": _targets(modules, key_map),
        "modules_to_save": full_modules or None,
    }
    if tuner is not None:
        config.update(tuner_fields)
    elif peft_type == "LORA":
        if len(dropouts) > 1:
            raise ValueError(f"save_peft: adapters disagree on dropout {dropouts}")
        r, rank_pattern = _peft_config.most_common(ranks)
        alpha, alpha_pattern = _peft_config.most_common(alphas)
        config.update(r=r, lora_alpha=alpha, use_rslora=bool(use_rslora),
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      use_dora=bool(dora), lora_dropout=dropouts.pop(),
                      bias="none", fan_in_fan_out=False,
                      init_lora_weights="mica" if mica else True)
        if tied:
            config["ensure_weight_tying"] = True
        config.update(_peft_lora_variants.config_fields(variants, bd_sides, modules,
                                                        layer_replication))
        if alora_invocation_tokens is not None:
            if dora or not alora_invocation_tokens:
                raise ValueError("save_peft: alora_invocation_tokens needs plain LoRA "
                                 "(no DoRA) and a non-empty list of token ids")
            config["alora_invocation_tokens"] = [int(i) for i in alora_invocation_tokens]
    elif alora_invocation_tokens is not None:
        raise ValueError(f"save_peft: alora_invocation_tokens with a {peft_type} "
                         "adapter (aLoRA is a LoRA variant)")
    elif peft_type == "IA3":
        config.update(feedforward_modules=_targets(feedforward, key_map)
                      if feedforward else [], fan_in_fan_out=False)
    else:
        config.update(r=vera_cfg.pop()[0], save_projection=True, bias="none",
                      fan_in_fan_out=False)
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    _safetensors.write_safetensors(out / WEIGHTS_NAME, tensors,
                                   metadata={"format": "pt"})
    return out


def _tie_head(tied_head: Any, key_map: dict[str, _peft_keys.PeftKey],
              tensors: dict[str, np.ndarray], ranks: dict[str, int],
              alphas: dict[str, Any]) -> bool:
    """Writes the tied head's copies of the table's LoRA/full tensors.

    Returns whether the table is adapted or saved (``ensure_weight_tying``).
    """
    head = _peft_keys.check_tied_head(tied_head, key_map, "save_peft")
    path = tied_head[0]
    k = key_map[path]
    src, dst = PREFIX + k.module, PREFIX + head
    if src + ".lora_embedding_A" in tensors:
        tensors[dst + ".lora_A.weight"] = np.ascontiguousarray(
            tensors[src + ".lora_embedding_B"].T)
        tensors[dst + ".lora_B.weight"] = np.ascontiguousarray(
            tensors[src + ".lora_embedding_A"].T)
        ranks[head], alphas[head] = ranks[k.module], alphas[k.module]
        return True
    if f"{src}.{k.tensor}" in tensors:
        tensors[f"{dst}.weight"] = tensors[f"{src}.{k.tensor}"]
        return True
    return False


def _vera_shared(bases: list[tuple[str, Any]], ranks: set[tuple]
                 ) -> dict[str, np.ndarray]:
    """Reassembles the shared ``vera_A``/``vera_B`` from the per-leaf slices."""
    if len(ranks) != 1:
        raise ValueError(f"save_peft: VeRA leaves have different ranks {ranks}")
    big_a = max(bases, key=lambda pb: pb[1].a.shape[0])[1].a
    big_b = max(bases, key=lambda pb: pb[1].b.shape[1])[1].b
    a_full, b_full = _np(big_a), _np(big_b)
    for upath, f in bases:
        n_in, n_out = f.a.shape[0], f.b.shape[1]
        if not (np.array_equal(_np(f.a), a_full[:n_in])
                and np.array_equal(_np(f.b), b_full[:, :n_out])):
            raise ValueError(f"save_peft: the VeRA basis of {upath!r} is not a slice "
                             "of one shared projection (different seeds?)")
    return {"base_model.vera_A": np.ascontiguousarray(a_full.T),
            "base_model.vera_B": np.ascontiguousarray(b_full.T)}
