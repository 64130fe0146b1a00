# SPDX-License-Identifier: Apache-2.0
"""LoRA-FA: LoRA with a frozen ``A`` and ``B``'s gradient projected onto ``A``'s row space.

Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large
Language Models Fine-tuning", 2023, https://arxiv.org/abs/2308.03303, as
PEFT's ``optimizers/lorafa.py`` (``create_lorafa_optimizer``) implements it.

Paper ↔ code. ``A`` stays at its initialisation; ``B`` takes the gradient
that makes the low-rank update closest to the full one,
``min_{g_B} ‖s·g_B A − g‖_F`` (PEFT's comment), i.e. in PEFT's layout
``g̃_B = s⁻²·g_B (A Aᵀ + δI)⁺`` with ``s`` the LoRA scaling (``alpha/r``, or
``alpha/√r`` with rsLoRA) and ``δ = 1e-8``. On peftjax's ``a = Aᵀ: (in, r)``,
``b = Bᵀ: (r, out)`` this is ``g̃_b = s⁻²·(aᵀa + δI)⁺ g_b`` (``scale_by_lorafa``).
Then HF-style AdamW on ``b`` and on every leaf outside a pair (``lorafa``):
``eps`` added to ``√v`` before the bias correction, the decay
``p ← p − lr·wd·p`` applied to the *new* weights (``adamw_hf``).

Where PEFT's code and the paper's presentation differ, this follows PEFT:

* the ``(r/alpha)²`` factor and the damped pseudo-inverse ``pinv(AAᵀ + δI)``;
* on a machine with bfloat16 PEFT computes the projection under a bfloat16
  autocast (its product and the ``s⁻²`` scaling rounded to bfloat16);
  ``projection_dtype=jnp.bfloat16`` reproduces that, the default keeps it
  in float32 (at least the parameter dtype).
* PEFT pairs parameters by name order (any name containing ``lora``, so an
  embedding LoRA's ``lora_embedding_A`` is paired but not frozen); here a
  pair is exactly two sibling leaves ``<p>/a``, ``<p>/b``, every pair is
  treated alike, and other leaves (a DoRA magnitude, a head) get plain AdamW.

PEFT freezes ``A`` with ``requires_grad=False``. Here ``lorafa`` routes the
``a`` leaves to ``optax.set_to_zero`` through ``optax.partition``: their
updates are exactly zero, weight decay does not touch them, and they hold
no Adam moments (``optax.MaskedNode`` in the state). The gradient of ``a``
is still computed by the training step unless ``a`` is moved out of the
trainable tree.

Exports: ``LoRAFAState``, ``scale_by_lorafa``, ``lorafa``.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _lora_pairs
from peftjax.optim._adam import scale_and_decay_after, scale_by_adam_hf

_WHO = "scale_by_lorafa"


class LoRAFAState(NamedTuple):
    """State of ``scale_by_lorafa``.

    Attributes:
      count: steps taken. # shape=(), dtype=jnp.int32
    """

    count: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED}


def _scaling_for(scaling: Any, prefix: str) -> Any:
    if isinstance(scaling, Mapping):
        if prefix not in scaling:
            raise ValueError(
                f"{_WHO}: scaling has no entry for the LoRA pair at {prefix!r}; keys: "
                f"{sorted(scaling)[:8]}"
            )
        return scaling[prefix]
    return scaling


def _project(inv, g, s, projection_dtype):
    ct = inv.dtype
    factor = 1.0 / jnp.square(jnp.asarray(s, jnp.float32))
    if projection_dtype is None:
        out = factor.astype(ct) * jnp.matmul(inv, g.astype(ct))
    else:  # PEFT's autocast: the product and the scaling rounded to the dtype
        pd = jnp.dtype(projection_dtype)
        prod = jnp.matmul(inv.astype(pd), g.astype(pd), preferred_element_type=jnp.float32)
        out = (prod.astype(pd).astype(jnp.float32) * factor).astype(pd)
    return out.astype(g.dtype)


def scale_by_lorafa(
    scaling: jax.typing.ArrayLike | Mapping[str, float] = 1.0,
    delta: jax.typing.ArrayLike = 1e-8,
    projection_dtype: Any = None,
) -> optax.GradientTransformation:
    """Projects each LoRA ``b`` gradient onto its frozen ``a`` and zeroes ``a``'s.

    For every pair of sibling leaves ``<p>/a: (..., in, r)``,
    ``<p>/b: (..., r, out)``: ``g_b ← s⁻²·pinv(aᵀa + δI)·g_b`` and
    ``g_a ← 0``; other leaves pass through. Leading axes (a scanned ``(L, ...)``
    stack) are batched. Needs ``params``. Place it first, before the
    normaliser; ``lorafa`` also keeps the ``a`` leaves out of Adam.

    Args:
      scaling: the LoRA scaling ``s`` (``alpha/r``; ``alpha/√r`` for rsLoRA),
        one number for every pair (injectable) or ``{pair path: s}`` keyed by
        the path without ``/a`` (static).
      delta: damping added to ``aᵀa``'s diagonal (PEFT: 1e-8) (injectable).
      projection_dtype: ``None`` (float32 or the parameter dtype if wider), or
        ``jnp.bfloat16`` to round as PEFT's bfloat16 autocast does (static).

    Returns:
      An ``optax.GradientTransformation`` with ``LoRAFAState``. Static
      arguments: ``projection_dtype`` (and ``scaling`` when a mapping).

    Raises:
      ValueError: at ``init``, no sibling ``a``/``b`` pair (the message lists
        the paths seen), or a pair whose shapes do not chain (the message
        names the path); at ``update``, ``params`` missing.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q/kernel": {"a": jnp.eye(3, 2), "b": jnp.zeros((2, 4))}}
      >>> g = {"q/kernel": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 4))}}
      >>> tx = scale_by_lorafa(scaling=2.0)
      >>> u, _ = tx.update(g, tx.init(p), p)
      >>> float(u["q/kernel"]["a"].sum()), round(float(u["q/kernel"]["b"][0, 0]), 4)
      (0.0, 0.25)

    References:
      Zhang et al., 2023, https://arxiv.org/abs/2308.03303.
    """

    def init_fn(params):
        _lora_pairs.find_pairs(params, _WHO)
        return LoRAFAState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{_WHO}: update() needs params (the frozen a factors)")
        pairs = _lora_pairs.find_pairs(params, _WHO)
        scales = {prefix: _scaling_for(scaling, prefix) for prefix in pairs}
        p_flat, u_flat = tree.leaves_by_path(params), tree.leaves_by_path(updates)
        grams = [_lora_pairs.gram_in(p_flat[pa].astype(_lora_pairs.compute_dtype(p_flat[pa].dtype)))
                 for pa, _ in pairs.values()]
        invs = _lora_pairs.damped_pinvs(grams, delta)
        new = {}
        for (prefix, (pa, pb)), inv in zip(pairs.items(), invs, strict=True):
            new[pb] = _project(inv, u_flat[pb], scales[prefix], projection_dtype)
            new[pa] = jnp.zeros_like(u_flat[pa])
        return _lora_pairs.rebuild(updates, new), LoRAFAState(
            optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def frozen_a_labels(params: Any) -> Any:
    """``"frozen"`` for the ``a`` leaf of every LoRA pair, ``"train"`` elsewhere."""
    try:
        frozen = {pa for pa, _ in _lora_pairs.find_pairs(params, "lorafa").values()}
    except ValueError:
        frozen = set()
    return tree.map_with_path(lambda p, _: "frozen" if p in frozen else "train", params)


def lorafa(
    learning_rate: optax.ScalarOrSchedule,
    scaling: jax.typing.ArrayLike | Mapping[str, float] = 1.0,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: jax.typing.ArrayLike = 0.0,
    delta: jax.typing.ArrayLike = 1e-8,
    projection_dtype: Any = None,
) -> optax.GradientTransformation:
    """LoRA-FA optimizer (PEFT's ``create_lorafa_optimizer``): frozen ``a``, projected ``b``, AdamW.

    ``a`` leaves: zero update and no state. ``b`` leaves: ``scale_by_lorafa``
    then HF-style AdamW (``adamw_hf``: ``eps`` before the bias correction,
    decay of the new weights). Leaves outside a pair: the same AdamW
    (PEFT's fallback for non-LoRA parameters).

    Args:
      learning_rate: float or schedule (injectable).
      scaling: the LoRA scaling ``s``; ``adapters.scaling_value(Scaling.X,
        alpha, r)`` gives PEFT's ``alpha/r`` (``lora_alpha``, ``r``) or
        ``alpha/√r`` (``use_rslora``); a ``{pair path: s}`` mapping for
        per-layer values (PEFT reads each module's ``scaling``).
      b1: first-moment decay (PEFT: 0.9) (injectable).
      b2: second-moment decay (PEFT: 0.999) (injectable).
      eps: added to ``√v`` before the bias correction (PEFT: 1e-6) (injectable).
      weight_decay: ``p ← p − lr·wd·p`` after the step (injectable).
      delta: damping of ``aᵀa`` (PEFT: 1e-8) (injectable).
      projection_dtype: see ``scale_by_lorafa`` (static).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
      Static arguments: ``projection_dtype`` (and ``scaling`` when a mapping).
      PEFT's ``correct_bias=False`` is not offered (``create_lorafa_optimizer``
      does not expose it).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"q/kernel": {"a": jnp.eye(3, 2), "b": jnp.zeros((2, 4))}}
      >>> tx = lorafa(1e-2, scaling=2.0)
      >>> u, _ = tx.update(p, tx.init(p), p)
      >>> float(jnp.abs(u["q/kernel"]["a"]).max())
      0.0

    References:
      Zhang et al., 2023, https://arxiv.org/abs/2308.03303.
    """
    adam = optax.chain(scale_by_adam_hf(b1, b2, eps),
                       scale_and_decay_after(learning_rate, weight_decay))
    return optax.chain(
        scale_by_lorafa(scaling, delta, projection_dtype),
        optax.partition({"train": adam, "frozen": optax.set_to_zero()}, frozen_a_labels),
    )
