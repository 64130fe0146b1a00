# SPDX-License-Identifier: Apache-2.0
"""HiRA: a high-rank update as the Hadamard product of the frozen base and a low-rank product.

HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language
Models. Huang, Ko, Zhuang, Tang & Zhang, ICLR 2025.
https://openreview.net/forum?id=TwJrTz9cRS

The paper's update ``ΔW = W0 ⊙ (B A)`` (torch layout ``W0 (out, in)``, ``B
(out, r)``, ``A (r, in)``) modulates every entry of the frozen weight, so
``rank(ΔW)`` can reach ``rank(W0)·r`` (the rank of a Hadamard product is at
most the product of the ranks) for ``r·(in + out)`` parameters, and ``W0 + ΔW
= W0 ⊙ (1 + B A)``. Hugging Face PEFT's ``tuners/hira`` (followed here for its
files) applies it with no scale factor. On a Flax kernel ``W0 (in, out)``:
``a = Aᵀ (in, r)``, ``b = Bᵀ (r, out)`` and ``ΔW = W0 ⊙ (a@b)``.

The update ↔ ``apply``; PEFT's ``reset_hira_parameters`` (``init_weights``
True: ``A`` kaiming-uniform, ``B = 0``; ``"gaussian"``: ``A ~ N(0, 1/r²)``,
``B = 0``; the embedding layer's ``A = 0``, ``B ~ N(0, 1)``) ↔ ``init`` with
``LoRAInit.KAIMING_UNIFORM`` / ``GAUSSIAN`` / ``EMBEDDING``; PEFT's unmerge,
which restores a copy of the base saved at merge time ↔ ``unfold`` with the
``aux`` that ``fold(..., return_aux=True)`` returns.

Factored form (opt-in, ``factored_matmuls=True``): entry ``j`` of ``x @ (W0
⊙ a@b)`` is ``Σ_k Σ_i x_i a_ik W0_ij b_kj``, so ``x @ ΔW = Σ_k ((x ⊙ a_:k) @
W0) ⊙ b_k:``: ``r`` extra products with the frozen base and no ``(in, out)``
matrix nor its cotangent. Each costs as much as the layer's own matmul, so
the form trades about ``r`` times the layer's FLOPs (forward and backward) for
two weight-sized temporaries: worth it only for a small ``r`` under memory
pressure. By default the adapter has no factored form, and the factored path
materialises ``W0 ⊙ (1 + a@b)`` (one weight-sized matrix and its cotangent,
with one warning per leaf), which is the cheaper choice at PEFT's ``r = 32``.

Not modelled: PEFT's ``init_weights=False`` (both factors ``N(0, 1)``, a
debugging option) and HiRA on convolutions; ``io.load_peft`` reads such
files all the same (initialisation does not enter a file).

Exports: ``HiRAParams``, ``hira``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class HiRAParams(NamedTuple):
    """Trainable HiRA factors (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` = PEFT ``hira_A.T`` (``hira_embedding_A.T`` on a table).
      b: ``(r, out)`` = PEFT ``hira_B.T`` (``hira_embedding_B.T``), 0 at init
        except with ``LoRAInit.EMBEDDING``.
    """

    a: jax.Array
    b: jax.Array


def hira(
    rank: int,
    *,
    init: _lora.LoRAInit = _lora.LoRAInit.KAIMING_UNIFORM,
    factored_matmuls: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """HiRA: ``W' = W0 + W0 ⊙ (a@b)`` with trainable ``a (in, r)``, ``b (r, out)``.

    Identity at init (``b = 0``, or ``a = 0`` with ``LoRAInit.EMBEDDING``).
    Trainable parameters: ``r·(in + out)`` per matrix, PEFT's count. The
    update is high-rank although the factors are low-rank.

    Args:
      rank: ``r`` (static; PEFT's default 32). No bound by ``min(in, out)``:
        ``a@b`` is a modulation mask, not a low-rank update.
      init: a ``LoRAInit`` member: ``KAIMING_UNIFORM`` (PEFT's
        ``init_weights=True``: ``a ~ U(±1/sqrt(in))``, ``b = 0``),
        ``GAUSSIAN`` (``"gaussian"``: ``a ~ N(0, 1/r²)``, ``b = 0``) or
        ``EMBEDDING`` (PEFT's embedding layer: ``a = 0``, ``b ~ N(0, 1)``).
      factored_matmuls: give the adapter the factored form ``x@W0 + Σ_k ((x ⊙
        a_:k) @ W0) ⊙ b_k:``: ``r`` extra products with the base per call
        (about ``r`` times the layer's FLOPs), no ``(in, out)`` matrix and no
        cotangent of one. False (default): no factored form; the factored path
        then materialises ``W'`` (with a warning), the cheaper choice unless
        ``r`` is small and memory is tight.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the factors.
      dropout: PEFT's ``hira_dropout`` on the adapter input, ``dropout(x) @
        (W0 ⊙ a@b)``; only the factored path can apply it, so it needs
        ``factored_matmuls=True``.

    Returns:
      An ``Adapter`` with trainable ``HiRAParams(a, b)`` and frozen part None.
      ``fold(..., return_aux=True)`` returns the base matrix as ``aux`` and
      ``unfold`` restores it exactly (PEFT's unmerge does the same; dividing
      by ``1 + a@b`` would lose the entries where it is 0).

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``; ``dropout`` without ``factored_matmuls``.
      TypeError: ``init`` is not a ``LoRAInit`` member, or
        ``factored_matmuls`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = hira(2)
      >>> w = jnp.arange(30.0).reshape(6, 5) / 30
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, f
      ((6, 2), (2, 5), None)
      >>> bool((ad.apply(w, t, f) == w).all())
      True
      >>> t = HiRAParams(jnp.ones((6, 2)), jnp.full((2, 5), 0.5))
      >>> bool(jnp.allclose(ad.apply(w, t, f), 2 * w))  # W0 ⊙ (1 + 1)
      True

    References:
      Huang et al., ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS
    """
    rank = _lora.check_rank(rank, "hira")
    if not isinstance(init, _lora.LoRAInit):
        raise TypeError(f"hira: init must be a LoRAInit member, got {init!r}")
    if not isinstance(factored_matmuls, bool):
        raise TypeError(f"hira: factored_matmuls must be a bool, got {factored_matmuls!r}")
    if dropout and not factored_matmuls:
        raise ValueError(f"hira: dropout={dropout} acts on the adapter input, which "
                         "only the factored form sees; pass factored_matmuls=True")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("hira takes no stats")
        n_in, n_out = w.shape
        if init is _lora.LoRAInit.KAIMING_UNIFORM:
            a = _lora.kaiming_uniform_a(key, n_in, rank, param_dtype)
            b = jnp.zeros((rank, n_out), param_dtype)
        elif init is _lora.LoRAInit.GAUSSIAN:
            a = jax.random.normal(key, (n_in, rank), jnp.float32).astype(param_dtype) / rank
            b = jnp.zeros((rank, n_out), param_dtype)
        else:
            a = jnp.zeros((n_in, rank), param_dtype)
            b = jax.random.normal(key, (rank, n_out), jnp.float32).astype(param_dtype)
        return HiRAParams(a=a, b=b), None

    def apply_matrix(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype)
        wc = w.astype(ct)
        return wc + wc * (t.a.astype(ct) @ t.b.astype(ct))

    def aux_matrix(w, t, f):
        return w

    def unapply_matrix(w, t, f, aux):
        if aux is None:
            raise TypeError("hira: unfold needs the aux (the base matrix) that "
                            "fold(..., return_aux=True) returned")
        return aux

    def factored_matrix(w, t, f):
        def delta(x):
            ct = _lowrank.compute_dtype(x.dtype, w.dtype, t.a.dtype)
            xa = jnp.einsum("...i,ik->...ik", x.astype(ct), t.a.astype(ct))
            h = jnp.einsum("...ik,io->...ko", xa, w.astype(ct))  # r base products
            return jnp.einsum("...ko,ko->...o", h, t.b.astype(ct))

        return _protocol.FactoredTerms(delta=delta)

    return _lift.lift_matrix(
        name=f"hira(rank={rank}, init={init.value}"
             + (", factored_matmuls=True)" if factored_matmuls else ")"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        aux_matrix=aux_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        factored_matrix=factored_matrix if factored_matmuls else None,
        hyperparameters=(("rank", rank), ("init", init),
                         ("factored_matmuls", factored_matmuls), ("dropout", float(dropout))),
    )
