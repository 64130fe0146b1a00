# SPDX-License-Identifier: Apache-2.0
"""Export: a trained adapter over a residual base as a plain LoRA over the original base.

PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948, §4 "conversion"),
and likewise OLoRA, LoRA-GA and CorDA, train ``W_res + s·B A`` with
``W_res = W − s·B₀A₀``. Since ``W_res + s·B_T A_T = W + s·(B_T A_T − B₀A₀)``,
the trained model equals the *unmodified* ``W`` plus a rank-``2r`` LoRA with
``B' = [B_T, −B₀]``, ``A' = [A_T; A₀]`` (PEFT
``path_initial_model_for_weight_conversion``). In Flax layout
``a' = [a_T, −a₀]`` (concatenated along the rank axis) and
``b' = [b_T; b₀]``; the scaling is kept by ``alpha' = 2·alpha``
(``alpha/r``), ``√2·alpha`` (``alpha/√r``) or ``alpha`` (none) ↔ ``to_lora``.

LoRA-SB does not modify the base: its state is exported as-is (a LoRA-XS
adapter over the original base), or as a rank-``r`` LoRA with
``a' = a·core``, ``b' = b``. The orthogonal init is a plain LoRA already
(passed through); MiCA's trained ``a`` and frozen ``b`` become a rank-``r``
LoRA ``(a, b)``. LoftQ is refused: its base is the quantised ``Q``, not
``W − s·B₀A₀``, and its state is a plain LoRA over ``Q`` as it stands.

Exports: ``to_lora``.
"""

import math
from typing import Any

import jax.numpy as jnp

from peftjax import adapters as _adapters
from peftjax.inits import _base


def _alpha_for(scaling: _adapters.Scaling, alpha: float, factor: int) -> float:
    if scaling is _adapters.Scaling.ALPHA_OVER_RANK:
        return alpha * factor
    if scaling is _adapters.Scaling.ALPHA_OVER_SQRT_RANK:
        return alpha * math.sqrt(factor)
    return alpha


def to_lora(
    plan: dict[str, _base.Initializer],
    initial: dict[str, Any],
    trained: dict[str, Any],
    frozen: dict[str, Any] | None = None,
) -> tuple[dict[str, _adapters.Adapter], _adapters.AdapterState]:
    """Converts trained init-based adapters into plain LoRA over the original base.

    Args:
      plan: the ``{path: Initializer}`` used with ``inits.run``.
      initial: ``InitResult.state.trainable`` right after ``inits.run``
        (``B₀``, ``A₀``; keep a copy before training).
      trained: the trained ``trainable`` dict.
      frozen: ``InitResult.state.frozen`` (needed for LoRA-SB and MiCA).

    Returns:
      ``(assignment, AdapterState)`` such that
      ``adapters.fold(assignment, original_params, *state)`` equals
      ``adapters.fold(res.assignment, res.params, trained, res.state.frozen)``
      (to float32 rounding): rank ``2r`` LoRA for inits that modify the base,
      rank ``r`` LoRA (``a·core``, ``b``) for LoRA-SB.

    Raises:
      ValueError: a path missing from ``initial``/``trained``/``frozen``, or
        factors whose shapes do not match.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, inits, tree
      >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
      >>> plan = tree.assign(params, [tree.Rule(where="w", then=inits.pissa(rank=1))])
      >>> res = inits.run(plan, jax.random.key(0), params)
      >>> trained = {"w": res.state.trainable["w"]._replace(b=res.state.trainable["w"].b * 2)}
      >>> asg, st = inits.to_lora(plan, res.state.trainable, trained)
      >>> w1 = adapters.fold(asg, params, *st)["w"]
      >>> w2 = adapters.fold(res.assignment, res.params, trained, res.state.frozen)["w"]
      >>> bool(jnp.allclose(w1, w2)), st.trainable["w"].a.shape
      (True, (3, 2))
    """
    assignment: dict[str, _adapters.Adapter] = {}
    trainable: dict[str, Any] = {}
    frozen_out: dict[str, Any] = {}
    for path, ini in plan.items():
        if not isinstance(ini, _base.Initializer):
            raise TypeError(f"to_lora: the payload for {path!r} is not an initialiser: {ini!r}")
        for name, d in (("initial", initial), ("trained", trained)):
            if path not in d:
                raise ValueError(f"to_lora: {name} has no state for {path!r}")
        t = trained[path]
        if ini.modifies_base and not ini.exact_residual:
            raise ValueError(
                f"to_lora: {ini!r} on {path!r} trains over a base that is not "
                "W − s·a₀@b₀ (LoftQ's quantised Q); its state is already a plain "
                "LoRA over that base: export it with the base it was trained on")
        if not ini.modifies_base and isinstance(t, _adapters.LoRAParams):
            trainable[path] = t  # orthogonal: a plain LoRA over the original base
            assignment[path] = ini.adapter
            frozen_out[path] = None
            continue
        if not ini.modifies_base and not hasattr(t, "core"):
            if frozen is None or path not in frozen:
                raise ValueError(
                    f"to_lora: {ini!r} on {path!r} needs its frozen factor; pass "
                    "frozen=InitResult.state.frozen")
            trainable[path] = _adapters.LoRAParams(a=t.a, b=frozen[path].b)  # MiCA
            assignment[path] = _adapters.lora(
                ini.rank, alpha=ini.alpha, scaling=ini.scaling,
                dimension_numbers=ini.dimension_numbers, param_dtype=ini.param_dtype)
            frozen_out[path] = None
            continue
        if not ini.modifies_base:
            if frozen is None or path not in frozen:
                raise ValueError(
                    f"to_lora: {ini!r} on {path!r} needs its frozen basis; pass "
                    "frozen=InitResult.state.frozen")
            f = frozen[path]
            a = jnp.matmul(f.a.astype(jnp.float32), t.core.astype(jnp.float32))
            trainable[path] = _adapters.LoRAParams(a=a.astype(ini.param_dtype), b=f.b)
            assignment[path] = _adapters.lora(
                ini.rank, alpha=ini.alpha, scaling=ini.scaling,
                dimension_numbers=ini.dimension_numbers, param_dtype=ini.param_dtype)
            frozen_out[path] = None
            continue
        t0 = initial[path]
        if t.a.shape != t0.a.shape or t.b.shape != t0.b.shape:
            raise ValueError(
                f"to_lora: {path!r}: trained factors a {t.a.shape}, b {t.b.shape} do "
                f"not match the initial a {t0.a.shape}, b {t0.b.shape}")
        a = jnp.concatenate([t.a, -t0.a.astype(t.a.dtype)], axis=-1)
        b = jnp.concatenate([t.b, t0.b.astype(t.b.dtype)], axis=-2)
        trainable[path] = _adapters.LoRAParams(a=a, b=b)
        frozen_out[path] = None
        assignment[path] = _adapters.lora(
            2 * ini.rank, alpha=_alpha_for(ini.scaling, ini.alpha, 2),
            scaling=ini.scaling, dimension_numbers=ini.dimension_numbers,
            param_dtype=ini.param_dtype)
    return assignment, _adapters.AdapterState(trainable=trainable, frozen=frozen_out)
