# SPDX-License-Identifier: Apache-2.0
"""AdaMSS's ASA: adaptive subspace allocation during training (PEFT's ``asa_callback``).

Functions of the training loop's state, not a callback: importance EMAs of
each k-means group's parameters, the target count schedule, the allocation
that keeps the most important groups and the freezing of the others' updates.
See ``peftjax.adapters._adamss`` for the adapter itself.

Exports: ``AdaMSSImportance``, ``adamss_init_importance``,
``adamss_update_importance``, ``adamss_asa_target``, ``adamss_asa_allocate``,
``adamss_freeze``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters._adamss import AdaMSSBasis, AdaMSSParams


class AdaMSSImportance(NamedTuple):
    """ASA's per-group state for the AdaMSS entries of a trainable state.

    Attributes:
      ipt: ``{path: AdaMSSParams}`` EMA of ``|w · g|`` (float32).
      unc: ``{path: AdaMSSParams}`` EMA of its change (PEFT's uncertainty).
      seen: ``{path: (..., K) bool}``: the group has estimates since the
        last allocation (PEFT's ``exp_avg_ipt`` is not None).
      active: ``{path: (..., K) bool}``: the group still trains.
    """

    ipt: dict
    unc: dict
    seen: dict
    active: dict


def _adamss_leaves(tree_: dict, fn: str) -> dict:
    out = {p: t for p, t in tree_.items() if isinstance(t, AdaMSSParams)}
    if not out:
        raise ValueError(f"{fn}: the trainable state has no AdaMSSParams")
    return out


def adamss_init_importance(trainable: dict) -> AdaMSSImportance:
    """Empty ASA state: no estimates, every group active.

    Args:
      trainable: ``AdapterState.trainable`` (non-AdaMSS entries are ignored).

    Returns:
      ``AdaMSSImportance`` (zeros, ``seen`` False, ``active`` True).

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaMSSParams(jnp.ones((2, 1, 3)), jnp.ones((4, 1)))}
      >>> adamss_init_importance(t).active["w"]
      Array([ True,  True], dtype=bool)
    """
    leaves = _adamss_leaves(trainable, "adamss_init_importance")
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), leaves)
    groups = {p: t.a.shape[:-2] for p, t in leaves.items()}
    return AdaMSSImportance(zeros, zeros, {p: jnp.zeros(g, bool) for p, g in groups.items()},
                            {p: jnp.ones(g, bool) for p, g in groups.items()})


def adamss_update_importance(state: AdaMSSImportance, trainable: dict, grads: dict, *,
                             beta1: float = 0.85, beta2: float = 0.85) -> AdaMSSImportance:
    """One step of PEFT's ``update_importance`` for the active groups.

    ``Ū ← β2 Ū + (1 − β2) |I − Ī|`` (with the previous ``Ī``), then ``Ī ←
    β1 Ī + (1 − β1) I``, ``I = |w · g|``; inactive groups keep their state.

    Args:
      state: the current ``AdaMSSImportance``.
      trainable: the trainable state.
      grads: its gradients (same structure).
      beta1: PEFT's ``asa_importance_beta``.
      beta2: PEFT's ``asa_uncertainty_beta``.

    Returns:
      The new ``AdaMSSImportance``.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaMSSParams(jnp.ones((1, 1, 2)), jnp.ones((3, 1)))}
      >>> s = adamss_update_importance(adamss_init_importance(t), t, t)
      >>> round(float(s.ipt["w"].a[0, 0, 0]), 4), round(float(s.unc["w"].a[0, 0, 0]), 4)
      (0.15, 0.15)
    """
    leaves = _adamss_leaves(trainable, "adamss_update_importance")
    ipt, unc, seen = dict(state.ipt), dict(state.unc), dict(state.seen)
    for p, t in leaves.items():
        ipt[p], unc[p] = _update_leaf(ipt[p], unc[p], t, grads[p], state.active[p],
                                      jnp.float32(beta1), jnp.float32(beta2))
        seen[p] = seen[p] | state.active[p]
    return AdaMSSImportance(ipt, unc, seen, dict(state.active))


@jax.jit
def _update_leaf(old, unc, t, g, on, beta1, beta2):
    on_a = on[..., :, None, None]
    i_a = jnp.abs(t.a.astype(jnp.float32) * g.a.astype(jnp.float32))
    i_b = jnp.abs(t.b.astype(jnp.float32) * g.b.astype(jnp.float32))
    new_u = AdaMSSParams(beta2 * unc.a + (1 - beta2) * jnp.abs(i_a - old.a),
                         beta2 * unc.b + (1 - beta2) * jnp.abs(i_b - old.b))
    new_i = AdaMSSParams(beta1 * old.a + (1 - beta1) * i_a,
                         beta1 * old.b + (1 - beta1) * i_b)
    # b's rows of inactive groups are not scored again (estimates restart at
    # every allocation, inactive groups stay inactive)
    return (AdaMSSParams(jnp.where(on_a, new_i.a, old.a), new_i.b),
            AdaMSSParams(jnp.where(on_a, new_u.a, unc.a), new_u.b))


@jax.jit
def _scores(ipt: AdaMSSParams, unc: AdaMSSParams, f: AdaMSSBasis) -> jax.Array:
    """``mean(Ī·Ū)`` over each group's ``A_i`` plus over its ``B_i``: ``(..., K)``."""
    k, r, q = ipt.a.shape[-3:]
    out_n = ipt.b.shape[-2]
    lead = ipt.a.shape[:-3]
    sa = (ipt.a * unc.a).reshape((-1, k, r, q))
    sb = (ipt.b * unc.b).reshape((-1, out_n, r))
    mask = jnp.asarray(f.mask, jnp.float32).reshape((-1, k, r))
    labels = jnp.asarray(f.labels).reshape((-1, out_n))

    def one(sa, sb, mask, labels):
        ri = mask.sum(-1)
        a_part = (sa * mask[:, :, None]).sum((-2, -1)) / jnp.maximum(ri * q, 1)
        rows = (sb * mask[labels]).sum(-1)
        sizes = jax.ops.segment_sum(jnp.ones_like(rows), labels, k)
        b_part = jax.ops.segment_sum(rows, labels, k) / jnp.maximum(sizes * ri, 1)
        return a_part + b_part

    return jax.vmap(one)(sa, sb, mask, labels).reshape(lead + (k,))


def adamss_asa_target(step: int, *, total: int, target: int, init_warmup: int,
                      final_warmup: int, exponent: float = 3.0) -> int | None:
    """PEFT's number of groups to keep at ``step`` (``_schedule_threshold``).

    Args:
      step: the training step.
      total: every adapted layer's group count, summed (``K`` per layer).
      target: PEFT's ``asa_target_subspaces``.
      init_warmup: PEFT's ``init_warmup``.
      final_warmup: PEFT's ``final_warmup`` (``> init_warmup``).
      exponent: PEFT's ``asa_schedule_exponent`` (``> 0``).

    Returns:
      None before ``init_warmup``, then ``int(target + (total − target) ·
      (1 − (step − init)/(final − init))^exponent)``, ``target`` after.

    Example:
      >>> [adamss_asa_target(s, total=20, target=4, init_warmup=10, final_warmup=30)
      ...  for s in (5, 10, 20, 40)]
      [None, 20, 6, 4]
    """
    if not init_warmup < final_warmup or exponent <= 0 or target < 1:
        raise ValueError("adamss_asa_target: need init_warmup < final_warmup, exponent > 0 "
                         f"and target >= 1, got {init_warmup}, {final_warmup}, {exponent}, "
                         f"{target}")
    if step < init_warmup:
        return None
    if step > final_warmup:
        return int(target)
    coeff = 1.0 - (step - init_warmup) / (final_warmup - init_warmup)
    coeff = max(0.0, min(1.0, coeff))
    return int(target + (total - target) * coeff**exponent)


def adamss_asa_allocate(state: AdaMSSImportance, frozen: dict,
                        target: int | None) -> AdaMSSImportance:
    """PEFT's global masking to ``target`` groups, then fresh estimates.

    Among the groups with estimates (``seen``; inactive groups have none),
    a group stays active iff its score exceeds the ``target``-th largest
    score (PEFT's ``kthvalue`` test: ties and the ``target``-th itself are
    frozen); all stay if ``target`` reaches their number; None (before the
    warm-up) only resets. Frozen groups never come back (PEFT's neither).

    Args:
      state: the ``AdaMSSImportance``.
      frozen: ``AdapterState.frozen`` (the ``AdaMSSBasis`` entries).
      target: from ``adamss_asa_target``.

    Returns:
      The new state (``active`` updated, estimates zeroed, ``seen`` False).

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaMSSParams(jnp.ones((3, 1, 2)), jnp.ones((3, 1)))}
      >>> f = {"w": AdaMSSBasis(jnp.ones((4, 2)), jnp.arange(3), jnp.ones((3, 1)))}
      >>> g = {"w": AdaMSSParams(jnp.arange(6.0).reshape(3, 1, 2), jnp.ones((3, 1)))}
      >>> s = adamss_update_importance(adamss_init_importance(t), t, g)
      >>> adamss_asa_allocate(s, f, 2).active["w"]
      Array([False, False,  True], dtype=bool)
    """
    paths = sorted(state.ipt)
    active = dict(state.active)
    if target is not None:
        scores = {p: _scores(state.ipt[p], state.unc[p], frozen[p]) for p in paths}
        valid = {p: state.seen[p] & state.active[p] for p in paths}
        flat = jnp.concatenate([jnp.where(valid[p], scores[p], -jnp.inf).reshape(-1)
                                for p in paths])
        n = int(jnp.sum(jnp.isfinite(flat)))
        if int(target) < n:
            thr = jnp.sort(flat)[::-1][int(target) - 1]
            for p in paths:
                active[p] = jnp.where(valid[p], scores[p] > thr, state.active[p])
    fresh = adamss_init_importance(state.ipt)
    return AdaMSSImportance(fresh.ipt, fresh.unc, fresh.seen, active)


def adamss_freeze(updates: dict, frozen: dict, state: AdaMSSImportance) -> dict:
    """Zeroes the AdaMSS updates (or gradients) of inactive groups.

    Apply to the optimizer's updates so inactive groups stay put (PEFT's
    ``requires_grad=False``).

    Args:
      updates: a tree shaped like the trainable state.
      frozen: ``AdapterState.frozen``.
      state: the ``AdaMSSImportance`` (its ``active``).

    Returns:
      ``updates`` with the rows of inactive groups' ``a`` and ``b`` zeroed.

    Example:
      >>> import jax.numpy as jnp
      >>> u = {"w": AdaMSSParams(jnp.ones((2, 1, 2)), jnp.ones((3, 1)))}
      >>> f = {"w": AdaMSSBasis(jnp.ones((4, 2)), jnp.array([0, 1, 1]), jnp.ones((2, 1)))}
      >>> s = adamss_init_importance(u)._replace(active={"w": jnp.array([True, False])})
      >>> adamss_freeze(u, f, s)["w"].b[:, 0]
      Array([1., 0., 0.], dtype=float32)
    """
    out = dict(updates)
    for p, on in state.active.items():
        u, labels = updates[p], jnp.asarray(frozen[p].labels)
        on_b = jnp.take_along_axis(on, labels, axis=-1) if on.ndim > 1 else on[labels]
        out[p] = AdaMSSParams(jnp.where(on[..., :, None, None], u.a, 0).astype(u.a.dtype),
                              jnp.where(on_b[..., None], u.b, 0).astype(u.b.dtype))
    return out
