# SPDX-License-Identifier: Apache-2.0
"""Shared construction of LoRA-shaped initialisers (residual base + LoRA factors).

Exports: ``lora_initializer``, ``check_common``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base


def check_fits(rank: int, w: jax.Array, name: str, factor: int = 1) -> None:
    """Raises if ``factor·rank > min(in, out)`` of the matrix ``w (in, out)``."""
    n_in, n_out = w.shape[-2], w.shape[-1]
    if factor * rank > min(n_in, n_out):
        need = f"{factor}·rank={factor * rank}" if factor > 1 else f"rank={rank}"
        raise ValueError(
            f"{name}: {need} exceeds min(in, out)={min(n_in, n_out)} of the matrix "
            f"view (in={n_in}, out={n_out}, dtype {w.dtype})")


def lora_initializer(
    *,
    name: str,
    rank: int,
    alpha: float,
    scaling: _adapters.Scaling,
    factors: Callable[[jax.Array, jax.Array, Any, float], tuple[jax.Array, jax.Array]],
    stats: str | None,
    dimension_numbers: tree.DimensionNumbers | None,
    param_dtype: Any,
    min_dim_factor: int = 1,
) -> _base.Initializer:
    """Builds an initialiser whose adapter is ``lora(rank, alpha, scaling)``.

    ``factors(key, w (in, out) float32, stats, s) -> (a (in, r), b (r, out))``;
    the residual is ``w - s·a@b`` computed in float32 with the factors already
    cast to ``param_dtype`` (so residual + adapter equals ``w`` to float32
    rounding), then cast to ``w``'s dtype.
    """
    s = _adapters.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    adapter = _adapters.lora(rank, alpha=alpha, scaling=scaling,
                             dimension_numbers=dimension_numbers,
                             param_dtype=param_dtype)

    def init_matrix(key, w, st):
        check_fits(rank, w, name, min_dim_factor)
        w32 = w.astype(jnp.float32)
        a, b = factors(key, w32, st, s)
        a = a.astype(param_dtype)
        b = b.astype(param_dtype)
        res = w32 - jnp.asarray(s, jnp.float32) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        return res, _adapters.LoRAParams(a=a, b=b), None

    return _base.Initializer(
        init=_base.lift(name, init_matrix, dimension_numbers, stats),
        adapter=adapter, stats=stats, modifies_base=True, rank=rank,
        alpha=float(alpha), scaling=scaling, dimension_numbers=dimension_numbers,
        param_dtype=param_dtype,
        name=f"{name}(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        relayout=lambda dims: lora_initializer(
            name=name, rank=rank, alpha=alpha, scaling=scaling, factors=factors,
            stats=stats, dimension_numbers=dims, param_dtype=param_dtype,
            min_dim_factor=min_dim_factor))
