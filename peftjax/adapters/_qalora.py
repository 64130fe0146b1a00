# SPDX-License-Identifier: Apache-2.0
"""QA-LoRA: LoRA on group-pooled inputs, so that the merged model stays quantised.

QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models.
Xu, Xie, Gu, Chen, Chang, Zhang, Chen, Zhang & Tian, ICLR 2024.
https://arxiv.org/abs/2309.14717

The paper quantises ``W`` group-wise along the input dimension (``L`` groups
of ``D_in/L`` columns, one scale and zero point each) and feeds the LoRA
branch the average of each group of input features (§3.3, the ``qa_pool``
average pooling before ``A``). ``A`` then has ``L`` input rows instead of
``D_in``, and its weight-space delta is constant within each group, so it can
be folded into the groups' zero points: the merged model stays quantised.

Hugging Face PEFT's ``tuners/lora/variants.py`` (``QALoraLinearVariant``,
``LoraConfig(use_qalora=True, qalora_group_size=g)``; followed here, also for
its files) pools contiguous groups of ``g`` input features with a mean and
then multiplies the pooled vector by the number of groups ``L = in/g``::

    Δy = s · ((mean_g(x) · L) @ A_torchᵀ) @ B_torchᵀ

(PEFT's scaling of the pooled vector, followed here). PEFT applies
it to GPTQ-quantised Linear layers only and cannot merge it; peftjax's
adapter works on any kernel and merges.

Flax layout: ``a (in/g, r)`` (= PEFT ``lora_A (r, in/g)`` transposed),
``b (r, out)``; ``s = alpha/r`` (or ``alpha/√r``). Weight space:
``W' = W0 + s·(L/g)·repeat_g(a) @ b`` with ``repeat_g(a)`` the ``(in, r)``
matrix whose row ``i`` is ``a[i // g]`` (each group's rows equal, which is
what keeps a group-quantised ``W0``'s grid). PEFT's init: ``a`` as torch's
default ``nn.Linear(in/g, r)`` (kaiming-uniform ``U(±1/sqrt(in/g))``),
``b = 0``: the identity at init.

Factored form (``FactoredTerms.delta``): ``x ↦ s·L·(mean_g(x) @ a) @ b``,
``in + 2·r·(in/g + out)`` FLOPs per row (pooling, then the two products),
never the expanded ``(in, r)`` factor; LoRA at the same rank costs
``2·r·(in + out)``.

Exports: ``QALoRAParams``, ``qalora``.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class QALoRAParams(NamedTuple):
    """Trainable QA-LoRA factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in/g, r)`` = PEFT ``lora_A`` transposed: one row per input group.
      b: ``(r, out)`` = PEFT ``lora_B`` transposed.
    """

    a: jax.Array
    b: jax.Array


def qalora(
    rank: int,
    *,
    group_size: int = 16,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """QA-LoRA: ``W' = W0 + s·(L/g)·repeat_g(A)@B`` with ``A (in/g, r)``, ``L = in/g``.

    LoRA whose input is group-pooled (PEFT's ``use_qalora``): ``Δy =
    s·(mean_g(x)·L)@A@B`` over contiguous groups of ``group_size`` input
    features. Trainable: ``r·(in/g + out)`` per matrix (PEFT's count). The
    factored path pools first (``in + 2·r·(in/g + out)`` FLOPs per row);
    ``apply`` forms the group-constant delta.

    Args:
      rank: ``r`` (static).
      group_size: ``g`` = PEFT's ``qalora_group_size`` (default 16); must
        divide the matrix view's ``in``.
      alpha: ``lora_alpha``.
      scaling: ``Scaling.ALPHA_OVER_RANK`` (default) or
        ``ALPHA_OVER_SQRT_RANK`` (PEFT's ``use_rslora``), or ``NONE``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``a`` and ``b``.
      dropout: dropout rate on the adapter input (factored path only, before
        the pooling, as in PEFT).

    Returns:
      An ``Adapter`` with trainable ``QALoRAParams(a, b)`` and no frozen part.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``group_size <= 0``, ``alpha <= 0``; at
        init, ``in`` not divisible by ``group_size``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = qalora(2, group_size=3)
      >>> w = jnp.ones((6, 5))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, f
      ((2, 2), (2, 5), None)
      >>> bool(jnp.array_equal(ad.apply(w, t, f), w))
      True

    References:
      Xu et al., ICLR 2024, https://arxiv.org/abs/2309.14717
    """
    rank = _lora.check_rank(rank, "qalora")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"qalora: group_size must be a positive int, got {group_size!r}")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    g = group_size

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("qalora takes no stats")
        n_in, n_out = w.shape
        if n_in % g:
            raise ValueError(f"qalora: group_size={g} does not divide in={n_in} of the "
                             f"matrix view of shape {tuple(w.shape)}")
        bound = 1.0 / math.sqrt(n_in // g)
        a = jax.random.uniform(key, (n_in // g, rank), param_dtype, -bound, bound)
        return QALoRAParams(a=a, b=jnp.zeros((rank, n_out), param_dtype)), None

    def factors(t, f):
        groups = t.a.shape[0]
        return _lowrank.LowRank(jnp.repeat(t.a, g, axis=0), t.b, s * groups / g)

    forms = _lowrank.low_rank_forms(factors)

    def factored_matrix(w, t, f):
        def delta(x):
            groups = t.a.shape[0]
            ct = _lowrank.compute_dtype(x.dtype, t.a.dtype)
            pooled = jnp.mean(x.astype(ct).reshape(x.shape[:-1] + (groups, g)), axis=-1)
            return _lowrank.low_rank(pooled, t.a, t.b, s * groups)

        return _protocol.FactoredTerms(delta=delta)

    return _lift.lift_matrix(
        name=f"qalora(rank={rank}, group_size={g}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        apply_matrix=forms["apply_matrix"],
        unapply_matrix=forms["unapply_matrix"],
        factored_matrix=factored_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("group_size", g), ("alpha", alpha),
                         ("scaling", scaling), ("s", s)),
    )
