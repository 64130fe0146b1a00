# SPDX-License-Identifier: Apache-2.0
"""PEFT LoRA files with a LoRA variant: QA-LoRA, BD-LoRA, MonteCLoRA, KaSA, layer replication.

These are ``peft_type: LORA`` files whose ``LoraConfig`` sets ``use_qalora``
(+ ``qalora_group_size``), ``use_bdlora``, ``monteclora_config``, ``kasa_config`` or
``layer_replication``; ``_peft_read`` / ``_peft_write`` call this module for
the per-module tensors and config fields of each (docs/peft_format.md):

* QA-LoRA: ``lora_A (r, in/g)`` -> ``QALoRAParams.a (in/g, r)``.
* BD-LoRA: the block-diagonal factor is PEFT's ``BlockDiagonalLinear``
  weight, ``lora_A (r, in/nb)`` -> ``a (nb, in/nb, r/nb)`` or ``lora_B (out,
  r/nb)`` -> ``b (nb, r/nb, out/nb)``; the side of each module comes from
  PEFT's substring patterns (``bdlora_side``).
* MonteCLoRA: ``lora_monteclora_sampler.{std_prior, expert_weights_prior}``
  (trainable) and ``.{gaussian_var_prior, expert_weights}`` (PEFT's buffers,
  frozen here).
* KaSA: ``lora_diag (r,)`` -> ``KaSAParams.diag``; the frozen truncation is
  rebuilt from the module's base weight (``adapters.kasa_basis``'s SVD, in
  NumPy), as PEFT
  truncates the base when it loads the file; ``kasa_config``'s ``beta`` /
  ``gamma`` are the adapter's (for ``kasa_loss``).
* ``layer_replication``: the caller replicates the base
  (``peftjax.models.replicate_layers``); the key map must have the new depth.

Exports: ``MC_FIELDS``, ``MC_SUFFIXES``, ``bdlora_side``, ``check_replication``,
``extra_needs``, ``read_module``, ``is_variant``, ``write_checks``,
``write_module``, ``config_fields``.
"""

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree

# MonteCLoRA's sampler tensors: (file suffix, field of the module's tensors)
MC_SUFFIXES = tuple((f".lora_monteclora_sampler.{x}", f"mc_{x}") for x in (
    "std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights"))
MC_NEEDS = frozenset(f for _, f in MC_SUFFIXES)
# KaSA's trainable singular values: (file suffix, field)
KASA_SUFFIX = (".lora_diag", "diag")
# MonteCLoRA's hyperparameters written as PEFT's monteclora_config
MC_FIELDS = ("num_samples", "use_entropy", "dirichlet_prior", "sample_scaler",
             "kl_loss_weight")
_VARIANTS = (_adapters.QALoRAParams, _adapters.BdLoRAParams, _adapters.MonteCLoRAParams,
             _adapters.KaSAParams)


def bdlora_side(config: Mapping[str, Any], module: str, source: str) -> str | None:
    """BD-LoRA's block-diagonal factor of ``module`` under ``use_bdlora``.

    PEFT's ``BdLoraLinearVariant.init``: a pattern of ``target_modules_bd_a``
    (``_bd_b``) that is a substring of the full module name makes ``A``
    (``B``) block-diagonal.

    Args:
      config: the checked ``adapter_config.json``.
      module: the full module name.
      source: the file, for error messages.

    Returns:
      ``"a"``, ``"b"``, or None (a plain LoRA module, or no ``use_bdlora``).

    Raises:
      ValueError: both sides match, or neither with ``match_strict`` (PEFT
        raises too).

    Example:
      >>> cfg = {"use_bdlora": {"target_modules_bd_a": ["o_proj"],
      ...                       "target_modules_bd_b": ["q_proj"], "nblocks": 2}}
      >>> bdlora_side(cfg, "model.layers.0.self_attn.q_proj", "cfg.json")
      'b'
    """
    bd = config.get("use_bdlora")
    if not bd:
        return None
    a = any(p in module for p in bd.get("target_modules_bd_a") or [])
    b = any(p in module for p in bd.get("target_modules_bd_b") or [])
    if a and b:
        raise ValueError(f"{source}: use_bdlora: {module!r} matches both "
                         "target_modules_bd_a and target_modules_bd_b (PEFT raises too)")
    if not (a or b) and bd.get("match_strict", True):
        raise ValueError(f"{source}: use_bdlora: {module!r} matches neither "
                         "target_modules_bd_a nor target_modules_bd_b with "
                         "match_strict=True (PEFT raises too)")
    return "a" if a else "b" if b else None


def extra_needs(peft_type: str, config: Mapping[str, Any]) -> frozenset:
    """Tensor fields a LoRA module needs besides ``a``/``b`` (MonteCLoRA's sampler, KaSA's diag)."""
    if peft_type != "LORA":
        return frozenset()
    return ((MC_NEEDS if config.get("monteclora_config") else frozenset())
            | ({KASA_SUFFIX[1]} if config.get("kasa_config") else set()))


def check_replication(config: Mapping[str, Any], key_map: Mapping[str, Any],
                      prefix: str, source: str) -> None:
    """``layer_replication``: the key map (and params) must be the replicated model's."""
    spans = config.get("layer_replication")
    if not spans:
        return
    want = sum(end - start for start, end in spans)
    head = prefix + "/"
    got = {p[len(head):].split("/", 1)[0] for p in key_map if p.startswith(head)}
    if len(got) != want:
        raise ValueError(
            f"load_peft: {source} has layer_replication={spans!r}: PEFT's model has "
            f"{want} layers, the key map {len(got)}; replicate params and config "
            "with peftjax.models.replicate_layers first and build the key map from "
            "the returned config")


def read_module(config: Mapping[str, Any], module: str, got: Mapping[str, np.ndarray],
                kw: dict, dims: tree.ResolvedDims, emb: bool, use_dora: bool,
                arr: Callable[[np.ndarray], Any], source: str,
                base: Callable[[], np.ndarray] | None = None) -> tuple | None:
    """``(adapter, trainable, frozen)`` of a variant LoRA module, or None (plain LoRA).

    ``got`` holds the torch tensors (``a`` = ``lora_A``, ``b`` = ``lora_B``,
    MonteCLoRA's ``mc_*``, KaSA's ``diag``); ``kw`` the LoRA factory keywords
    (``init`` is dropped); ``arr`` makes an array in the requested dtype;
    ``base`` returns the module's ``(in, out)`` base matrix (KaSA).
    """
    a, b = got["a"], got["b"]
    r = int(a.shape[0])
    kw = {k: v for k, v in kw.items() if k != "init"}
    ks = config.get("kasa_config")
    if ks:  # KaSA: LoRA + lora_diag on a truncated base
        if (emb or use_dora or config.get("use_qalora") or config.get("use_bdlora")
                or config.get("monteclora_config")):
            raise ValueError(f"load_peft: kasa_config on {module!r} with an embedding, "
                             "use_dora, use_qalora, use_bdlora or monteclora_config "
                             "(PEFT's KaSA adapts Linear modules only, as the one "
                             "LoRA variant)")
        d = got[KASA_SUFFIX[1]]
        n_in, n_out = dims.n_in, dims.n_out
        if d.shape != (r,) or r >= min(n_in, n_out) or base is None:
            raise ValueError(
                f"load_peft: {module!r} has lora_A {a.shape} and lora_diag {d.shape}; "
                f"KaSA needs lora_diag ({r},) and a rank < min(in, out)="
                f"{min(n_in, n_out)}" + ("" if base is not None else
                                         ", and the module's base weight"))
        ad = _adapters.kasa(r, beta=float(ks.get("beta", 1e-4)),
                            gamma=float(ks.get("gamma", 1e-3)), **kw)
        # adapters.kasa_basis's float32 SVD, with NumPy on the host (no compiles)
        w = np.asarray(base(), np.float32)
        ud = np.linalg.svd(w, full_matrices=False)[0][:, -r:]
        f = _adapters.KaSABasis(arr(ud), arr(ud.T @ w))
        return ad, _adapters.KaSAParams(arr(a.T), arr(b.T), arr(d)), f
    mc = config.get("monteclora_config")
    if mc:  # MonteCLoRA: LoRA + the sampler's priors and buffers
        n = int(mc.get("num_samples", 8))
        std, prior = got["mc_std_prior"], got["mc_expert_weights_prior"]
        var, w = got["mc_gaussian_var_prior"], got["mc_expert_weights"]
        if emb or use_dora or config.get("use_qalora") or config.get("use_bdlora"):
            raise ValueError(f"load_peft: monteclora_config on {module!r} with an "
                             "embedding, use_dora, use_qalora or use_bdlora (PEFT "
                             "resolves one LoRA variant per Linear module)")
        shapes = (std.shape, prior.shape, var.shape, w.shape)
        if shapes != ((r,), (n,), (r, r), (n,)):
            raise ValueError(
                f"load_peft: {module!r} has MonteCLoRA sampler tensors of shapes "
                f"{shapes}; monteclora_config num_samples={n} with rank {r} needs "
                f"{((r,), (n,), (r, r), (n,))}")
        ad = _adapters.monteclora(
            r, num_samples=n, sample_scaler=float(mc.get("sample_scaler", 1e-4)),
            dirichlet_prior=float(mc.get("dirichlet_prior", 0.1)),
            kl_loss_weight=float(mc.get("kl_loss_weight", 1e-5)),
            use_entropy=bool(mc.get("use_entropy", False)), **kw)
        return (ad, _adapters.MonteCLoRAParams(arr(a.T), arr(b.T), arr(std), arr(prior)),
                _adapters.MonteCLoRABuffers(arr(var), arr(w)))
    side = None if emb else bdlora_side(config, module, source)
    if side is not None:  # BD-LoRA: one factor is PEFT's BlockDiagonalLinear
        nb = int(config["use_bdlora"].get("nblocks", 1))
        n_in, n_out = dims.n_in, dims.n_out
        want = ({"a": (r, n_in // nb), "b": (n_out, r)} if side == "a"
                else {"a": (r, n_in), "b": (n_out, r // nb)})
        if (use_dora or r % nb or (n_in if side == "a" else n_out) % nb
                or {"a": a.shape, "b": b.shape} != want):
            raise ValueError(
                f"load_peft: {module!r} has lora_A {a.shape} and lora_B {b.shape}; "
                f"use_bdlora (block-diagonal {side.upper()}, nblocks={nb}, in={n_in}, "
                f"out={n_out}) needs {want['a']} and {want['b']}, without use_dora")
        if side == "a":
            t = _adapters.BdLoRAParams(arr(a.reshape(nb, r // nb, -1).transpose(0, 2, 1)),
                                       arr(b.T))
        else:
            t = _adapters.BdLoRAParams(arr(a.T),
                                       arr(b.reshape(nb, -1, r // nb).transpose(0, 2, 1)))
        return _adapters.bdlora(r, nblocks=nb, block_diagonal=side, **kw), t, None
    if config.get("use_qalora"):  # QA-LoRA: lora_A (r, in/group)
        if emb or use_dora:
            raise ValueError(f"load_peft: use_qalora on {module!r} with "
                             f"{'an embedding' if emb else 'use_dora'} (PEFT's "
                             "QA-LoRA adapts Linear modules only, without DoRA)")
        g = int(config.get("qalora_group_size", 16))
        if a.shape[1] * g != dims.n_in:
            raise ValueError(f"load_peft: {module!r} has lora_A {a.shape}; with "
                             f"qalora_group_size={g} and in={dims.n_in} it needs "
                             f"({r}, {dims.n_in // g}) (in divisible by the group)")
        return (_adapters.qalora(r, group_size=g, **kw),
                _adapters.QALoRAParams(arr(a.T), arr(b.T)), None)
    return None


def is_variant(t: Any) -> bool:
    """Whether a trainable NamedTuple is one of this module's LoRA variants."""
    return isinstance(t, _VARIANTS)


def write_checks(assignment: Mapping[str, _adapters.Adapter], trainable: Mapping[str, Any],
                 layer_replication: Any, peft_type: str) -> dict:
    """The per-file settings of the variants (one per PEFT config), checked.

    Returns ``{"group": ..., "mc": ..., "kasa": ...}`` (None where the file has
    none). PEFT refuses KaSA next to non-KaSA modules, and so does this check.
    """
    def one(kind, fields, name):
        vals = {tuple(dict(a.hyperparameters)[k] for k in fields)
                if isinstance(trainable[p], kind) else None for p, a in assignment.items()}
        if len(vals) > 1:
            raise ValueError(f"save_peft: PEFT's {name} holds for every module of an "
                             f"adapter, with one setting; got {sorted(map(str, vals))}")
        return vals.pop() if vals else None

    if layer_replication is not None and peft_type != "LORA":
        raise ValueError(f"save_peft: layer_replication is a LoRA field; got {peft_type}")
    return {"group": one(_adapters.QALoRAParams, ("group_size",), "use_qalora"),
            "mc": one(_adapters.MonteCLoRAParams, MC_FIELDS, "monteclora_config"),
            "kasa": one(_adapters.KaSAParams, ("beta", "gamma"), "kasa_config")}


def write_module(adapter: _adapters.Adapter, tu: Any, fu: Any, np_: Callable
                 ) -> tuple[int, dict[str, np.ndarray], tuple[str, int] | None]:
    """``(rank, {suffix: torch tensor}, BD-LoRA (side, nblocks) or None)`` of a module."""
    hp = dict(adapter.hyperparameters)
    r = int(hp["rank"])
    a, b = np_(tu.a), np_(tu.b)
    side = None
    if isinstance(tu, _adapters.BdLoRAParams):  # blocks: PEFT's BlockDiagonalLinear
        side, nb = hp["block_diagonal"], hp["nblocks"]
        a = a.transpose(0, 2, 1).reshape(r, -1) if side == "a" else a.T
        b = b.transpose(0, 2, 1).reshape(-1, r // nb) if side == "b" else b.T
        side = (side, nb)
    else:
        a, b = a.T, b.T
    out = {".lora_A.weight": np.ascontiguousarray(a),
           ".lora_B.weight": np.ascontiguousarray(b)}
    if isinstance(tu, _adapters.MonteCLoRAParams):
        mc = ".lora_monteclora_sampler."
        out.update({mc + "std_prior": np_(tu.std_prior),
                    mc + "expert_weights_prior": np_(tu.expert_weights_prior),
                    mc + "gaussian_var_prior": np_(fu.gaussian_var),
                    mc + "expert_weights": np_(fu.expert_weights)})
    if isinstance(tu, _adapters.KaSAParams):
        out[KASA_SUFFIX[0]] = np_(tu.diag)
    return r, out, side


def config_fields(settings: dict, bd_sides: dict[str, tuple[str, int]],
                  modules: list[str], layer_replication: Any) -> dict:
    """The variant fields of the written ``adapter_config.json``."""
    out: dict[str, Any] = {}
    if settings["group"] is not None:
        out.update(use_qalora=True, qalora_group_size=settings["group"][0])
    if settings["mc"] is not None:
        out["monteclora_config"] = dict(zip(MC_FIELDS, settings["mc"], strict=True),
                                        buffer_size=150)  # PEFT's default
    if settings["kasa"] is not None:
        out["kasa_config"] = dict(zip(("beta", "gamma"), settings["kasa"], strict=True))
    if bd_sides:
        out["use_bdlora"] = _bdlora_config(bd_sides, modules)
    if layer_replication is not None:
        out["layer_replication"] = [[int(x) for x in p] for p in layer_replication]
    return out


def _bdlora_config(sides: dict[str, tuple[str, int]], modules: list[str]) -> dict:
    """PEFT's ``use_bdlora`` (substring patterns) selecting exactly ``sides``."""
    blocks = {nb for _, nb in sides.values()}
    if len(blocks) > 1:
        raise ValueError(f"save_peft: PEFT's use_bdlora has one nblocks; got {sorted(blocks)}")
    strict = set(sides) == set(modules)
    for short in (True, False):  # module names' last part if unambiguous, else in full
        def pats(side, short=short):
            return sorted({m.rsplit(".", 1)[-1] if short else m
                           for m, (x, _) in sides.items() if x == side})
        cfg = {"target_modules_bd_a": pats("a"), "target_modules_bd_b": pats("b"),
               "nblocks": next(iter(blocks)), "match_strict": strict}
        try:
            got = {m: bdlora_side({"use_bdlora": cfg}, m, "save_peft") for m in modules}
        except ValueError:
            continue
        if got == {m: sides[m][0] if m in sides else None for m in modules}:
            return cfg
    raise ValueError("save_peft: no use_bdlora substring patterns select the "
                     f"block-diagonal sides {sides} (module names contain each other)")
