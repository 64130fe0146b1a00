# SPDX-License-Identifier: Apache-2.0
"""TinyLoRA: a tiny trainable vector projected onto a frozen SVD basis.

Learning to Reason in 13 Parameters. Morris et al., 2026.
https://arxiv.org/abs/2602.04118

TinyLoRA builds on LoRA-XS: the weight's truncated SVD gives a frozen basis
and the trainable ``r×r`` core ``R`` of LoRA-XS is replaced by a projection of
a tiny trainable vector ``v (u,)`` through fixed random tensors
``P (u, r, r)``: ``R = Σ_i v_i P_i`` (the paper's Eq. for ``R``) and
``ΔW = U_r Σ_r^{1/2} · R · Σ_r^{1/2} V_rᵀ``. Hugging Face PEFT
(``tuners/tinylora``), which this module follows for its files, splits the
singular values evenly (``tinylora_A = √Σ_r V_rᵀ (r, in)``,
``tinylora_B = U_r √Σ_r (out, r)``), clips ``r`` to ``min(in, out)``, draws
``P ~ N(0, 1/r)`` (the paper leaves the distribution open), starts ``v`` at
zero (the identity) or, with ``init_weights="uniform"``, at
``U(-init_v_bound, init_v_bound)``, and has no scaling factor.

On a Flax kernel ``W (in, out)`` (the transpose of torch's ``(out, in)``) the
basis is ``a = tinylora_Aᵀ (in, r)``, ``b = tinylora_Bᵀ (r, out)`` and
``ΔW = a · R · b`` with ``R = Σ_i v_i P_i``; a torch ``nn.Linear`` therefore
has ``P_flax[i] = P_torch[i]ᵀ``, while a torch embedding table, which PEFT
decomposes untransposed, keeps ``P`` as is (``peftjax.io`` converts both).
peftjax draws ``P`` from the leaf's key, not from PEFT's
``projection_seed + module index``; PEFT files carry ``P`` by default
(``save_projection=True``) and are read from the file.

Equation map: ``R = Σ v_i P_i`` ↔ ``_core``; ``W' = W + a R b`` ↔ ``apply``
(``unapply`` subtracts the same product exactly).

Weight tying (PEFT's ``weight_tying = τ``): the ``N`` adapted matrices are
numbered and split into ``G = max(1, round(N·(1 - τ)))`` consecutive groups
of ``max(1, N // G)`` (the last takes the rest), each group sharing one
``v``. peftjax then trains one table ``V (G, u)`` held once in
``AdapterState.trainable["@shared"][table]`` (``adapters.Shared``; its
gradient sums over the matrices) and gives every matrix a frozen group id:
``v = V[group]``. ``adapters.init`` numbers the matrices in assignment order,
the layers of a stacked leaf one after another; PEFT numbers them in torch's
module order, which ``peftjax.io`` reproduces when it reads a file.

Exports: ``TinyLoRAParams``, ``TinyLoRABasis``, ``tinylora``, ``tinylora_groups``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol, _shared


class TinyLoRAParams(NamedTuple):
    """Trainable vector.

    Attributes:
      v: ``(u,)`` coefficients of the projection tensors; with weight tying
        ``Shared(table)``, the table ``V (G, u)`` held once in
        ``AdapterState.trainable["@shared"]``.
    """

    v: Any


class TinyLoRABasis(NamedTuple):
    """Frozen SVD basis and projection tensors.

    Attributes:
      a: ``(in, r)`` ``U_r √Σ_r`` of the ``(in, out)`` matrix view (PEFT's
        ``tinylora_A`` transposed for a linear layer).
      b: ``(r, out)`` ``√Σ_r V_rᵀ`` (PEFT's ``tinylora_B`` transposed).
      projection: ``(u, r, r)`` fixed random tensors ``P`` in this layout
        (``ΔW = a (Σ v_i P_i) b``).
      group: ``()`` int32, the row of the shared table ``V`` this matrix
        reads (weight tying), or None (``v`` is the matrix's own).
    """

    a: jax.Array
    b: jax.Array
    projection: jax.Array
    group: jax.Array | None = None


def _core(t: TinyLoRAParams, f: TinyLoRABasis) -> jax.Array:
    """``R = Σ_i v_i P_i (r, r)`` in the wider of the two dtypes."""
    v = t.v if f.group is None else t.v[f.group]  # tied: a row of the table
    ct = _lowrank.compute_dtype(v.dtype, f.projection.dtype)
    return jnp.einsum("u,ujk->jk", v.astype(ct), f.projection.astype(ct))


def tinylora_groups(n: int, weight_tying: float) -> np.ndarray:
    """PEFT's group of each of ``n`` matrices for ``weight_tying``.

    Args:
      n: the number of adapted matrices.
      weight_tying: ``τ`` in ``[0, 1]``.

    Returns:
      ``(n,)`` int32 group ids in ``[0, G)``, ``G = max(1, round(n·(1 - τ)))``.

    Example:
      >>> tinylora_groups(7, 0.5).tolist()
      [0, 1, 2, 3, 3, 3, 3]
    """
    groups = max(1, round(n * (1.0 - weight_tying)))  # Python's round, as PEFT
    size = max(1, n // groups)
    return np.minimum(np.arange(n) // size, groups - 1).astype(np.int32)


def tinylora(
    r: int = 2,
    u: int = 64,
    *,
    uniform_init: bool = False,
    init_v_bound: float = 0.02,
    weight_tying: float = 0.0,
    table: str = "tinylora",
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """TinyLoRA: ``W' = W + a · (Σ_i v_i P_i) · b`` with only ``v (u,)`` trainable.

    ``a (in, r)`` and ``b (r, out)`` come from the exact SVD of the weight's
    matrix view in float32, the singular values split evenly between them
    (``a = U_r √Σ_r``, ``b = √Σ_r V_rᵀ``); ``r`` is clipped to
    ``min(in, out)`` as PEFT does. ``P (u, r, r) ~ N(0, 1/r)`` is drawn from
    the leaf's key. Trainable parameters: ``u`` per matrix with
    ``weight_tying=0``, else ``u·G`` in all (PEFT's counts); frozen:
    ``r·(in + out) + u·r²`` per matrix. No scaling factor.

    The factored path (``peftjax.factored``) never forms ``ΔW``: it computes
    ``((x a) R) b`` with the ``r×r`` core, ``O(r·(in + out))`` per row.

    Args:
      r: SVD rank ``r`` (PEFT's default 2).
      u: length of the trainable vector (PEFT's default 64).
      uniform_init: False (PEFT's ``init_weights=True``): ``v = 0``, the
        identity at init; True (PEFT's ``init_weights="uniform"``):
        ``v ~ U(-init_v_bound, init_v_bound)``.
      init_v_bound: bound of the uniform init (PEFT's default 0.02).
      weight_tying: ``τ`` in ``[0, 1]`` (PEFT's default 0: one ``v`` per
        matrix); above 0 the matrices of one ``table`` share ``G`` vectors
        (see the module docstring).
      table: the shared table's name under ``trainable["@shared"]`` (with
        weight tying; adapters with the same name are tied together).
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``v``, the basis and ``P``.
      dropout: adapter-input dropout (factored path only; PEFT's
        ``tinylora_dropout``).

    Returns:
      An ``Adapter`` with trainable ``TinyLoRAParams(v)`` and frozen
      ``TinyLoRABasis(a, b, projection[, group])``.

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = tinylora(r=2, u=3)
      >>> t, f = ad.init(jax.random.key(0), jnp.eye(4))
      >>> t.v.shape, f.a.shape, f.b.shape, f.projection.shape
      ((3,), (4, 2), (2, 4), (3, 2, 2))
      >>> bool((ad.apply(jnp.eye(4), t, f) == jnp.eye(4)).all())
      True

    References:
      Morris et al., 2026, https://arxiv.org/abs/2602.04118
    """
    for label, value in (("r", r), ("u", u)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tinylora: {label} must be a positive int, got {value!r}")
    if not isinstance(uniform_init, bool):
        raise TypeError(f"tinylora: uniform_init must be a bool, got {uniform_init!r}")
    if not float(init_v_bound) >= 0.0:
        raise ValueError(f"tinylora: init_v_bound must be >= 0, got {init_v_bound!r}")
    param_dtype = jnp.dtype(param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"tinylora: param_dtype must be floating, got {param_dtype}")
    bound = float(init_v_bound)
    tying = float(weight_tying)
    if isinstance(weight_tying, bool) or not 0.0 <= tying <= 1.0:
        raise ValueError(f"tinylora: weight_tying must be in [0, 1], got {weight_tying!r}")
    if not isinstance(table, str) or not table:
        raise TypeError(f"tinylora: table must be a non-empty str, got {table!r}")
    tied = tying > 0.0

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("tinylora takes no stats")
        rank = min(r, w.shape[0], w.shape[1])
        uu, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(sv[:rank])
        a = uu[:, :rank] * root[None, :]
        b = root[:, None] * vt[:rank]
        k_p, k_v = jax.random.split(key)
        proj = jax.random.normal(k_p, (u, rank, rank), jnp.float32) / rank**0.5
        basis = TinyLoRABasis(a.astype(param_dtype), b.astype(param_dtype),
                              proj.astype(param_dtype))
        if tied:  # the group id is filled in by init_table over all matrices
            return (TinyLoRAParams(_shared.Shared(table)),
                    basis._replace(group=jnp.zeros((), jnp.int32)))
        return TinyLoRAParams(draw_v(k_v, (u,))), basis

    def draw_v(key, shape):
        if uniform_init:
            v = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        else:
            v = jnp.zeros(shape, jnp.float32)
        return v.astype(param_dtype)

    def init_table(key, leaves):
        """PEFT's groups over the matrices in assignment order; the table."""
        sizes = [int(np.prod(np.shape(f.group))) for _, _, f in leaves.values()]
        ids = tinylora_groups(sum(sizes), tying)
        out, start = {}, 0
        for (path, (_, t, f)), n in zip(leaves.items(), sizes, strict=True):
            group = jnp.asarray(ids[start:start + n].reshape(np.shape(f.group)))
            out[path] = (t, f._replace(group=group))
            start += n
        count = int(ids[-1]) + 1 if len(ids) else 1
        return _shared.SharedParts(trainable={table: draw_v(key, (count, u))},
                                   leaves=out)

    forms = _lowrank.low_rank_forms(
        lambda t, f: _lowrank.LowRank(f.a, f.b, 1.0, core=_core(t, f)))
    return _lift.lift_matrix(
        name=(f"tinylora(r={r}, u={u}, weight_tying={tying}, table={table!r})"
              if tied else f"tinylora(r={r}, u={u})"),
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("r", r), ("u", u), ("uniform_init", uniform_init),
                         ("init_v_bound", bound), ("dropout", float(dropout)),
                         ("weight_tying", tying), ("table", table)),
        shared=None if not tied else _shared.SharedInit(
            group=table, config=("tinylora", u, tying, uniform_init, bound,
                                 param_dtype.name),
            init=init_table),
        **forms,
    )
