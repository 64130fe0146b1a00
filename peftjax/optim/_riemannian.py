# SPDX-License-Identifier: Apache-2.0
"""Riemannian-preconditioned LoRA: ``r×r`` preconditioners on the LoRA gradients.

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation
Models", 2024, https://arxiv.org/abs/2402.02347, as PEFT's
``optimizers/riemannian.py`` (``create_riemannian_optimizer``) implements it.

Paper ↔ code. The paper's preconditioned (scaled-gradient) updates of ``A``
and ``B``, in PEFT's layout ``W + B A``:
``g_A ← (BᵀB + δI)⁻¹ g_A`` and ``g_B ← g_B (AAᵀ + δI)⁻¹``, ``δ = reg``.
On peftjax's ``a = Aᵀ: (in, r)``, ``b = Bᵀ: (r, out)``:
``g_a ← g_a·pinv(b bᵀ + δI)`` and ``g_b ← pinv(aᵀa + δI)·g_b``
(``scale_by_riemannian``), both preconditioners computed from the current
factors before the base optimizer's step (``riemannian``: the base
optimizer, as ``create_riemannian_optimizer`` wraps ``optimizer_cls``).

Following PEFT: the damped inverse is ``pinv(· + reg·I)`` with
``reg = 1e-2``; it is computed in float32 (or the parameter dtype if wider)
and the preconditioned gradient cast back to the gradient's dtype; pairs
are preconditioned independently; leaves outside a pair pass through. PEFT
skips LoRA on embeddings (``lora_embedding_A/B``) and pairs with a frozen
factor; here every sibling ``a``/``b`` pair seen by the transform is
preconditioned (route a pair elsewhere with ``optax.partition`` to skip it).

Exports: ``RiemannianState``, ``scale_by_riemannian``, ``riemannian``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _lora_pairs

_WHO = "scale_by_riemannian"


class RiemannianState(NamedTuple):
    """State of ``scale_by_riemannian``.

    Attributes:
      count: steps taken. # shape=(), dtype=jnp.int32
    """

    count: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED}


def scale_by_riemannian(reg: jax.typing.ArrayLike = 1e-2) -> optax.GradientTransformation:
    """Preconditions each LoRA pair's gradients with its ``r×r`` damped Gram inverses.

    For every pair of sibling leaves ``<p>/a: (..., in, r)``,
    ``<p>/b: (..., r, out)``: ``g_a ← g_a·pinv(b bᵀ + reg·I)``,
    ``g_b ← pinv(aᵀa + reg·I)·g_b``; leading axes (a scanned ``(L, ...)``
    stack) are batched; other leaves pass through. Needs ``params``. Place it
    first, before the base optimizer.

    Args:
      reg: damping added to the ``r×r`` diagonal before inversion (PEFT:
        1e-2) (injectable).

    Returns:
      An ``optax.GradientTransformation`` with ``RiemannianState``. Static
      arguments: none.

    Raises:
      ValueError: at ``init``, no sibling ``a``/``b`` pair (the message lists
        the paths seen), or a pair whose shapes do not chain (the message
        names the path); at ``update``, ``params`` missing.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q/kernel": {"a": 2 * jnp.eye(3, 2), "b": jnp.eye(2, 4)}}
      >>> tx = scale_by_riemannian(reg=0.0)
      >>> u, _ = tx.update(p, tx.init(p), p)
      >>> float(u["q/kernel"]["a"][0, 0]), float(u["q/kernel"]["b"][0, 0])
      (2.0, 0.25)

    References:
      Zhang & Pilanci, 2024, https://arxiv.org/abs/2402.02347.
    """

    def init_fn(params):
        _lora_pairs.find_pairs(params, _WHO)
        return RiemannianState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{_WHO}: update() needs params (the LoRA factors)")
        pairs = _lora_pairs.find_pairs(params, _WHO)
        p_flat, u_flat = tree.leaves_by_path(params), tree.leaves_by_path(updates)
        grams, cts = [], []
        for pa, pb in pairs.values():
            ct = _lora_pairs.compute_dtype(p_flat[pa].dtype)
            cts.append(ct)
            grams += [_lora_pairs.gram_out(p_flat[pb].astype(ct)),
                      _lora_pairs.gram_in(p_flat[pa].astype(ct))]
        invs = _lora_pairs.damped_pinvs(grams, reg)
        new = {}
        for k, ((pa, pb), ct) in enumerate(zip(pairs.values(), cts, strict=True)):
            ga, gb = u_flat[pa], u_flat[pb]
            new[pa] = jnp.matmul(ga.astype(ct), invs[2 * k]).astype(ga.dtype)
            new[pb] = jnp.matmul(invs[2 * k + 1], gb.astype(ct)).astype(gb.dtype)
        return _lora_pairs.rebuild(updates, new), RiemannianState(
            optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def riemannian(
    learning_rate: optax.ScalarOrSchedule,
    reg: jax.typing.ArrayLike = 1e-2,
    inner: optax.GradientTransformation | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Riemannian-preconditioned LoRA (PEFT's ``create_riemannian_optimizer``).

    ``scale_by_riemannian(reg)``, then ``inner`` (default
    ``optax.scale_by_adam()``), decoupled weight decay of the old weights,
    and the learning rate: with the defaults this is ``torch.optim.AdamW``
    (``eps=1e-8`` after the bias correction, ``p ← p(1 − lr·wd) − lr·u``)
    on the preconditioned gradients; ``inner=optax.trace(momentum)`` with
    ``weight_decay=0`` is ``torch.optim.SGD(momentum=...)``.

    Args:
      learning_rate: float or schedule (injectable).
      reg: the preconditioners' damping (PEFT: 1e-2) (injectable).
      inner: the base optimizer's normaliser (static).
      weight_decay: decoupled weight decay (``torch.optim.AdamW``'s default
        is 0.01) (injectable).
      mask: weight-decay mask, as in ``optax.add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
      Static arguments: ``inner``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q/kernel": {"a": jnp.eye(3, 2), "b": jnp.eye(2, 4)}}
      >>> tx = riemannian(1e-2)
      >>> u, _ = tx.update(p, tx.init(p), p)
      >>> u["q/kernel"]["b"].shape
      (2, 4)

    References:
      Zhang & Pilanci, 2024, https://arxiv.org/abs/2402.02347.
    """
    return optax.chain(
        scale_by_riemannian(reg),
        optax.scale_by_adam() if inner is None else inner,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
