# SPDX-License-Identifier: Apache-2.0
"""SoRA's optimizer: an L1 proximal step (soft-threshold) on the adapter gates.

Sparse Low-rank Adaptation of Pre-trained Language Models. Ding et al., 2023
(EMNLP). https://arxiv.org/abs/2311.11696

Paper ↔ code: the proximal gradient update of the gate ``g`` (Sec. 3,
``g_{t+1} = T_{η_t·λ}(g_t − η_t ∇L)`` with the soft-threshold
``T_τ(z) = sign(z)·max(|z| − τ, 0)``) ↔ ``scale_by_sora``: placed after the
optimizer, it receives the optimizer's update ``u`` (so ``z = g + u`` is the
plain step), and for every leaf whose canonical path ends in ``/gate``
(``SoRAParams.gate`` in ``dict[path, SoRAParams]`` adapter states) returns
``T_{η·λ}(g + u) − g`` instead; all other leaves pass through. The reference
code applies the threshold after its AdamW step in the same way (its
``sparse_lambda`` is the threshold ``η·λ`` itself). ``sora`` is the paper's
recipe as one transform: AdamW without weight decay on the gates, then
``scale_by_sora``.

Exports: ``SoRAState``, ``scale_by_sora``, ``sora``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax import tree


class SoRAState(NamedTuple):
    """State of ``scale_by_sora``.

    Attributes:
      count: steps taken (drives a ``learning_rate`` schedule).
        # shape=(), dtype=jnp.int32
    """

    count: jax.Array

    # Layout for peftjax.shard.state_shardings (peftjax.tree.StateRole).
    state_roles = {"count": tree.StateRole.REPLICATED}


def _is_gate(path: str, name: str) -> bool:
    return path.rsplit("/", 1)[-1] == name


def scale_by_sora(
    learning_rate: optax.ScalarOrSchedule,
    lambda_: jax.typing.ArrayLike,
    *,
    gate_name: str = "gate",
) -> optax.GradientTransformation:
    """Applies SoRA's L1 proximal step to the gate leaves of the updates.

    With ``z = g + u`` (the gate after the optimizer's step ``u``) and
    ``τ = η·λ``, the gate update becomes ``sign(z)·max(|z| − τ, 0) − g``: gates
    with ``|z| <= τ`` land exactly on 0, the others shrink by ``τ`` towards 0.
    Non-gate leaves are returned unchanged. Chain it last, after the optimizer
    (the step ``u`` must already include the learning rate), and give it the
    optimizer's learning rate (a schedule is evaluated at this transform's own
    step count, which advances in step with the optimizer's):
    ``optax.chain(optax.adamw(lr, mask=no_decay_on_gates), scale_by_sora(lr, λ))``.
    The paper exempts the gates from weight decay.

    Args:
      learning_rate: ``η``, float or schedule (injectable).
      lambda_: ``λ``, the L1 strength (injectable).
      gate_name: the last path component of gate leaves (static).

    Returns:
      An ``optax.GradientTransformation`` with ``SoRAState``; its
      ``update`` needs ``params``.

    Static arguments: ``gate_name``.

    Raises:
      ValueError: at ``init``, if no leaf path ends in ``/gate`` (the message
        lists the paths seen); at ``update``, if ``params`` is None.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"q/kernel": {"gate": jnp.array([1.0, 0.05, -0.5])}}
      >>> step = {"q/kernel": {"gate": jnp.array([-0.1, 0.0, 0.2])}}
      >>> tx = scale_by_sora(learning_rate=0.1, lambda_=1.0)
      >>> u, _ = tx.update(step, tx.init(params), params)
      >>> [round(float(v), 4) for v in params["q/kernel"]["gate"] + u["q/kernel"]["gate"]]
      [0.8, 0.0, -0.2]

    References:
      Ding et al., 2023, https://arxiv.org/abs/2311.11696
    """
    if not isinstance(gate_name, str) or not gate_name:
        raise TypeError(f"scale_by_sora: gate_name must be a non-empty str, got {gate_name!r}")

    def init_fn(params):
        flat = tree.flatten(params)
        if flat and not any(_is_gate(p, gate_name) for p, _ in flat):
            raise ValueError(
                f"scale_by_sora: no leaf path ends in '/{gate_name}' (SoRA's gate); "
                "paths seen: "
                + ", ".join(f"{p} {tuple(x.shape)} {x.dtype}" for p, x in flat[:8]))
        return SoRAState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_sora: update needs params (the current gates)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        flat_params = dict(tree.flatten(params))

        def one(path, u):
            if not _is_gate(path, gate_name):
                return u
            g = flat_params[path]
            ct = jnp.promote_types(u.dtype, jnp.float32)
            tau = jnp.asarray(lr).astype(ct) * jnp.asarray(lambda_).astype(ct)
            z = g.astype(ct) + u.astype(ct)
            shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - tau, jnp.zeros_like(z))
            return (shrunk - g.astype(ct)).astype(u.dtype)

        new_updates = tree.map_with_path(one, updates)
        return new_updates, SoRAState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _not_gates(gate_name: str) -> Callable[[Any], Any]:
    def mask(params):
        return tree.map_with_path(lambda p, _: not _is_gate(p, gate_name), params)

    return mask


def sora(
    learning_rate: optax.ScalarOrSchedule,
    lambda_: jax.typing.ArrayLike,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    gate_name: str = "gate",
) -> optax.GradientTransformation:
    """SoRA's optimizer: AdamW (no weight decay on the gates), then the gate prox.

    ``optax.chain(optax.adamw(learning_rate, b1, b2, eps, weight_decay,
    mask=<every leaf but the gates>), scale_by_sora(learning_rate, lambda_))``:
    the recipe of the paper and its reference code (torch AdamW, the gates
    exempt from weight decay, the soft-threshold ``η·λ`` after the step).

    Args:
      learning_rate: ``η``, float or schedule, shared by AdamW and the prox
        (injectable).
      lambda_: ``λ``, the L1 strength on the gates (injectable).
      b1: AdamW's first-moment decay.
      b2: AdamW's second-moment decay.
      eps: added to AdamW's ``sqrt(v̂)`` (torch's default 1e-8).
      weight_decay: AdamW's decoupled weight decay on the non-gate leaves.
      gate_name: the last path component of gate leaves (static).

    Returns:
      An ``optax.GradientTransformation`` (a chain whose second state is
      ``SoRAState``); its ``update`` needs ``params``.

    Static arguments: ``gate_name``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"q/kernel": {"a": jnp.ones(2), "gate": jnp.array([1.0, 0.05])}}
      >>> grads = {"q/kernel": {"a": jnp.ones(2), "gate": jnp.array([1.0, 1.0])}}
      >>> tx = sora(0.1, lambda_=1.0)
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> [round(float(v), 4) for v in new["q/kernel"]["gate"]]  # 1 - 0.1 - 0.1, 0
      [0.8, 0.0]

    References:
      Ding et al., 2023, https://arxiv.org/abs/2311.11696
    """
    if not isinstance(gate_name, str) or not gate_name:
        raise TypeError(f"sora: gate_name must be a non-empty str, got {gate_name!r}")
    return optax.chain(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=_not_gates(gate_name)),
        scale_by_sora(learning_rate, lambda_, gate_name=gate_name),
    )
