# SPDX-License-Identifier: Apache-2.0
"""AdaLoRA: SVD-form adapters with importance-driven rank allocation.

AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning.
Zhang et al., 2023. https://arxiv.org/abs/2303.10512

Torch layout (paper Eq. 3): ``ΔW = P Λ Q · s`` with ``P = B (m, r)``,
``Λ = diag(E)``, ``Q = A (r, n)``, all trainable, ``s = α / (r_init + 1e-5)``
(Hugging Face PEFT). On a Flax kernel: ``ΔW = (a · e) @ b · s`` with
``a = Aᵀ (in, r)``, ``e (r,)``, ``b = Bᵀ (r, out)``; ``E = 0`` and
``A, B ~ N(0, 0.02²)`` at init, so the model is unchanged.

* Orthogonality regulariser (Eq. 4) ↔ ``adalora_orthogonality``:
  ``γ · mean over matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F`` (``γ = 0.5``
  in PEFT); a pure function the user adds to the loss.
* Sensitivity with smoothing (Eq. 5–7) ↔ ``adalora_update_importance``:
  ``I = |w ⊙ ∂L/∂w|``, ``Ī ← β1 Ī + (1−β1) I``,
  ``Ū ← β2 Ū + (1−β2) |I − Ī|`` (with the updated Ī), ``s(w) = Ī ⊙ Ū``.
* Triplet score (Eq. 8) ↔ ``adalora_triplet_scores``:
  ``S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``.
* Budget schedule (Eq. 9, cubic) ↔ ``adalora_budget``; masking to the budget
  with one global threshold (the ``(b_init − b)``-th smallest score; scores
  ``<=`` it are zeroed, so ties can mask more) ↔ ``adalora_mask``. Masking sets
  ``E_i = 0`` in place: shapes never change.

Exports: ``AdaLoRAParams``, ``AdaLoRAImportance``, ``adalora``,
``adalora_orthogonality``, ``adalora_init_importance``,
``adalora_update_importance``, ``adalora_triplet_scores``, ``adalora_budget``,
``adalora_mask``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class AdaLoRAParams(NamedTuple):
    """Trainable AdaLoRA triplets (per matrix).

    Attributes:
      a: ``(in, r)`` (Q transposed).
      e: ``(r,)`` (the singular values Λ; init 0).
      b: ``(r, out)`` (P transposed).
    """

    a: jax.Array
    e: jax.Array
    b: jax.Array


class AdaLoRAImportance(NamedTuple):
    """Smoothed sensitivity and uncertainty, shaped like the trainable state.

    Attributes:
      ipt: ``Ī`` per parameter.
      unc: ``Ū`` per parameter.
    """

    ipt: Any
    unc: Any


def adalora(
    rank: int,
    *,
    alpha: float = 8.0,
    init_std: float = 0.02,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """AdaLoRA adapter with initial rank ``r`` (masked down during training).

    Trainable parameters: ``r·(in + out + 1)`` per matrix.

    Args:
      rank: ``r_init`` (static; PEFT's ``init_r`` default 12).
      alpha: ``lora_alpha``; ``s = alpha / (r + 1e-5)``.
      init_std: std of ``a`` and ``b`` at init (0.02 in PEFT).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype.

    Returns:
      An ``Adapter`` with trainable ``AdaLoRAParams(a, e, b)``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = adalora(3)
      >>> t, _ = ad.init(jax.random.key(0), jnp.ones((5, 4)))
      >>> t.a.shape, t.e.shape, t.b.shape
      ((5, 3), (3,), (3, 4))

    References:
      Zhang et al., 2023, https://arxiv.org/abs/2303.10512
    """
    rank = _lora.check_rank(rank, "adalora")
    s = _lora.check_alpha(alpha, "adalora") / (rank + 1e-5)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("adalora takes no stats")
        _lora.check_rank_fits(rank, w, "adalora")
        ka, kb = jax.random.split(key)
        n_in, n_out = w.shape
        return AdaLoRAParams(
            a=(jax.random.normal(ka, (n_in, rank), jnp.float32) * init_std
               ).astype(param_dtype),
            e=jnp.zeros((rank,), param_dtype),
            b=(jax.random.normal(kb, (rank, n_out), jnp.float32) * init_std
               ).astype(param_dtype),
        ), None

    def factors(t, f):
        # (a · e) @ b · s: the singular values scale a's columns.
        return _lowrank.LowRank(left=t.a * t.e.astype(t.a.dtype)[None, :], right=t.b,
                             scale=s)

    return _lift.lift_matrix(
        name=f"adalora(rank={rank}, alpha={alpha})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        **_lowrank.low_rank_forms(factors),
    )


def _adalora_leaves(trainable: dict[str, Any], fn: str) -> dict[str, AdaLoRAParams]:
    out = {p: t for p, t in trainable.items() if isinstance(t, AdaLoRAParams)}
    if not out:
        raise ValueError(f"{fn}: the trainable state has no AdaLoRAParams")
    return out


def adalora_orthogonality(trainable: dict[str, Any], *, weight: float = 0.5
                          ) -> jax.Array:
    """The orthogonality regulariser to add to the loss.

    Args:
      trainable: ``AdapterState.trainable`` (non-AdaLoRA entries are ignored).
      weight: γ (PEFT's ``orth_reg_weight``, 0.5).

    Returns:
      ``γ · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F over all adapted matrices)``, where in
      Flax layout ``AAᵀ = aᵀa`` and ``BᵀB = b bᵀ`` (per stacked layer).

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaLoRAParams(jnp.eye(3, 2), jnp.zeros(2), jnp.eye(2, 4))}
      >>> float(adalora_orthogonality(t))
      0.0
    """
    terms = []
    for t in _adalora_leaves(trainable, "adalora_orthogonality").values():
        a = t.a.astype(jnp.float32)
        b = t.b.astype(jnp.float32)
        r = a.shape[-1]
        eye = jnp.eye(r, dtype=jnp.float32)
        aa = jnp.swapaxes(a, -1, -2) @ a
        bb = b @ jnp.swapaxes(b, -1, -2)
        for m in (aa, bb):
            norms = jnp.sqrt(jnp.sum(jnp.square(m - eye), axis=(-2, -1)))
            terms.extend(list(norms.reshape(-1)))
    return weight * sum(terms) / len(terms)


def adalora_init_importance(trainable: dict[str, Any]) -> AdaLoRAImportance:
    """Zero importance state for the AdaLoRA entries of ``trainable``.

    Args:
      trainable: ``AdapterState.trainable``.

    Returns:
      ``AdaLoRAImportance`` of zeros (float32) shaped like the AdaLoRA entries.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaLoRAParams(jnp.ones((3, 2)), jnp.ones(2), jnp.ones((2, 4)))}
      >>> adalora_init_importance(t).ipt["w"].e.shape
      (2,)
    """
    leaves = _adalora_leaves(trainable, "adalora_init_importance")
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), leaves)
    return AdaLoRAImportance(ipt=zeros, unc=zeros)


def adalora_update_importance(state: AdaLoRAImportance, trainable: dict[str, Any],
                              grads: dict[str, Any], *, beta1: Any = 0.85,
                              beta2: Any = 0.85) -> AdaLoRAImportance:
    """One step of the smoothed sensitivity/uncertainty update.

    Args:
      state: the current ``AdaLoRAImportance``.
      trainable: the current trainable state.
      grads: its gradients (same structure).
      beta1: smoothing of Ī (0.85).
      beta2: smoothing of Ū (0.85).

    Returns:
      The new ``AdaLoRAImportance``.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaLoRAParams(jnp.ones((1, 1)), jnp.ones(1), jnp.ones((1, 1)))}
      >>> s = adalora_update_importance(adalora_init_importance(t), t, t)
      >>> round(float(s.ipt["w"].e[0]), 4), round(float(s.unc["w"].e[0]), 4)
      (0.15, 0.1275)
    """
    leaves = _adalora_leaves(trainable, "adalora_update_importance")
    g = {p: grads[p] for p in leaves}

    def ipt_of(w, gw):
        return jnp.abs(w.astype(jnp.float32) * gw.astype(jnp.float32))

    new_i = jax.tree.map(
        lambda avg, w, gw: beta1 * avg + (1 - beta1) * ipt_of(w, gw),
        state.ipt, leaves, g)
    new_u = jax.tree.map(
        lambda unc, avg, w, gw: beta2 * unc + (1 - beta2) * jnp.abs(ipt_of(w, gw)
                                                                     - avg),
        state.unc, new_i, leaves, g)
    return AdaLoRAImportance(ipt=new_i, unc=new_u)


def adalora_triplet_scores(state: AdaLoRAImportance) -> dict[str, jax.Array]:
    """``S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`` per path.

    Args:
      state: the importance state.

    Returns:
      ``{path: (..., r)}`` scores (batch axes kept for stacked layers).

    Example:
      >>> import jax.numpy as jnp
      >>> o = AdaLoRAParams(jnp.ones((3, 2)), jnp.ones(2), jnp.ones((2, 4)))
      >>> adalora_triplet_scores(AdaLoRAImportance({"w": o}, {"w": o}))["w"]
      Array([3., 3.], dtype=float32)
    """
    out = {}
    for p in state.ipt:
        s = jax.tree.map(lambda i, u: i * u, state.ipt[p], state.unc[p])
        out[p] = s.e + jnp.mean(s.a, axis=-2) + jnp.mean(s.b, axis=-1)
    return out


def adalora_budget(step: int, *, initial_budget: int, target_budget: int,
                   total_steps: int, t_init: int = 0, t_final: int = 0,
                   delta_t: int = 1) -> tuple[int, bool]:
    """The cubic budget schedule and whether to mask at ``step``.

    Args:
      step: the current step (static Python int).
      initial_budget: ``b_init = Σ r_init`` over the adapted matrices.
      target_budget: ``b_target = target_r × #adapted matrices``.
      total_steps: T.
      t_init: warm-up steps without masking.
      t_final: final steps with the budget fixed at ``b_target``.
      delta_t: mask every ``delta_t`` steps during the reduction phase.

    Returns:
      ``(budget, mask_now)``.

    Example:
      >>> [adalora_budget(s, initial_budget=12, target_budget=4, total_steps=10)
      ...  for s in (0, 5, 10)]
      [(12, False), (5, True), (4, True)]
    """
    if not 0 <= t_init < total_steps - t_final:
        raise ValueError(f"adalora_budget: need 0 <= t_init < total_steps - t_final, "
                         f"got t_init={t_init}, t_final={t_final}, "
                         f"total_steps={total_steps}")
    if step <= t_init:
        return initial_budget, False
    if step > total_steps - t_final:
        return target_budget, True
    frac = 1 - (step - t_init) / (total_steps - t_final - t_init)
    budget = int((initial_budget - target_budget) * frac**3 + target_budget)
    return budget, step % delta_t == 0


def adalora_mask(trainable: dict[str, Any], scores: dict[str, jax.Array],
                 budget: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Zeroes the ``E_i`` of the lowest-scoring triplets down to ``budget``.

    One global threshold over all adapted matrices: the ``(b_init − budget)``-th
    smallest score; every triplet scoring ``<=`` it is masked (ties can mask
    more). ``budget >= b_init`` masks nothing.

    Args:
      trainable: the trainable state.
      scores: from ``adalora_triplet_scores``.
      budget: triplets to keep (static int).

    Returns:
      ``(trainable with masked e, {path: keep mask (..., r)})``; re-apply the
      final mask after every update in the final phase so masked ranks stay 0.

    Example:
      >>> import jax.numpy as jnp
      >>> t = {"w": AdaLoRAParams(jnp.ones((3, 2)), jnp.ones(2), jnp.ones((2, 4)))}
      >>> new, keep = adalora_mask(t, {"w": jnp.array([0.5, 2.0])}, budget=1)
      >>> new["w"].e, keep["w"]
      (Array([0., 1.], dtype=float32), Array([False,  True], dtype=bool))
    """
    leaves = _adalora_leaves(trainable, "adalora_mask")
    if sorted(scores) != sorted(leaves):
        raise ValueError(f"adalora_mask: scores cover {sorted(scores)[:10]}, the "
                         f"state has AdaLoRA entries {sorted(leaves)[:10]}")
    allscores = jnp.concatenate([scores[p].reshape(-1) for p in leaves])
    n_drop = allscores.size - int(budget)
    if n_drop <= 0:
        keep = {p: jnp.ones(scores[p].shape, bool) for p in leaves}
    else:
        thr = jnp.sort(allscores)[n_drop - 1]
        keep = {p: scores[p] > thr for p in leaves}
    out = dict(trainable)
    for p, t in leaves.items():
        out[p] = t._replace(e=jnp.where(keep[p], t.e, jnp.zeros_like(t.e)))
    return out, keep
