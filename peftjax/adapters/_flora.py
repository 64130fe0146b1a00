# SPDX-License-Identifier: Apache-2.0
"""FLoRA: a Tucker core and one factor per mode for N-dimensional kernels.

FLoRA: Low-Rank Core Space for N-dimension. Si, Wang, Yang, Xu, Li, Dai,
Qiao, Yang & Shen, 2024. https://arxiv.org/abs/2405.14739

The change of an N-D weight keeps the weight's topology (the paper's Tucker
form): ``ΔW = s · G ×_1 A^(1) ×_2 A^(2) ⋯ ×_N A^(N)``, with a small core
``G (r_1, ..., r_N)`` and per-mode factors ``A^(n) (d_n, r_n)``; all are
trainable. For a matrix it is ``s · A^(1) G A^(2)ᵀ``; for a conv kernel
``(k_h, k_w, in, out)`` the spatial modes keep their own (small) factors
instead of being flattened into the channels as LoRA on a conv does. The
authors' code (``SJTU-DeepVisionLab/FLoRA``, ``FLoRALayer``; followed here)
initialises the core to zero (``W' = W`` at init) and every factor with
``kaiming_normal_(a=sqrt(3))`` over its rank (``N(0, 1/(2·r_n))``), and
multiplies by ``scale`` (``s``; their layer's default 1.0, 4.0 in their
ConvNeXt example).

The modes are the leaf's own axes in the order of its matrix view,
reduction axes first then output axes (``dimension_numbers``): a plain
``(in, out)`` kernel has two modes, an HWIO conv kernel under
``tree.dims.conv()`` four, a head-split attention kernel ``(embed, heads,
head_dim)`` under ``tree.dims.head_split()`` three; stacked
layers (batch axes) get independent cores and factors. Mode ``n`` gets rank
``min(rank_n, d_n)``.

Factored form: with the reduction modes contracted into the core, ``a =
unfold(G ×_red A) (in, R)`` and ``b = (⊗_out A)ᵀ (R, out)``, ``R`` the
product of the output-mode ranks, the delta is ``s·(x a) b``
(``LowRankDelta``, so convolutions run it as a conv and a 1x1 conv):
``2·R·(in + out)`` FLOPs per row plus forming ``a`` and ``b`` once per
step (never the ``(in, out)`` delta).

Exports: ``FLoRAParams``, ``flora``.
"""

import functools
import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _conv, _lift, _lowrank, _protocol


class FLoRAParams(NamedTuple):
    """Trainable FLoRA parameters (per matrix view; stacked leaves add batch axes).

    Attributes:
      core: ``(r_1, ..., r_N)``: the Tucker core ``G`` (the authors' ``param_G``,
        its modes reordered to the leaf's).
      factors: one ``(d_n, r_n)`` per mode, in the leaf's (reduction...,
        output...) order.
    """

    core: jax.Array
    factors: tuple[jax.Array, ...]


@functools.partial(jax.jit, static_argnums=(2,))
def _tucker(core: jax.Array, factors: tuple[jax.Array, ...], upto: int | None = None):
    """``core ×_n factors[n]`` for the first ``upto`` modes (all by default)."""
    n = core.ndim
    upto = n if upto is None else upto
    letters = string.ascii_letters
    ranks, dims = letters[:n], letters[n:2 * n]
    out = "".join(dims[i] if i < upto else ranks[i] for i in range(n))
    spec = ",".join([ranks] + [f"{dims[i]}{ranks[i]}" for i in range(upto)]) + "->" + out
    return jnp.einsum(spec, core, *factors[:upto])


@jax.jit
def _kron_rows(factors: tuple[jax.Array, ...]) -> jax.Array:
    """``(Π r, Π d)``: ``b[(j...), (o...)] = Π_k factors[k][o_k, j_k]``."""
    out = factors[0].T
    for f in factors[1:]:
        out = (out[:, None, :, None] * f.T[None, :, None, :]).reshape(
            out.shape[0] * f.shape[1], out.shape[1] * f.shape[0])
    return out


@functools.lru_cache(maxsize=256)
def _init_program(modes: tuple[int, ...], rs: tuple[int, ...], dtype: str):
    """One jitted draw of every factor (cached per shape: eager random ops and
    fresh closures would compile again at every init)."""

    @jax.jit
    def make(key):
        sizes = [d * r for d, r in zip(modes, rs, strict=True)]
        flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
        factors = tuple((p.reshape(d, r) * math.sqrt(0.5 / r)).astype(dtype)
                        for p, d, r in zip(pieces, modes, rs, strict=True))
        return FLoRAParams(core=jnp.zeros(rs, dtype), factors=factors)

    return make


def _split(factors: tuple[jax.Array, ...], n_in: int) -> int:
    """Number of leading (reduction) modes whose sizes multiply to ``n_in``."""
    prod = 1
    for k, f in enumerate(factors):
        if prod == n_in:
            return k
        prod *= f.shape[0]
    return len(factors)


def flora(
    rank: int | tuple[int, ...] = 8,
    *,
    scale: float = 1.0,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """FLoRA: ``W' = W + s · G ×_1 A^(1) ⋯ ×_N A^(N)`` over the leaf's own modes.

    Trainable ``Π r_n + Σ d_n·r_n`` per matrix view (nothing frozen); ``W' = W``
    at init (``G = 0``); exact ``unapply``; factored form a ``LowRankDelta``
    (see the module docstring).

    Args:
      rank: one rank for every mode (each capped at the mode's size), or one
        per mode in the leaf's (reduction..., output...) order (the authors'
        ``r`` list, reordered; their linear default ``[8, 8]``).
      scale: ``s`` (the authors' ``scale``, default 1.0).
      dimension_numbers: the leaf's matrix view, which also names its modes:
        default Flax ``(in, out)`` and stacked ``(L, in, out)``;
        ``tree.dims.conv()`` for HWIO conv kernels; ``tree.dims.head_split()``
        for a head-split ``(embed, heads, head_dim)`` attention kernel.
      param_dtype: storage dtype of the core and factors.
      dropout: adapter-input dropout (factored path only).

    Returns:
      An ``Adapter`` with trainable ``FLoRAParams(core, factors)`` and frozen
      None.

    Static arguments: all.

    Raises:
      ValueError: a rank ``<= 0``; at init, a per-mode ``rank`` tuple whose
        length is not the leaf's number of modes (naming the shape).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import tree
      >>> ad = flora(4, dimension_numbers=tree.dims.conv())
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((3, 3, 16, 32)))  # HWIO
      >>> t.core.shape, [a.shape for a in t.factors]
      ((3, 3, 4, 4), [(3, 3), (3, 3), (16, 4), (32, 4)])

    References:
      Si et al., 2024, https://arxiv.org/abs/2405.14739
    """
    ranks = (rank,) if isinstance(rank, (int, np.integer)) and not isinstance(
        rank, bool) else tuple(rank)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, (int, np.integer))
                        or r <= 0 for r in ranks):
        raise ValueError(f"flora: rank must be a positive int or a tuple of them, "
                         f"got {rank!r}")
    ranks = tuple(int(r) for r in ranks)
    scale = float(scale)
    param_dtype = jnp.dtype(param_dtype)
    name = f"flora(rank={rank}, scale={scale})"

    def init_for(modes: tuple[int, ...], shape: tuple[int, ...]):
        if len(ranks) == 1:
            rs = tuple(min(ranks[0], d) for d in modes)
        elif len(ranks) != len(modes):
            raise ValueError(f"{name}: {len(ranks)} ranks for a leaf of shape {shape} "
                             f"with {len(modes)} modes {modes}")
        else:
            rs = tuple(min(r, d) for r, d in zip(ranks, modes, strict=True))

        make = _init_program(modes, rs, param_dtype.name)

        def init_matrix(key, w, stats):
            if stats is not None:
                raise ValueError("flora takes no stats")
            return make(key), None

        return init_matrix

    def delta(w, t):
        ct = _lowrank.compute_dtype(w.dtype, t.core.dtype)
        full = _tucker(t.core.astype(ct), tuple(a.astype(ct) for a in t.factors))
        return ct, full.reshape(w.shape) * jnp.asarray(scale, ct)

    def apply_matrix(w, t, f):
        ct, d = delta(w, t)
        return w.astype(ct) + d

    def unapply_matrix(w, t, f, aux):
        ct, d = delta(w, t)
        return w.astype(ct) - d

    def factored_matrix(w, t, f):
        k = _split(t.factors, w.shape[0])
        ct = _lowrank.compute_dtype(t.core.dtype)
        left = _tucker(t.core.astype(ct), tuple(a.astype(ct) for a in t.factors), upto=k)
        left = left.reshape(w.shape[0], -1)
        right = _kron_rows(tuple(a.astype(ct) for a in t.factors[k:]))
        return _protocol.FactoredTerms(delta=_conv.LowRankDelta(left, right, scale))

    def build(dims: tree.DimensionNumbers | None) -> _protocol.Adapter:
        kw = dict(apply_matrix=apply_matrix, unapply_matrix=unapply_matrix,
                  dimension_numbers=dims, dropout=dropout,
                  factored_matrix=factored_matrix,
                  hyperparameters=(("rank", rank), ("scale", scale)))
        def unused(key, w, stats):  # replaced by ``init`` below (modes from the leaf)
            raise AssertionError("flora: the lifted init is never called")

        lifted = _lift.lift_matrix(name=name, init_matrix=unused, **kw)

        def init(key: jax.Array, w: Any, *, stats: Any = None):
            shape = tuple(np.shape(w))
            if len(shape) < 2:
                return lifted.init(key, w, stats=stats)  # lift_matrix's error
            r = tree.resolve(dims, shape, path="leaf")
            modes = tuple(shape[a] for a in r.reduction + r.output)
            return _lift.lift_matrix(name=name, init_matrix=init_for(modes, shape),
                                     **kw).init(key, w, stats=stats)

        return lifted._replace(init=init, relayout=build)

    return build(dimension_numbers)
