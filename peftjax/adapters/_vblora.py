# SPDX-License-Identifier: Apache-2.0
"""VB-LoRA: LoRA factors assembled from one shared vector bank.

VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks. Li et
al., 2024. https://arxiv.org/abs/2405.15179

Section 3 of the paper: every adapted matrix's LoRA factors are cut into
sub-vectors of length ``b`` (``vector_length``); each sub-vector is a top-k
admixture of the vectors of ONE bank ``B (h, b)`` (``num_vectors`` vectors)
shared by all adapted matrices (Eq. 4):
``v = Σ_{i∈topk(s)} softmax(topk(s))_i · B_i``, with trainable logits ``s``
per sub-vector. Hugging Face PEFT (``tuners/vblora``), which this module
follows, stores the logits as ``logits_A (r, in/b, h)`` and ``logits_B
(out/b, r, h)``; the sub-vectors of ``A`` are rows ``A (r, in)`` cut along
``in``, those of ``B (out, r)`` are columns cut along ``out``;
``ΔW = B @ A`` with no scaling, the bank ``U(±init_vector_bank_bound)`` and
the logits ``N(0, init_logits_std²)``. Not the identity at init (PEFT's
neither: both factors start non-zero).

On a Flax kernel ``W (in, out)`` the update is ``ΔWᵀ = a @ b`` with
``a = Aᵀ (in, r)`` and ``b = Bᵀ (r, out)``; the logits keep PEFT's axis order.
The bank is ONE trainable array shared by every leaf (``adapters.Shared``):
``AdapterState.trainable["@shared"][bank]``, its gradient the sum over the
leaves. The factored path computes ``x@W + (x@a)@b`` (the LoRA form; forming
``a`` and ``b`` is a gather of ``r·(in+out)·k`` bank entries).

Exports: ``VBLoRAParams``, ``vblora``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol, _shared


class VBLoRAParams(NamedTuple):
    """Trainable VB-LoRA parameters of one leaf.

    Attributes:
      logits_a: ``(r, in/b, h)`` logits of ``A``'s sub-vectors (PEFT's
        ``vblora_logits_A``).
      logits_b: ``(out/b, r, h)`` logits of ``B``'s sub-vectors (PEFT's
        ``vblora_logits_B``).
      bank: ``Shared(bank name)``: the vector bank ``(h, b)`` shared by all
        leaves, stored once in ``AdapterState.trainable["@shared"]``.
    """

    logits_a: jax.Array
    logits_b: jax.Array
    bank: Any


def admix(logits: jax.Array, bank: jax.Array, topk: int) -> jax.Array:
    """Top-k softmax admixture of bank vectors (paper Eq. 4).

    Args:
      logits: ``(..., h)``.
      bank: ``(h, b)``.
      topk: ``k``.

    Returns:
      ``(..., b)``: ``Σ_i softmax(topk(logits))_i · bank[topk index i]``, in the
      wider of the two dtypes.
    """
    ct = _lowrank.compute_dtype(logits.dtype, bank.dtype)
    top, idx = jax.lax.top_k(logits.astype(ct), topk)
    weights = jax.nn.softmax(top, axis=-1)
    return jnp.einsum("...k,...kb->...b", weights, bank.astype(ct)[idx])


def vblora(
    rank: int = 4,
    *,
    num_vectors: int = 256,
    vector_length: int = 256,
    topk: int = 2,
    init_vector_bank_bound: float = 0.02,
    init_logits_std: float = 0.1,
    bank: str = "vblora",
    dropout: float = 0.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """VB-LoRA adapter: ``W' = W + a @ b`` with factors admixed from a shared bank.

    Defaults are PEFT's (``VBLoRAConfig``). Not the identity at init. Both the
    input and output sizes must be multiples of ``vector_length``.
    Trainable parameters: ``h·(r·in/b + r·out/b)`` per matrix (``h =
    num_vectors``, ``b = vector_length``) plus ``h·b`` for the bank, once
    for every leaf that shares it. Exact inverse (``unfold``): yes. Factored
    form: ``(x@a)@b``.

    Args:
      rank: ``r``.
      num_vectors: ``h``, vectors in the bank.
      vector_length: ``b``, the length of each bank vector.
      topk: ``k``, bank vectors mixed into each sub-vector.
      init_vector_bank_bound: the bank starts ``U(±bound)``.
      init_logits_std: the logits start ``N(0, std²)``.
      bank: the name of the shared bank; leaves whose adapters name the same
        bank share it (their bank hyperparameters must agree).
      dropout: adapter-input dropout (factored path only).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of the logits and the bank.

    Returns:
      An ``Adapter`` with trainable ``VBLoRAParams`` (the bank as a ``Shared``
      placeholder) and nothing frozen.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"q": jnp.zeros((8, 4)), "v": jnp.zeros((8, 4))}
      >>> ad = vblora(2, num_vectors=6, vector_length=4)
      >>> a = tree.assign(params, [tree.Rule(where="q|v", then=ad)])
      >>> s = adapters.init(a, jax.random.key(0), params)
      >>> s.trainable["q"].logits_a.shape, s.trainable["@shared"]["vblora"].shape
      ((2, 2, 6), (6, 4))
      >>> adapters.num_trainable(s.trainable)  # 2 x (2*2*6 + 1*2*6) + 6*4
      96

    References:
      Li et al., 2024, https://arxiv.org/abs/2405.15179
    """
    rank = _lora.check_rank(rank, "vblora")
    for label, v in (("num_vectors", num_vectors), ("vector_length", vector_length),
                     ("topk", topk)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"vblora: {label} must be a positive int, got {v!r}")
    if topk > num_vectors:
        raise ValueError(f"vblora: topk={topk} exceeds num_vectors={num_vectors}")
    if not isinstance(bank, str) or not bank or bank.startswith("@"):
        raise ValueError(f"vblora: bank must be a non-empty name, got {bank!r}")
    param_dtype = jnp.dtype(param_dtype)
    bound, std = float(init_vector_bank_bound), float(init_logits_std)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("vblora takes no stats")
        n_in, n_out = w.shape
        for side, n in (("input", n_in), ("output", n_out)):
            if n % vector_length:
                raise ValueError(
                    f"vblora: the {side} size {n} of the matrix (in={n_in}, "
                    f"out={n_out}) is not a multiple of vector_length={vector_length}")
        ka, kb = jax.random.split(key)
        la = std * jax.random.normal(ka, (rank, n_in // vector_length, num_vectors))
        lb = std * jax.random.normal(kb, (n_out // vector_length, rank, num_vectors))
        return VBLoRAParams(logits_a=la.astype(param_dtype),
                            logits_b=lb.astype(param_dtype),
                            bank=_shared.Shared(bank)), None

    def factors(t, f):
        del f
        sub_a = admix(t.logits_a, t.bank, topk)           # (r, in/b, b)
        sub_b = admix(t.logits_b, t.bank, topk)           # (out/b, r, b)
        a = sub_a.reshape(rank, -1).T                     # A (r, in) -> (in, r)
        b = jnp.transpose(sub_b, (1, 0, 2)).reshape(rank, -1)  # B (out, r) -> (r, out)
        return _lowrank.LowRank(left=a, right=b)

    def init_bank(key, leaves):
        del leaves
        value = jax.random.uniform(key, (num_vectors, vector_length), jnp.float32,
                                   -bound, bound)
        return _shared.SharedParts(trainable={bank: value.astype(param_dtype)})

    return _lift.lift_matrix(
        name=(f"vblora(rank={rank}, num_vectors={num_vectors}, "
              f"vector_length={vector_length}, topk={topk}, bank={bank!r})"),
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("num_vectors", num_vectors),
                         ("vector_length", vector_length), ("topk", topk),
                         ("init_vector_bank_bound", bound),
                         ("init_logits_std", std), ("bank", bank)),
        shared=_shared.SharedInit(
            group=bank, config=("vblora", num_vectors, vector_length, bound,
                                param_dtype.name),
            init=init_bank),
        **_lowrank.low_rank_forms(factors),
    )
