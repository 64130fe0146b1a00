# SPDX-License-Identifier: Apache-2.0
"""Asymmetric LoRA: a frozen random ``A`` and a trained ``B`` only.

Asymmetry in Low-Rank Adapters of Foundation Models. Zhu, Greenewald,
Nadjahi, Sáez de Ocáriz Borde, Gabrielsson, Choshen, Ghassemi, Yurochkin &
Solomon, ICML 2024. https://arxiv.org/abs/2402.16842

The paper keeps LoRA's update ``ΔW = s·B A`` (torch layout, ``A (r, in)``,
``B (out, r)``) and shows that the two factors are not alike: ``A``
extracts features from the input and a random, untrained ``A`` does about
as well as a trained one, while ``B`` uses them to build the output and
must be trained. Its B-only recipe: draw ``A`` once at random (with
orthonormal rows, the random ``A`` of its analysis), freeze it and train
``B`` from zero; its generalisation bound then counts ``r·out`` trainable
parameters instead of ``r·(in + out)``.

On a Flax kernel ``W0 (in, out)``: ``W' = W0 + s·a@b`` with ``a = Aᵀ (in, r)``
in the *frozen* partition and ``b = Bᵀ (r, out)`` trainable, ``b = 0`` at init
(the model is unchanged). ``a`` is never differentiated and holds no
optimizer state. ``s = alpha/r`` (``Scaling`` as for ``lora``).

Why a separate factory rather than a ``lora(..., train_a=False)`` flag: a
``lora`` adapter's state is ``LoRAParams(a, b)`` in the trainable partition,
and the LoRA-family consumers (PEFT file writer, LoRA+, LoRA-FA, the
Riemannian preconditioner, the initialisers and the merge methods) find
their factors by that layout. A flag that moved ``a`` to the frozen
partition would give ``lora`` two layouts under one name; here the layout
has its own types (``LoRABOnlyParams``, ``LoRABOnlyFrozen``), which those
consumers do not mistake for a full LoRA pair.

Factored form: ``y = x@W0 + s·(x@a)@b``, ``2·r·(in + out)`` FLOPs per row
(LoRA's), never an ``(in, out)`` temporary.

Exports: ``LoRABOnlyParams``, ``LoRABOnlyFrozen``, ``LoRABOnlyInit``,
``lora_b_only``.
"""

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class LoRABOnlyInit(enum.Enum):
    """The random frozen ``A`` of ``lora_b_only``.

    Attributes:
      ORTHOGONAL: ``a (in, r)`` with orthonormal columns, drawn uniformly
        (Haar; the QR factor of a Gaussian matrix with the signs of ``R``'s
        diagonal folded in): the paper's random ``A``.
      KAIMING_UNIFORM: LoRA's (and PEFT's) ``a ~ U(±1/sqrt(in))``.
    """

    ORTHOGONAL = "orthogonal"
    KAIMING_UNIFORM = "kaiming_uniform"


class LoRABOnlyParams(NamedTuple):
    """Trainable part of ``lora_b_only`` (per matrix).

    Attributes:
      b: ``(r, out)``, zero at init.
    """

    b: jax.Array


class LoRABOnlyFrozen(NamedTuple):
    """Frozen part of ``lora_b_only`` (per matrix).

    Attributes:
      a: ``(in, r)``, the random projection, never trained.
    """

    a: jax.Array


def _haar_columns(key: jax.Array, n_in: int, rank: int) -> jax.Array:
    g = jax.random.normal(key, (n_in, rank), jnp.float32)
    q, r = jnp.linalg.qr(g)
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(jnp.float32)
    return q * sign[None, :]


def lora_b_only(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    init: LoRABOnlyInit = LoRABOnlyInit.ORTHOGONAL,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """Asymmetric LoRA: ``W' = W + s·a@b`` with ``a`` frozen and random, ``b`` trained.

    Trainable parameters: ``r·out`` per adapted matrix (``b``); the frozen
    ``a`` adds ``r·in`` stored, untrained values. The model is unchanged at
    init (``b = 0``).

    Args:
      rank: ``r`` (static; must be ``<= min(in, out)``).
      alpha: ``lora_alpha`` (8, as ``lora``).
      scaling: the ``Scaling`` of ``s`` (``alpha/r`` by default).
      init: a ``LoRABOnlyInit`` member: ``ORTHOGONAL`` (the paper's random
        orthogonal ``A``, default) or ``KAIMING_UNIFORM`` (LoRA's).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``a`` and ``b``.
      dropout: dropout on the adapter input (factored path only, as ``lora``).

    Returns:
      An ``Adapter`` with trainable ``LoRABOnlyParams(b)`` and frozen
      ``LoRABOnlyFrozen(a)``.

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``; at init, ``rank > min(in, out)``.
      TypeError: ``init`` is not a ``LoRABOnlyInit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lora_b_only(2)
      >>> t, f = jax.eval_shape(ad.init, jax.random.key(0), jnp.ones((6, 5)))
      >>> t.b.shape, f.a.shape, ad.num_trainable(jnp.ones((6, 5)))
      ((2, 5), (6, 2), 10)

    References:
      Zhu et al., 2024, https://arxiv.org/abs/2402.16842
    """
    rank = _lora.check_rank(rank, "lora_b_only")
    if not isinstance(init, LoRABOnlyInit):
        raise TypeError(f"lora_b_only: init must be a LoRABOnlyInit member, got {init!r}")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("lora_b_only takes no stats")
        _lora.check_rank_fits(rank, w, "lora_b_only")
        n_in, n_out = w.shape
        if init is LoRABOnlyInit.ORTHOGONAL:
            a = _haar_columns(key, n_in, rank).astype(param_dtype)
        else:
            a = _lora.kaiming_uniform_a(key, n_in, rank, param_dtype)
        return (LoRABOnlyParams(b=jnp.zeros((rank, n_out), param_dtype)),
                LoRABOnlyFrozen(a=a))

    hyper = (("rank", rank), ("alpha", float(alpha)), ("scaling", scaling.value),
             ("init", init.value))
    return _lift.lift_matrix(
        name=f"lora_b_only(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=hyper,
        **_lowrank.low_rank_forms(lambda t, f: _lowrank.LowRank(f.a, t.b, s)),
    )
