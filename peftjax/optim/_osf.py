# SPDX-License-Identifier: Apache-2.0
"""OSF: full fine-tuning kept orthogonal to each weight's preserved subspace.

Nayak, Chen, Ye, Wang, Liu, Srivastava, Sattigeri, Chang, Ma & Yurochkin,
"Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
Learning", 2025, https://arxiv.org/abs/2504.07097 (Hugging Face PEFT's
``tuners/osf`` is its adapter form, ``peftjax.adapters.osf``).

Paper ↔ code (torch layout ``W = U Σ Vᵀ``, ``U_high = U[:, :k]``, ``V_high =
V[:, :k]``, the top-``k`` singular directions of the weights at the start of a
task, eq. 2):

* the preserved ("high") subspace is computed once per task from the weights
  ↔ ``init(params)`` (call it again, with the task's ``effective_rank``, at the
  start of each task: the continual-learning sequence of the paper's
  Algorithm 1, where the preserved rank grows from task to task);
* the projected gradient ``∇U_low − U_high U_highᵀ ∇U_low`` and ``∇V_low −
  ∇V_low V_high V_highᵀ`` (eq. 5, 6) ↔ on the full weight, ``G ← (I − P_U) G
  (I − P_V)`` with ``P_U = U_high U_highᵀ`` and ``P_V = V_high V_highᵀ``, the
  projection of a gradient onto the matrices whose column space is orthogonal
  to ``U_high`` and row space orthogonal to ``V_high``;
* ``inner`` (Adam by default) runs on the projected gradient, and its output
  is projected again, so the step itself (after Adam's per-entry scaling and
  any weight decay ``inner`` adds) satisfies ``U_highᵀ ΔW = 0`` and ``ΔW V_high =
  0``: the task-start component ``U_highᵀ W`` (and ``W V_high``, hence ``U_highᵀ W
  V_high = Σ_high``) is unchanged by the task's training, up to rounding.

On a Flax kernel ``(in, out)`` = ``Wᵀ`` the roles swap: the in-axis basis is
``V_high`` and the out-axis basis ``U_high``; the state holds both, per slice of
a stacked leaf (``(S, in, k)`` and ``(S, out, k)``).

Exports: ``OSFState``, ``scale_by_osf``, ``osf``.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree
from peftjax.optim import _adam, _leaves

_WHAT = "scale_by_osf"


class OSFState(NamedTuple):
    """State of ``scale_by_osf``.

    Attributes:
      count: steps taken.
        # shape=(), dtype=jnp.int32
      inner_state: the inner transform's state (shapes of the params).
      bases: a tree like the params; projected leaves hold ``(in_basis,
        out_basis)``, ``(S, in, k)`` and ``(S, out, k)`` (the top-``k`` singular
        vectors of each slice's matrix view, computed by ``init``), other
        leaves ``optax.MaskedNode()``.
    """

    count: jax.Array
    inner_state: optax.OptState
    bases: Any

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED,
                   "inner_state": tree.StateRole.LIKE_PARAMS,
                   "bases": tree.StateRole.PROJECTOR}


def preserved_rank(effective_rank: int | float | None, n_in: int, n_out: int) -> int:
    """PEFT's rule for the preserved rank ``k`` of one ``(in, out)`` matrix.

    ``None``: ``min(in, out) // 2``; a float in ``(0, 1]``: ``int(min · f)``; an
    int: itself; clipped to ``[0, min(in, out)]``.
    """
    m = min(n_in, n_out)
    if effective_rank is None:
        return m // 2
    if isinstance(effective_rank, float) and 0 < effective_rank <= 1:
        return max(min(m, int(m * effective_rank)), 0)
    return max(min(m, int(effective_rank)), 0)


def check_effective_rank(effective_rank: Any, what: str) -> None:
    """Raises unless ``effective_rank`` is None, a positive int or a float in (0, 1]."""
    if effective_rank is None:
        return
    if isinstance(effective_rank, bool) or not isinstance(effective_rank, numbers.Real):
        raise TypeError(f"{what}: effective_rank must be None, an int or a float in "
                        f"(0, 1], got {effective_rank!r}")
    if isinstance(effective_rank, numbers.Integral):
        if effective_rank <= 0:
            raise ValueError(f"{what}: effective_rank must be positive, got {effective_rank}")
    elif not 0 < float(effective_rank) <= 1:
        raise ValueError(f"{what}: a float effective_rank is a fraction in (0, 1], got "
                         f"{effective_rank!r}")


def _top_bases(w: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(n_in, k)`` and ``(n_out, k)`` top singular vectors of ``w (n_in, n_out)``."""
    ct = jnp.float64 if w.dtype == jnp.float64 else jnp.float32
    left, _, right_t = jnp.linalg.svd(w.astype(ct), full_matrices=False)
    return left[:, :k], right_t[:k, :].T


def _project(g: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    """``(I − L Lᵀ) g (I − R Rᵀ)`` in float32 or wider, back in ``g``'s dtype."""
    ct = jnp.float64 if jnp.float64 in (g.dtype, left.dtype) else jnp.float32
    x = g.astype(ct)
    x = x - left @ (left.T @ x)
    x = x - (x @ right) @ right.T
    return x.astype(g.dtype)


def scale_by_osf(
    effective_rank: int | float | None = None,
    inner: optax.GradientTransformation | None = None,
    *,
    dimension_numbers: _leaves.DimsSpec = None,
) -> optax.GradientTransformation:
    """Runs ``inner`` on gradients projected away from each weight's preserved subspace.

    For a projected leaf with matrix view ``W: (in, out)`` (batch axes slice by
    slice), ``init`` takes the top-``k`` singular vectors ``L (in, k)``, ``R
    (out, k)`` of ``W`` (the weights at the start of the task); every step
    ``g ← (I − L Lᵀ) g (I − R Rᵀ)``, ``u = inner(g)``, ``u ← (I − L Lᵀ) u (I −
    R Rᵀ)``. Then ``Lᵀ W`` and ``W R`` stay what they were at ``init``. Leaves that
    are not projected (biases, norms, embeddings by default) go through
    ``inner`` unchanged. ``k = 0`` (``effective_rank`` rounding to zero) leaves a
    leaf unconstrained.

    Args:
      effective_rank: the preserved rank ``k``, PEFT's rule: None =
        ``min(in, out) // 2``, an int (clipped to ``min(in, out)``), or a float
        in ``(0, 1]`` (a fraction of ``min(in, out)``) (static).
      inner: the transform run on projected gradients (default
        ``scale_by_adam_hf()``, Adam with torch's epsilon placement); it
        receives the params, so ``adamw``'s decay works (and is projected too).
      dimension_numbers: as ``scale_by_galore``'s: None projects what is a
        matrix under the tree's layout (never biases or embedding tables)
        (static).

    Returns:
      An ``optax.GradientTransformation`` with ``OSFState``; ``init`` needs the
      params (it computes the bases from them). Static arguments: all.

    Raises:
      ValueError, TypeError: a bad ``effective_rank``; a leaf whose matrix view
        is unknown (message names path, shape, dtype).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> tx = scale_by_osf(effective_rank=1, inner=optax.identity())
      >>> u, _ = tx.update({"w": jnp.ones((3, 3))}, tx.init({"w": w}))
      >>> u["w"]
      Array([[0., 0., 0.],
             [0., 1., 1.],
             [0., 1., 1.]], dtype=float32)

    References:
      Nayak et al., 2025, https://arxiv.org/abs/2504.07097.
    """
    check_effective_rank(effective_rank, _WHAT)
    if inner is None:
        inner = _adam.scale_by_adam_hf()

    def plan(t):
        return _leaves.plan_leaves(
            t, dimension_numbers,
            lambda path, leaf, n_in, n_out, side: preserved_rank(effective_rank, n_in, n_out),
            "full", _WHAT)

    def init_fn(params):
        treedef = jax.tree.structure(params)
        flat, plans = plan(params)
        _leaves.check_dims_keys(dimension_numbers, params)
        bases = []
        for (_, p), pl in zip(flat, plans, strict=True):
            if pl is None or pl.spec.rank == 0:
                bases.append(optax.MaskedNode())
                continue
            ws = _leaves.to_slices(p, pl)
            bases.append(jax.vmap(lambda w, k=pl.spec.rank: _top_bases(w, k))(ws))
        return OSFState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params),
                        bases=jax.tree.unflatten(treedef, bases) if flat else params)

    def project_tree(updates, state):
        treedef = jax.tree.structure(updates)
        flat, plans = plan(updates)
        if not flat:
            return updates
        bases = treedef.flatten_up_to(state.bases)
        out = []
        for (_, g), pl, b in zip(flat, plans, bases, strict=True):
            if pl is None or pl.spec.rank == 0:
                out.append(g)
                continue
            gs = jax.vmap(_project)(_leaves.to_slices(g, pl), *b)
            out.append(_leaves.from_slices(gs, pl))
        return jax.tree.unflatten(treedef, out)

    def update_fn(updates, state, params=None):
        g = project_tree(updates, state)
        u, inner_state = inner.update(g, state.inner_state, params)
        return project_tree(u, state), OSFState(
            count=optax.safe_int32_increment(state.count), inner_state=inner_state,
            bases=state.bases)

    return optax.GradientTransformation(init_fn, update_fn)


def osf(
    learning_rate: optax.ScalarOrSchedule,
    effective_rank: int | float | None = None,
    inner: optax.GradientTransformation | None = None,
    *,
    weight_decay: float = 0.0,
    dimension_numbers: _leaves.DimsSpec = None,
) -> optax.GradientTransformation:
    """OSF alias: ``scale_by_osf(inner=adamw)`` then ``scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule (injectable).
      effective_rank: the preserved rank, as ``scale_by_osf`` (static).
      inner: the transform on projected gradients (default
        ``scale_by_adam_hf()``), followed by ``weight_decay``'s decoupled decay.
      weight_decay: decoupled weight decay added inside the projection, so the
        preserved subspace is not decayed either (injectable).
      dimension_numbers: as ``scale_by_osf`` (static).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.eye(4)[:, :3] * jnp.array([3.0, 2.0, 1.0])}
      >>> tx = osf(0.1, effective_rank=2)
      >>> state = tx.init(params)
      >>> state[0].bases["w"][0].shape
      (1, 4, 2)
    """
    inner = optax.chain(_adam.scale_by_adam_hf() if inner is None else inner,
                        optax.add_decayed_weights(weight_decay))
    return optax.chain(
        scale_by_osf(effective_rank, inner, dimension_numbers=dimension_numbers),
        optax.scale_by_learning_rate(learning_rate),
    )
