# SPDX-License-Identifier: Apache-2.0
"""LoRA and rsLoRA: a trainable low-rank delta ``W' = W + s·A@B``.

LoRA: Low-Rank Adaptation of Large Language Models. Hu et al., 2021.
https://arxiv.org/abs/2106.09685
rsLoRA: A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA.
Kalajdzievski, 2023. https://arxiv.org/abs/2312.03732

Flax layout: the kernel is ``(in, out)``, ``a: (in, r)``, ``b: (r, out)``;
the torch-layout ``B·A`` of the paper (``W (out, in)``) is ``(A·B)`` here, i.e.
``a = A_torch.T`` and ``b = B_torch.T``.

Paper Eq. (3) ``h = W0 x + B A x`` ↔ ``apply``; the scaling ``alpha/r`` (§4.1)
↔ ``Scaling.ALPHA_OVER_RANK``; rsLoRA's ``alpha/sqrt(r)`` ↔
``Scaling.ALPHA_OVER_SQRT_RANK``.

Exports: ``Scaling``, ``LoRAInit``, ``LoRAParams``, ``lora``, ``scaling_value``.
"""

import enum
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol


class Scaling(enum.Enum):
    """The scaling ``s`` of a low-rank delta ``s·A@B``.

    Attributes:
      ALPHA_OVER_RANK: ``alpha / r`` (LoRA, Hugging Face PEFT, qwix).
      ALPHA_OVER_SQRT_RANK: ``alpha / sqrt(r)`` (rsLoRA, PEFT ``use_rslora``).
      NONE: ``1`` (flax ``nnx.LoRA``); ``alpha`` is ignored.
    """

    ALPHA_OVER_RANK = "alpha/r"
    ALPHA_OVER_SQRT_RANK = "alpha/sqrt(r)"
    NONE = "1"


class LoRAInit(enum.Enum):
    """Initialisation of the LoRA factors (B = 0 except for EMBEDDING).

    Attributes:
      KAIMING_UNIFORM: PEFT's default, ``a ~ U(-1/sqrt(in), 1/sqrt(in))``
        (kaiming-uniform with ``a=sqrt(5)``), ``b = 0``.
      GAUSSIAN: PEFT's ``init_lora_weights="gaussian"``: ``a ~ N(0, 1/r²)``,
        ``b = 0``.
      EMBEDDING: PEFT's embedding LoRA, roles reversed: ``a = 0``,
        ``b ~ N(0, 1)``.
    """

    KAIMING_UNIFORM = "kaiming_uniform"
    GAUSSIAN = "gaussian"
    EMBEDDING = "embedding"


class LoRAParams(NamedTuple):
    """Trainable LoRA factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)``, dtype ``param_dtype``.
      b: ``(r, out)``, dtype ``param_dtype``.
    """

    a: jax.Array
    b: jax.Array


def scaling_value(scaling: Scaling, alpha: float, rank: int) -> float:
    """Returns the numeric scaling for a rank and alpha.

    Args:
      scaling: the convention.
      alpha: ``lora_alpha``.
      rank: ``r``.

    Returns:
      ``s`` as a Python float.

    Raises:
      ValueError: ``alpha <= 0`` (or not finite) with a scaling that uses it:
        it would silence (``0``) or flip the sign of the update.

    Example:
      >>> scaling_value(Scaling.ALPHA_OVER_SQRT_RANK, 16.0, 4)
      8.0
    """
    if not isinstance(scaling, Scaling):
        raise TypeError(
            f"scaling must be a peftjax.adapters.Scaling member, got {scaling!r}"
        )
    if scaling is not Scaling.NONE:
        check_alpha(alpha, f"scaling {scaling.value}")
    if scaling is Scaling.ALPHA_OVER_RANK:
        return float(alpha) / rank
    if scaling is Scaling.ALPHA_OVER_SQRT_RANK:
        return float(alpha) / math.sqrt(rank)
    return 1.0


def check_alpha(alpha: Any, name: str) -> float:
    """Validates ``alpha`` (the scale of a low-rank update): a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name}: alpha must be a positive number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"{name}: alpha must be a finite number > 0, got alpha={alpha!r} (alpha "
            "scales the low-rank update: 0 switches it off and a negative value flips it; "
            "use Scaling.NONE for a scale of 1)")
    return float(alpha)


def check_rank(rank: Any, name: str) -> int:
    """Validates the rank argument of a factory (adapter or initialiser).

    Args:
      rank: a positive integer: ``int`` or a NumPy integer such as
        ``np.int64``, never ``bool``.
      name: the factory's name, which error messages start with.

    Returns:
      ``rank`` as a Python ``int``.

    Raises:
      TypeError: ``rank`` is not an integer (a float, a bool, None, ...).
      ValueError: ``rank <= 0``.

    Example:
      >>> import numpy as np
      >>> check_rank(np.int64(4), "lora")
      4
      >>> check_rank(0, "lora")
      Traceback (most recent call last):
      ...
      ValueError: lora: rank must be > 0, got rank=0
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name}: rank must be a positive int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"{name}: rank must be > 0, got rank={rank}")
    return int(rank)


def check_rank_fits(rank: int, w: jax.Array, name: str) -> None:
    """Raises if ``rank > min(in, out)`` for the matrix ``w (in, out)``."""
    n_in, n_out = w.shape[-2], w.shape[-1]
    if rank > min(n_in, n_out):
        raise ValueError(
            f"{name}: rank={rank} exceeds min(in, out)={min(n_in, n_out)} of the "
            f"matrix view (in={n_in}, out={n_out})"
        )


def kaiming_uniform_a(key: jax.Array, n_in: int, rank: int, dtype: Any) -> jax.Array:
    """PEFT's default LoRA ``A (in, r)``: kaiming-uniform with ``a=sqrt(5)``, ``U(±1/sqrt(in))``."""
    bound = 1.0 / math.sqrt(n_in)
    return jax.random.uniform(key, (n_in, rank), dtype, -bound, bound)


def lora(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: Scaling = Scaling.ALPHA_OVER_RANK,
    init: LoRAInit = LoRAInit.KAIMING_UNIFORM,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """LoRA: ``W' = W + s·A@B`` with trainable ``A (in, r)`` and ``B (r, out)``.

    The model is unchanged at init (``B = 0``; ``A = 0`` for EMBEDDING).
    Trainable parameters: ``r·(in + out)`` per adapted matrix (times the
    product of batch axes for stacked kernels). Optimizer state: that times the
    optimizer's slots (2 for Adam).

    Args:
      rank: ``r`` (static; must be ``<= min(in, out)`` of every target).
      alpha: ``lora_alpha``; PEFT's default is 8.
      scaling: ``Scaling.ALPHA_OVER_RANK`` (default), ``ALPHA_OVER_SQRT_RANK``
        (rsLoRA) or ``NONE``.
      init: a ``LoRAInit`` member (PEFT's default kaiming-uniform A, B = 0).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a`` and ``b`` (float32 by default, also
        for bf16 bases).
      dropout: dropout rate on the adapter input ``x`` (``s·dropout(x)@A@B``).
        It cannot be expressed in weight space: only the factored path applies
        it, and ``materialize`` raises unless ``deterministic=True``.

    Returns:
      An ``Adapter`` whose trainable part is ``LoRAParams(a, b)`` and whose
      frozen part is None.

    Static arguments: all (they set shapes or are folded into the closure).

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0`` (unless ``scaling=NONE``); at
        init, ``rank > min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = lora(rank=2, alpha=4.0)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 5)))
      >>> t.a.shape, t.b.shape, f
      ((6, 2), (2, 5), None)

    References:
      Hu et al., 2021, https://arxiv.org/abs/2106.09685 ; Kalajdzievski, 2023,
      https://arxiv.org/abs/2312.03732
    """
    rank = check_rank(rank, "lora")
    if not isinstance(init, LoRAInit):
        raise TypeError(f"lora: init must be a LoRAInit member, got {init!r}")
    s = scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("lora takes no stats; use a data-driven initialiser")
        check_rank_fits(rank, w, "lora")
        n_in, n_out = w.shape
        if init is LoRAInit.KAIMING_UNIFORM:
            a = kaiming_uniform_a(key, n_in, rank, param_dtype)
            b = jnp.zeros((rank, n_out), param_dtype)
        elif init is LoRAInit.GAUSSIAN:
            a = jax.random.normal(key, (n_in, rank), param_dtype) / rank
            b = jnp.zeros((rank, n_out), param_dtype)
        else:
            a = jnp.zeros((n_in, rank), param_dtype)
            b = jax.random.normal(key, (rank, n_out), param_dtype)
        return LoRAParams(a=a, b=b), None

    return _lift.lift_matrix(
        name=f"lora(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        **_lowrank.low_rank_forms(lambda t, f: _lowrank.LowRank(t.a, t.b, s)),
    )
