# SPDX-License-Identifier: Apache-2.0
"""Hugging Face PEFT's ``ADAMSS`` tensors and config, per module.

PEFT (``tuners/adamss``) stores, per Linear module, the groups' trainable
pairs ``adamss_A.<i>`` ``(r_i, q)`` and ``adamss_B.<i>`` ``(|seg_i|, r_i)``
and the frozen ``adamss_newB`` ``(q, in')`` (right singular vectors of the
torch ``W``, or of ``[W | b]`` on a layer with a bias: ``in' = in + 1``, and
the update then moves the bias by the last column). The groups themselves
(which output rows ``seg_i`` each ``B_i`` writes) are not in the file: PEFT
recomputes them from the base weight whenever it builds the adapter
(``torch.svd_lowrank`` with ``q = min(r, out, in')`` seeded, then
scikit-learn's k-means over the rows of ``U``). peftjax reproduces them
without torch: ``svd_lowrank``'s outputs satisfy ``W newBᵀ = U S`` when
``out < in'`` and ``Wᵀ U = newBᵀ S`` with ``U`` in ``W``'s column space
otherwise, so ``U`` follows from ``newB`` and the base weight (and bias),
and ``adapters.adamss_segments`` runs scikit-learn's k-means (same seeds,
same Lloyd steps) on it. peftjax's padded ``AdaMSSParams`` (``a (K, R,
q)``, ``b (out, R)``) hold the same numbers (``R = subspace_rank``); the
bias column is ``AdaMSSBasis.bias_basis`` (``adapters.adamss(bias=True)``).

Refused, with the reason: ``q = out`` (``r >= out <= in'``): ``U`` is then
an orthogonal matrix, its rows are pairwise equidistant and k-means' groups
are decided by float32 rounding inside torch's SVD, which nothing else
reproduces; ``B_i`` shapes that disagree with the recomputed groups; an
``adamss_newB`` width that disagrees with the module's bias. ``save_peft``
refuses ``q = out`` too, a peftjax-initialised adapter with ``q < min(in',
out)`` (PEFT's truncated ``svd_lowrank`` is a randomised sketch, torch's
generator: PEFT would build another basis and other groups) and a
peftjax-initialised adapter on a layer with a bias (its init sees the
kernel only). It writes ``q = min(in, out) < out`` on bias-free layers
(PEFT's SVD is then exact) and adapters read from PEFT files (their basis
is PEFT's own sketch, which PEFT recomputes), after checking that the
groups are the k-means groups of the base weight and ``adamss_newB``.

Config: ``r``, ``num_subspaces``, ``subspace_rank``, ``init_weights``,
``use_dynamic_rank``, ``svd_threshold`` are honoured (checked against the
tensors); ``random_seed`` is inert given ``adamss_newB``; the ASA fields
(``use_asa``, ``asa_*``, ``init_warmup``, ``final_warmup``,
``mask_interval``) are accepted and ignored: ASA is a training schedule
(``adapters.adamss_asa_allocate`` and friends), PEFT saves no masks.

Exports: ``TUNER``.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax.io import _peft_tuner

_MAX = 64
_NEWB = "adamss_newB"
_AS = tuple(f"adamss_A.{i}" for i in range(_MAX))
_BS = tuple(f"adamss_B.{i}" for i in range(_MAX))
_FIELDS = ("rank", "num_subspaces", "subspace_rank", "init_weights", "use_dynamic_rank",
           "svd_threshold")
_ASA = ("use_asa", "asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval",
        "asa_importance_beta", "asa_uncertainty_beta", "asa_schedule_exponent")


def _augmented(m, what: str) -> np.ndarray:
    """PEFT's SVD input, transposed: ``[W | b]ᵀ (in (+1), out)`` in float64."""
    if m.base is None:
        raise ValueError(f"{what}: AdaMSS needs {m.module!r}'s base weight")
    w = np.asarray(m.base(), np.float64)  # (in, out) = torch Wᵀ
    if m.bias is not None:
        w = np.concatenate([w, np.asarray(m.bias(), np.float64)[None, :]], axis=0)
    return w


def _groups(w: np.ndarray, newb: np.ndarray, k: int, where: str) -> np.ndarray:
    """PEFT's k-means groups from ``w = [W | b]ᵀ (in', out)`` and ``newB (q, in')``."""
    v = np.asarray(newb, np.float64).T  # (in', q)
    if w.shape[1] < w.shape[0]:  # out < in': svd_lowrank sketches Wᵀ, W V = U S exactly
        us = w.T @ v
    else:  # U lies in W's column space and Wᵀ U = V S: U S⁻¹ = W (WᵀW)⁻¹ V
        us = w.T @ np.linalg.solve(w @ w.T, v)
    norms = np.linalg.norm(us, axis=0)
    if not np.all(norms > 0):
        raise ValueError(f"{where}: the base weight is rank-deficient on {_NEWB}; PEFT's "
                         "AdaMSS groups are not reproducible")
    return _adapters.adamss_segments((us / norms).astype(np.float32), k)


def _exact(w: np.ndarray, basis: np.ndarray) -> bool:
    """Whether ``basis (in, q)`` spans an invariant subspace of ``W Wᵀ`` (an exact SVD's)."""
    v = np.asarray(basis, np.float64)
    g = w @ (w.T @ v)
    res = g - v @ (v.T @ g)
    return bool(np.linalg.norm(res) <= 1e-4 * np.linalg.norm(g))


def _build(m: _peft_tuner.ModuleRead) -> tuple:
    c = m.config
    n_in, n_out = m.dims.n_in, m.dims.n_out
    newb = m.tensors[_NEWB]
    r = int(c.get("r", 100))
    n_aug = n_in + (m.bias is not None)  # PEFT appends the bias as a column of W
    q = min(r, n_aug, n_out)
    if newb.shape != (q, n_aug):
        raise ValueError(
            f"load_peft: {m.module!r} has {_NEWB} {newb.shape}; r={r} in {m.source} gives "
            f"(min(r, in', out)={q}, in'={n_aug})"
            + (" (in' = in + 1: the module has a bias)" if m.bias is not None else
               " (a file made on a Linear with a bias, which these params lack?)"))
    if q == n_out:
        raise ValueError(
            f"load_peft: {m.module!r} (in={n_in}, out={n_out}) with r={r}: PEFT's SVD rank "
            f"equals out, so it clusters the rows of an orthogonal matrix, which are all "
            "equidistant; its AdaMSS groups then follow float32 rounding in torch's SVD and "
            "cannot be reproduced (use r < out)")
    k = sum(1 for s in _AS if s in m.tensors)
    if set(m.tensors) != {_NEWB, *_AS[:k], *_BS[:k]}:
        raise ValueError(f"load_peft: {m.module!r} has tensors {sorted(m.tensors)}; "
                         f"expected {_NEWB} and adamss_A.i/adamss_B.i for i < {k}")
    want_k = min(int(c.get("num_subspaces", 5)), n_out)
    if k != want_k:
        raise ValueError(f"load_peft: {m.module!r} has {k} subspaces but num_subspaces in "
                         f"{m.source} gives {want_k}")
    rk = int(c.get("subspace_rank", 1))
    labels = _groups(_augmented(m, "load_peft"), newb, k, f"load_peft: {m.module!r}")
    a = np.zeros((k, rk, q), np.float32)
    b = np.zeros((n_out, rk), np.float32)
    mask = np.zeros((k, rk), np.float32)
    for i in range(k):
        ai, bi = m.tensors[_AS[i]], m.tensors[_BS[i]]
        rows = np.flatnonzero(labels == i)
        ri = ai.shape[0] if ai.ndim == 2 else -1
        if ai.shape != (ri, q) or not 1 <= ri <= rk or bi.shape != (rows.size, ri):
            raise ValueError(
                f"load_peft: {m.module!r} has adamss_A.{i} {ai.shape} and adamss_B.{i} "
                f"{bi.shape}, but the base weight's group {i} has {rows.size} output rows "
                f"(expected ((r_i <= subspace_rank={rk}), {q}) and ({rows.size}, r_i)); "
                "PEFT's k-means groups were not reproduced")
        a[i, :ri] = ai
        b[rows, :ri] = bi
        mask[i, :ri] = 1.0
    iw = c.get("init_weights", "orthogonal")
    adapter = _adapters.adamss(
        r, num_subspaces=int(c.get("num_subspaces", 5)), subspace_rank=rk,
        init_weights=iw == "orthogonal",
        use_dynamic_rank=bool(c.get("use_dynamic_rank", False)),
        svd_threshold=float(c.get("svd_threshold", 0.1)), bias=m.bias is not None,
        param_dtype=m.dtype, dimension_numbers=m.dimension_numbers)
    t = _adapters.AdaMSSParams(jnp.asarray(a, m.dtype), jnp.asarray(b, m.dtype))
    nb32 = np.asarray(newb, np.float32)
    f = _adapters.AdaMSSBasis(jnp.asarray(nb32[:, :n_in].T), jnp.asarray(labels, jnp.int32),
                              jnp.asarray(mask),
                              None if m.bias is None else jnp.asarray(nb32[:, n_in]))
    return adapter, t, f


def _write(m: _peft_tuner.ModuleWrite) -> tuple[dict[str, np.ndarray], tuple]:
    hp = dict(m.adapter.hyperparameters)
    if "num_subspaces" not in hp or not isinstance(m.trainable, _adapters.AdaMSSParams):
        raise ValueError(f"save_peft: {m.adapter!r} on {m.path!r} is not a "
                         "peftjax.adapters.adamss adapter")
    n_in, n_out = m.dims.n_in, m.dims.n_out
    f = jax.device_get(m.frozen)
    has_bias = f.bias_basis is not None
    n_aug = n_in + has_bias
    q = min(hp["rank"], n_aug, n_out)
    where = f"save_peft: {m.path!r} (in={n_in}, out={n_out}) with rank={hp['rank']}"
    if m.bias is not None and (not has_bias or not np.any(np.asarray(f.bias_basis))):
        raise ValueError(
            f"{where}: the module has a bias, which PEFT appends to W before its SVD (its "
            "groups and basis differ), but this adapter's basis is of the kernel alone "
            "(peftjax's init); only AdaMSS adapters read from PEFT files of such layers "
            "are written")
    if has_bias and m.bias is None:
        raise ValueError(f"{where}: the adapter (bias=True) moves a bias the params lack")
    if q == n_out:
        raise ValueError(f"{where}: PEFT's SVD rank equals out, its AdaMSS groups follow "
                         "float32 rounding in torch's SVD; use rank < out")
    a, b = np.asarray(jax.device_get(m.trainable.a)), np.asarray(jax.device_get(m.trainable.b))
    labels, mask = np.asarray(f.labels), np.asarray(f.mask)
    newb = np.asarray(f.basis).T
    if has_bias:
        newb = np.concatenate([newb, np.asarray(f.bias_basis)[:, None]], axis=1)
    w = _augmented(m, "save_peft")
    if q < min(n_aug, n_out) and _exact(w, newb.T):
        raise ValueError(
            f"{where}: the basis is the exact truncated SVD (peftjax's init), but PEFT "
            "rebuilds its groups from torch.svd_lowrank's randomised sketch of rank "
            "< min(in, out), another basis and other groups; PEFT files need rank >= "
            "min(in, out) (a basis read from a PEFT file, PEFT's own sketch, is written)")
    if not np.array_equal(_groups(w, newb, a.shape[0], where), labels):
        raise ValueError(f"{where}: the adapter's groups are not the k-means groups PEFT "
                         "computes from the base weight and adamss_newB")
    tensors = {_NEWB: np.ascontiguousarray(newb.astype(np.float32))}
    for i in range(a.shape[0]):
        ri = int(mask[i].sum())
        tensors[_AS[i]] = np.ascontiguousarray(a[i, :ri])
        tensors[_BS[i]] = np.ascontiguousarray(b[labels == i, :ri])
    return tensors, tuple(hp[k] for k in _FIELDS)


def _config(infos: Mapping[str, tuple]) -> tuple[dict[str, Any], dict]:
    found = set(infos.values())
    if len(found) != 1:
        raise ValueError("save_peft: one PEFT AdaMSS adapter has one setting of "
                         f"{', '.join(_FIELDS)}; the modules have {sorted(found, key=repr)}")
    v = dict(zip(_FIELDS, found.pop(), strict=True))
    return {"r": v["rank"], "num_subspaces": v["num_subspaces"],
            "subspace_rank": v["subspace_rank"],
            "init_weights": "orthogonal" if v["init_weights"] else None,
            "use_dynamic_rank": v["use_dynamic_rank"], "svd_threshold": v["svd_threshold"],
            "use_asa": False}, {}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


TUNER = _peft_tuner.Tuner(
    peft_type="ADAMSS",
    params_types=(_adapters.AdaMSSParams,),
    suffixes=(_NEWB, *_AS, *_BS),
    build=_build,
    write=_write,
    config=_config,
    required=lambda found: found | {_NEWB},
    honoured=frozenset({"r", "num_subspaces", "subspace_rank", "init_weights",
                        "use_dynamic_rank", "svd_threshold", "random_seed",
                        "layers_to_transform", "layers_pattern", *_ASA}),
    field_types={
        "r": (lambda v: _int(v) and v > 0, "a positive integer"),
        "num_subspaces": (lambda v: _int(v) and v > 0, "a positive integer"),
        "subspace_rank": (lambda v: _int(v) and v > 0, "a positive integer"),
        "init_weights": (lambda v: v == "orthogonal", "'orthogonal' or null"),
        "use_dynamic_rank": (lambda v: isinstance(v, bool), "true or false"),
        "svd_threshold": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "random_seed": (_int, "an integer"),
        "use_asa": (lambda v: isinstance(v, bool), "true or false"),
    },
)
