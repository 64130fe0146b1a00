# SPDX-License-Identifier: Apache-2.0
"""BEFT: bias-efficient fine-tuning (a trainable shift of a layer's bias).

BEFT, bias-efficient fine-tuning (2025). https://arxiv.org/abs/2509.15974

BEFT trains only bias terms, chiefly those of the value projections (PEFT's
default targets), for low-data fine-tuning, and freezes everything else.
Hugging Face PEFT's ``tuners/beft`` (followed here, also for its files)
keeps the base bias frozen and adds a trainable vector ``beft_bias (1,
out)``, zero at init, to the layer's output:

  ``y = x W + b + β``   (``β (out,)``),

which merges exactly into the bias, ``b' = b + β`` (PEFT's ``merge``).

On a Flax kernel ``W (in, out)`` the adapter sits on the kernel and
reparametrises its sibling ``bias`` leaf (a ``BiasHook``): the kernel itself
is unchanged. A layer without a bias leaf (the Llama projections) is refused
by ``adapters.validate`` with a ``ValueError`` naming the path: there is no
weight-space leaf to hold ``β`` (PEFT adds it in the forward of such layers
but cannot merge it either).

Factored form: the kernel is untouched (no term in the matmul), the bias
leaf is shifted directly (``O(out)``, nothing per row).

Exports: ``BEFTParams``, ``beft``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class BEFTParams(NamedTuple):
    """Trainable BEFT parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      shift: ``(out,)`` = PEFT ``beft_bias[0]`` (``β``), added to the bias;
        0 at init.
    """

    shift: jax.Array


def beft(
    *,
    init_weights: bool = True,
    bias_name: str = "bias",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """BEFT: ``b' = b + β`` on the bias of the kernel it is assigned to.

    The kernel is unchanged; ``β (out,)`` is trainable and added to the
    sibling bias leaf (which must exist). Identity at init (``β = 0``).
    Trainable parameters: ``out`` per matrix, PEFT's count. ``unapply`` is
    exact (the kernel is untouched; the bias hook subtracts ``β``).

    Args:
      init_weights: True (PEFT's default): ``β = 0``; False: ``β ~ N(0, 1)``
        (PEFT's ``torch.randn``; not the identity).
      bias_name: the sibling bias leaf's last path component.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``β``.

    Returns:
      An ``Adapter`` with trainable ``BEFTParams(shift)`` and no frozen state.

    Static arguments: all.

    Raises:
      TypeError: ``init_weights`` is not a bool or ``bias_name`` not a string.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = beft()
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((4, 3)))
      >>> t.shift
      Array([0., 0., 0.], dtype=float32)
      >>> ad.bias.apply((4, 3), jnp.ones(3), BEFTParams(jnp.arange(3.0)), None)
      Array([1., 2., 3.], dtype=float32)

    References:
      https://arxiv.org/abs/2509.15974 ; PEFT 0.21.2 ``tuners/beft``.
    """
    if not isinstance(init_weights, bool):
        raise TypeError(f"beft: init_weights must be a bool, got {init_weights!r}")
    if not isinstance(bias_name, str) or not bias_name:
        raise TypeError(f"beft: bias_name must be a non-empty string, got {bias_name!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("beft takes no stats")
        n_out = w.shape[1]
        if init_weights:
            return BEFTParams(jnp.zeros((n_out,), param_dtype)), None
        return BEFTParams(jax.random.normal(key, (n_out,), param_dtype)), None

    def apply_matrix(w, t, f):
        return w

    def unapply_matrix(w, t, f, aux):
        return w

    def bias_apply(b, t, f):
        c = _lowrank.compute_dtype(b.dtype, t.shift.dtype)
        return b.astype(c) + t.shift.astype(c)

    def bias_unapply(b, t, f):
        c = _lowrank.compute_dtype(b.dtype, t.shift.dtype)
        return b.astype(c) - t.shift.astype(c)

    return _lift.lift_matrix(
        name=f"beft(init_weights={init_weights})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        bias=_protocol.BiasHook(name=bias_name, apply=bias_apply,
                                unapply=bias_unapply, required=True),
        dimension_numbers=dimension_numbers,
        factored_matrix=lambda w, t, f: _protocol.FactoredTerms(),
        hyperparameters=(("init_weights", init_weights), ("bias_name", bias_name)),
    )
