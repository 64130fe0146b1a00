# SPDX-License-Identifier: Apache-2.0
"""LoRA ``(a, b)`` factor pairs found by key path, shared by LoRA-FA and the
Riemannian preconditioner.

A pair is two sibling leaves ``<prefix>/a`` and ``<prefix>/b`` (the
``LoRAParams(a, b)`` layout of LoRA-family adapters): ``a: (..., in, r)``,
``b: (..., r, out)``, leading axes (a scanned ``(L, ...)`` stack) shared.
PEFT's ``lora_A.weight: (r, in)`` is ``aᵀ`` and ``lora_B.weight: (out, r)`` is
``bᵀ``, so its ``A Aᵀ`` is ``aᵀ a`` and its ``Bᵀ B`` is ``b bᵀ``.

Exports (private): ``find_pairs``, ``gram_in``, ``gram_out``, ``damped_pinv``,
``damped_pinvs``, ``compute_dtype``, ``rebuild``.
"""

from typing import Any

import jax
import jax.numpy as jnp

from peftjax import tree


def _describe(flat: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{p} {tuple(getattr(x, 'shape', ()))}" for p, x in flat[:8]) + (
        f", ... ({len(flat)} leaves)" if len(flat) > 8 else "")


def find_pairs(params: Any, who: str) -> dict[str, tuple[str, str]]:
    """``{prefix: (a_path, b_path)}`` for every sibling ``a``/``b`` leaf pair.

    Raises:
      ValueError: leaves but no pair (the message lists the paths seen), or a pair whose
        shapes do not chain as ``a: (..., in, r)``, ``b: (..., r, out)`` (the
        message names the path and both shapes).
    """
    flat = tree.flatten(params)
    leaves = dict(flat)
    pairs = {}
    for path, a in flat:
        prefix, _, last = path.rpartition("/")
        if last != "a" or not prefix or f"{prefix}/b" not in leaves:
            continue
        b = leaves[f"{prefix}/b"]
        if (a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]
                or a.shape[-1] != b.shape[-2]):
            raise ValueError(
                f"{who}: the LoRA pair at {prefix!r} has shapes a {tuple(a.shape)} and "
                f"b {tuple(b.shape)}; expected a (..., in, r) and b (..., r, out) with "
                "the same leading (layer) axes"
            )
        pairs[prefix] = (path, f"{prefix}/b")
    if flat and not pairs:  # a leafless tree (optax.tree.map_params' placeholder) passes
        raise ValueError(
            f"{who}: no LoRA factor pair found (sibling leaves '<path>/a' and "
            f"'<path>/b'); paths seen: {_describe(flat)}"
        )
    return pairs


def gram_in(a: jax.Array) -> jax.Array:
    """``aᵀ a``, ``(..., r, r)`` (PEFT's ``A Aᵀ``)."""
    return jnp.einsum("...ir,...is->...rs", a, a)


def gram_out(b: jax.Array) -> jax.Array:
    """``b bᵀ``, ``(..., r, r)`` (PEFT's ``Bᵀ B``)."""
    return jnp.einsum("...ro,...so->...rs", b, b)


def damped_pinv(m: jax.Array, reg: jax.typing.ArrayLike) -> jax.Array:
    """``pinv(m + reg·I)`` over the last two axes, torch's default cutoff.

    ``torch.linalg.pinv`` drops singular values below ``max(m, n)·eps·σ_max``
    (``jnp.linalg.pinv``'s default is ten times that); the explicit ``rtol``
    keeps PEFT's cutoff.
    """
    r = m.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(r, dtype=m.dtype), m.shape)
    damped = m + jnp.asarray(reg, m.dtype) * eye
    return jnp.linalg.pinv(damped, rtol=r * jnp.finfo(m.dtype).eps)


def damped_pinvs(mats: list[jax.Array], reg: jax.typing.ArrayLike) -> list[jax.Array]:
    """``damped_pinv`` of every matrix, one batched call per ``(r, dtype)``.

    The ``(..., r, r)`` Gram matrices of all pairs with one rank are stacked
    so a model with many adapted layers compiles and runs one pseudo-inverse,
    not one per layer.
    """
    groups: dict[tuple[int, Any], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[-1], m.dtype), []).append(i)
    out: list[Any] = [None] * len(mats)
    for (r, _), idx in groups.items():
        flat = [mats[i].reshape(-1, r, r) for i in idx]
        inv = damped_pinv(jnp.concatenate(flat, axis=0), reg)
        start = 0
        for i, f in zip(idx, flat, strict=True):
            out[i] = inv[start:start + f.shape[0]].reshape(mats[i].shape)
            start += f.shape[0]
    return out


def compute_dtype(dtype: Any) -> Any:
    """At least float32 (PEFT's ``promote_types(dtype, float32)``)."""
    return jnp.dtype(dtype) if jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(jnp.float32)


def rebuild(updates: Any, new: dict[str, jax.Array]) -> Any:
    """``updates`` with the leaves named in ``new`` replaced (same structure)."""
    return tree.map_with_path(lambda p, u: new.get(p, u), updates)
