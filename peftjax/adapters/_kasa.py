# SPDX-License-Identifier: Apache-2.0
"""KaSA: LoRA in SVD form on a base whose ``r`` smallest singular components are dropped.

KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models.
Wang, Jiang, Park, Kim & Tang, ICLR 2025.
https://arxiv.org/abs/2412.06071

The paper changes LoRA in two ways. Knowledge-based SVD truncation: the
frozen ``W = U Σ Vᵀ`` loses its ``r`` smallest ("noisy", long-tail) singular
components, keeping the rank-``(k - r)`` approximation (``k = min(in,
out)``), once, before training. Knowledge-aware singular-value adaptation:
the update is SVD-shaped, ``ΔW = ΔU ΔΣ ΔVᵀ`` with a trainable diagonal
``ΔΣ`` between the two factors, trained with the L2 penalty ``‖ΔΣ‖²_F``
(Eq. 9-10) and the orthogonal regulariser ``‖ΔUᵀΔU - I‖_F + ‖ΔVᵀΔV - I‖_F``
(Eq. 11), weighted by ``β`` and ``γ`` and added to the task loss.

Hugging Face PEFT 0.21 ships it as a LoRA variant
(``LoraConfig(kasa_config=KasaConfig(beta, gamma))``,
``KasaLinearVariant``), followed here, also for its files: ``ΔW = s ·
B diag(d) A`` with LoRA's ``A``/``B`` (``lora_A``, ``lora_B``), scaling ``s
= alpha/r`` (or ``alpha/√r``) and ``d = lora_diag (r,)``; init LoRA's
(kaiming-uniform ``A``, ``B = 0``) and ``d ~ N(0, 1)``, so the update is 0
at init but the model is not the base: the truncation has removed the
dropped components. PEFT truncates the base weight in place and never saves
it; peftjax leaves the base untouched and makes the truncation part of the
adapter: on a Flax kernel ``W0 (in, out) = Wᵀ = Ũ S Ṽᵀ`` (``Ũ`` = torch's
``V``), with ``U_d (in, r)`` the left singular vectors of the ``r``
smallest singular values (frozen, from a float32 SVD at ``init``),

``W' = (I - U_d U_dᵀ) W0 + s · (a ⊙ d) @ b``

(``U_dᵀ W0 = S_d Ṽ_dᵀ``, so the first term is PEFT's truncated weight),
``a (in, r) = Aᵀ``, ``b (r, out) = Bᵀ``. ``kasa_loss`` is PEFT's
``_get_kasa_loss``: ``Σ β‖d‖² + γ(‖bbᵀ - I‖_F + ‖aᵀa - I‖_F)`` over the
KaSA matrices (each stacked layer one matrix). The frozen basis also
holds ``U_dᵀ W0 (r, out)`` so that ``unapply`` is exact (the projection
alone is not invertible); ``fold`` then gives PEFT's merged weight.

Factored form: the projection is an input map, ``x ↦ x - (x U_d) U_dᵀ``
(``4·r·in`` FLOPs per row, before the model's base product), and the update
a delta ``s·((x a) ⊙ d) b`` (``2·r·(in + out) + r``); no ``(in, out)``
temporary. Adapter dropout reaches only the update (PEFT's dropout is on
the LoRA branch). As for any input map, ``adapters.batched`` refuses KaSA.

Exports: ``KaSAParams``, ``KaSABasis``, ``kasa``, ``kasa_basis``, ``kasa_loss``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class KaSAParams(NamedTuple):
    """Trainable KaSA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` = PEFT ``lora_A`` transposed (``ΔV``).
      b: ``(r, out)`` = PEFT ``lora_B`` transposed (``ΔUᵀ``).
      diag: ``(r,)`` = PEFT ``lora_diag``, the trainable singular values ``ΔΣ``.
    """

    a: jax.Array
    b: jax.Array
    diag: jax.Array


class KaSABasis(NamedTuple):
    """The frozen truncation: the base's ``r`` smallest singular components.

    Attributes:
      u: ``(in, r)`` orthonormal left singular vectors of the kernel view
        ``W0 (in, out)`` for its ``r`` smallest singular values.
      dropped: ``(r, out)`` = ``uᵀ W0`` (= ``S_d Ṽ_dᵀ``): the dropped part
        is ``u @ dropped``; kept so that ``unapply`` restores ``W0``.
    """

    u: jax.Array
    dropped: jax.Array


def kasa_basis(w: jax.Array, rank: int, *, dtype: Any = None) -> KaSABasis:
    """The frozen truncation of one ``(in, out)`` matrix: its ``r`` smallest singular components.

    A float32 (or wider, for a wider ``w``) SVD of ``w``; ``u`` holds the
    left singular vectors of the ``rank`` smallest singular values. PEFT
    rebuilds its truncated base from the original weight the same way when
    it loads a KaSA file (``load_peft`` calls this).

    Args:
      w: ``(in, out)`` base matrix (Flax layout, ``Wᵀ``).
      rank: ``r``, the number of dropped components (``< min(in, out)``).
      dtype: dtype of the result (default: the computation's).

    Returns:
      ``KaSABasis(u (in, r), dropped = uᵀ w (r, out))``.

    Example:
      >>> import jax.numpy as jnp
      >>> b = kasa_basis(jnp.diag(jnp.array([3.0, 2.0, 0.5])), 1)
      >>> [abs(round(x, 4)) for x in b.u[:, 0].tolist()], abs(round(float(b.dropped[0, 2]), 4))
      ([0.0, 0.0, 1.0], 0.5)
    """
    ct = _lowrank.compute_dtype(jnp.float32, w.dtype)
    wc = jnp.asarray(w).astype(ct)
    u, _, _ = jnp.linalg.svd(wc, full_matrices=False)
    ud = u[:, u.shape[1] - rank:]
    out = ct if dtype is None else jnp.dtype(dtype)
    return KaSABasis((ud).astype(out), (ud.T @ wc).astype(out))


def kasa(
    rank: int,
    *,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    beta: float = 1e-4,
    gamma: float = 1e-3,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """KaSA: ``W' = (I - U_d U_dᵀ)·W0 + s·(A ⊙ d)@B`` (PEFT's ``kasa_config``).

    Drops the ``r`` smallest singular components of the kernel and adds an
    SVD-shaped LoRA update with trainable singular values ``d``. Trainable:
    ``r·(in + out) + r`` per matrix (PEFT's count); frozen: the truncation,
    ``r·(in + out)``. Not the identity at init (the truncation; the update
    is 0). Add ``kasa_loss`` to the task loss for the paper's regularisers.
    The factored path projects the input rows (``4·r·in`` FLOPs per row) and
    adds the update (``2·r·(in + out) + r``).

    Args:
      rank: ``r`` (static): the LoRA rank and the number of dropped singular
        components; must be ``< min(in, out)`` (PEFT's check).
      alpha: ``lora_alpha`` (PEFT's default 8).
      scaling: ``Scaling.ALPHA_OVER_RANK`` (default), ``ALPHA_OVER_SQRT_RANK``
        (PEFT's ``use_rslora``) or ``NONE``.
      beta: ``β``, weight of ``‖d‖²`` in ``kasa_loss`` (PEFT's default 1e-4).
      gamma: ``γ``, weight of the orthogonal regulariser in ``kasa_loss``
        (PEFT's default 1e-3).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the parameters and of the basis.
      dropout: dropout rate on the update's input (factored path only).

    Returns:
      An ``Adapter`` with trainable ``KaSAParams(a, b, diag)`` and frozen
      ``KaSABasis(u, dropped)``.

    Static arguments: all.

    Raises:
      ValueError: ``rank <= 0``, ``alpha <= 0``, a negative or non-finite
        ``beta``/``gamma``; at init, ``rank >= min(in, out)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = kasa(1)
      >>> w = jnp.diag(jnp.array([3.0, 2.0, 0.5]))
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.a.shape, t.b.shape, t.diag.shape, f.u.shape
      ((3, 1), (1, 3), (1,), (3, 1))
      >>> [round(x, 4) for x in jnp.diag(ad.apply(w, t, f)).tolist()]
      [3.0, 2.0, 0.0]

    References:
      Wang et al., ICLR 2025, https://arxiv.org/abs/2412.06071
    """
    rank = _lora.check_rank(rank, "kasa")
    s = _lora.scaling_value(scaling, alpha, rank)
    for name, v in (("beta", beta), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                v >= 0 and v < float("inf")):
            raise ValueError(f"kasa: {name} must be a finite number >= 0, got {v!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("kasa takes no stats")
        n_in, n_out = w.shape
        if rank >= min(n_in, n_out):
            raise ValueError(
                f"kasa: rank={rank} must be < min(in, out)={min(n_in, n_out)} of the "
                f"matrix view of shape {tuple(w.shape)} (at least one singular "
                "component must survive the truncation)")
        ka, kd = jax.random.split(key)
        t = KaSAParams(a=_lora.kaiming_uniform_a(ka, n_in, rank, param_dtype),
                       b=jnp.zeros((rank, n_out), param_dtype),
                       diag=jax.random.normal(kd, (rank,), param_dtype))
        return t, kasa_basis(w, rank, dtype=param_dtype)

    def parts(w, t, f):
        ct = _lowrank.compute_dtype(w.dtype, t.a.dtype, f.u.dtype)
        a = t.a.astype(ct) * t.diag.astype(ct)[None, :]
        update = (a @ t.b.astype(ct)) * jnp.asarray(s, ct)
        return ct, f.u.astype(ct), update

    def apply_matrix(w, t, f):
        ct, u, update = parts(w, t, f)
        wc = w.astype(ct)
        return wc - u @ (u.T @ wc) + update

    def unapply_matrix(w, t, f, aux):
        ct, u, update = parts(w, t, f)
        return w.astype(ct) - update + u @ f.dropped.astype(ct)

    def factored_matrix(w, t, f):
        def in_map(x):
            ct = _lowrank.compute_dtype(x.dtype, f.u.dtype)
            u = f.u.astype(ct)
            xc = x.astype(ct)
            return (xc - (xc @ u) @ u.T).astype(x.dtype)

        def delta(x):
            return _lowrank.low_rank(x, t.a * t.diag[None, :].astype(t.a.dtype), t.b, s)

        return _protocol.FactoredTerms(in_map=in_map, delta=delta)

    return _lift.lift_matrix(
        name=f"kasa(rank={rank}, alpha={alpha}, scaling={scaling.value})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        factored_matrix=factored_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("alpha", alpha), ("scaling", scaling),
                         ("s", s), ("beta", float(beta)), ("gamma", float(gamma))),
    )


def _fro(m: jax.Array) -> jax.Array:
    """Frobenius norm over the last two axes, with a zero (not NaN) gradient at 0."""
    sq = jnp.sum(m ** 2, axis=(-2, -1))
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def kasa_loss(assignment: dict[str, _protocol.Adapter], trainable: dict[str, Any]
              ) -> jax.Array:
    """The KaSA regularisers (Eq. 9-11), summed over KaSA matrices: PEFT's ``_get_kasa_loss``.

    Per matrix: ``β·Σ d² + γ·(‖b bᵀ - I_r‖_F + ‖aᵀ a - I_r‖_F)`` with the
    adapter's ``beta`` and ``gamma`` (``b bᵀ`` = PEFT's ``BᵀB``, ``aᵀa`` =
    ``AAᵀ``); each layer of a stacked leaf is one matrix (its own norms). Add
    it to the task loss. Differentiable; computed in float32 or wider.

    Args:
      assignment: ``{path: Adapter}``.
      trainable: ``AdapterState.trainable``.

    Returns:
      A scalar (0.0 without KaSA leaves).

    Raises:
      ValueError: ``KaSAParams`` under an adapter that is not a ``kasa``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.eye(4)}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=kasa(2, beta=1.0, gamma=0.0))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> t = {"w": st.trainable["w"]._replace(diag=jnp.array([1.0, 2.0]))}
      >>> float(kasa_loss(a, t))
      5.0
    """
    total = jnp.zeros((), jnp.float32)
    for p, t in trainable.items():
        if not isinstance(t, KaSAParams):
            continue
        hp = dict(assignment[p].hyperparameters) if p in assignment else {}
        if "beta" not in hp or "gamma" not in hp:
            raise ValueError(f"kasa_loss: {p!r} holds KaSAParams but its adapter "
                             f"{assignment.get(p)!r} is not a kasa")
        ct = _lowrank.compute_dtype(jnp.float32, t.a.dtype)
        a, b, d = t.a.astype(ct), t.b.astype(ct), t.diag.astype(ct)
        gram_b = b @ jnp.swapaxes(b, -1, -2)
        gram_a = jnp.swapaxes(a, -1, -2) @ a
        eye = jnp.broadcast_to(jnp.eye(d.shape[-1], dtype=ct), gram_a.shape)
        l3 = _fro(gram_b - eye) + _fro(gram_a - eye)
        loss = hp["beta"] * jnp.sum(d ** 2) + hp["gamma"] * jnp.sum(l3)
        total = total + loss.astype(total.dtype)
    return total
