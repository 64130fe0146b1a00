# SPDX-License-Identifier: Apache-2.0
"""RoAd: scaled 2-D rotations of a layer's output features.

RoAd: 2D Rotary Adaptation for Efficient Parameter-Efficient Fine-Tuning.
Liao, Li & Monz, 2024. https://arxiv.org/abs/2409.00119

RoAd (Eq. 4) leaves ``W`` and the bias frozen and turns each pair of output
features ``(h_i, h_j)`` of ``h = W x + b`` by its own scaled rotation,
``z_i = α_i cos θ_i · h_i - α_i sin θ_i · h_j``, ``z_j = α_j sin θ_j · h_i +
α_j cos θ_j · h_j``. Hugging Face PEFT's ``tuners/road`` (followed here, also
for its files) pairs within groups of ``group_size`` outputs: element ``k``
of a group with element ``k + group_size/2``. Its variants share
parameters differently: ``road_1`` one ``(α, θ)`` per pair (``out/2`` of
each), ``road_2`` one per output (``out``), ``road_4`` separate ``(α, θ)`` for
the cosine and the sine entries (``2·out``). With ``c1 = α cos θ`` and ``c2 =
α sin θ`` laid out per output (PEFT's ``_prepare_cols``), PEFT's forward is
``z = h ⊙ c1 + rot(h) ⊙ c2``, ``rot`` mapping each group's halves ``(h1,
h2)`` to ``(-h2, h1)``. Merged (PEFT's ``merge``): ``W' = R W``, ``b' = R b``.

On a Flax kernel ``W0 (in, out)`` the rotation acts on the columns:
``W' = W0 ⊙ c1 + rot(W0) ⊙ c2`` (``rot`` along the output axis) and the
sibling bias the same way. ``unapply`` inverts each 2x2 block in closed form
(PEFT inverts ``R`` numerically); the identity at init: ``θ = 0``, ``α = 1``.

Factored form: ``out_map`` (``FactoredTerms``) rotates the base product's
output, ``y = R(x W0)`` (PEFT's own forward): ``R·W0`` is never formed and
the only extra work is ``O(out)`` elementwise per row (``3·out`` FLOPs:
two products and a sum, whatever the variant). LoRA of rank ``r`` adds
``2·r·(in + out)`` per row, i.e. twice its trainable count: at RoAd's count
(``road_2``: ``2·out``, ``r = 1`` for ``in = out``; ``road_4``: ``4·out``,
``r = 2``) that is ``4·out`` and ``8·out``; ``road_1`` (``out``) is below
rank 1.
Like every ``out_map`` adapter it cannot vary per example
(``adapters.batched``, which also refuses its bias hook) nor run a factored
convolution.

Exports: ``RoAdParams``, ``road``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lowrank, _protocol

VARIANTS = ("road_1", "road_2", "road_4")
_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


class RoAdParams(NamedTuple):
    """Trainable RoAd parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      theta: PEFT ``road_theta``: ``(out/2,)`` (``road_1``), ``(out,)``
        (``road_2``) or ``(2·out,)`` (``road_4``), init 0.
      alpha: PEFT ``road_alpha``, the same shape, init 1.
    """

    theta: jax.Array
    alpha: jax.Array


def _cols(variant: str, group: int, theta: jax.Array, alpha: jax.Array):
    """``(c1, c2)`` per output feature (PEFT's ``_prepare_cols``)."""
    if variant == "road_1":
        half = group // 2
        theta = jnp.tile(theta.reshape(-1, 1, half), (1, 2, 1)).reshape(-1)
        alpha = jnp.tile(alpha.reshape(-1, 1, half), (1, 2, 1)).reshape(-1)
        return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    if variant == "road_2":
        return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    theta = theta.reshape(-1, 2, group)
    alpha = alpha.reshape(-1, 2, group)
    return (alpha[:, 0].reshape(-1) * jnp.cos(theta[:, 0].reshape(-1)),
            alpha[:, 1].reshape(-1) * jnp.sin(theta[:, 1].reshape(-1)))


def _rot(h: jax.Array, group: int) -> jax.Array:
    """``(..., out)``: each group's halves ``(h1, h2)`` -> ``(-h2, h1)``."""
    g = h.reshape(h.shape[:-1] + (-1, 2, group // 2))
    return jnp.stack([-g[..., 1, :], g[..., 0, :]], axis=-2).reshape(h.shape)


def _lead(c: jax.Array, ndim: int) -> jax.Array:
    """``c (out,)`` with leading unit axes to broadcast against an ``ndim`` array."""
    return c.reshape((1,) * (ndim - 1) + c.shape)


def _rotate(h: jax.Array, c1: jax.Array, c2: jax.Array, group: int) -> jax.Array:
    return h * _lead(c1, h.ndim) + _rot(h, group) * _lead(c2, h.ndim)


def _unrotate(z: jax.Array, c1: jax.Array, c2: jax.Array, group: int) -> jax.Array:
    """Inverse of ``_rotate``: each pair's 2x2 block ``[[a, -b], [d, e]]`` inverted."""
    shape = z.shape
    c1, c2 = _lead(c1, z.ndim), _lead(c2, z.ndim)
    pairs = lambda v: v.reshape(v.shape[:-1] + (-1, 2, group // 2))  # noqa: E731
    zg, c1g, c2g = pairs(z), pairs(c1), pairs(c2)
    a, e = c1g[..., 0, :], c1g[..., 1, :]
    b, d = c2g[..., 0, :], c2g[..., 1, :]
    z1, z2 = zg[..., 0, :], zg[..., 1, :]
    det = a * e + b * d
    return jnp.stack([(e * z1 + b * z2) / det, (a * z2 - d * z1) / det],
                     axis=-2).reshape(shape)


def road(
    variant: str = "road_1",
    *,
    group_size: int = 64,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """RoAd: ``W' = W0 ⊙ c1 + rot(W0) ⊙ c2`` on the output features (Eq. 4).

    ``θ`` and ``α`` are trainable (``out/2``, ``out`` or ``2·out`` of each per
    matrix for ``road_1/2/4``, PEFT's count); nothing is frozen. The sibling
    ``bias`` leaf, when the kernel has one, is rotated the same way (PEFT
    rotates the layer's output, bias included). Identity at init. Factored
    form: ``FactoredTerms.out_map`` rotates ``x W0`` (``3·out`` FLOPs per row
    beyond the base product; ``R·W0`` is never formed).

    Args:
      variant: ``"road_1"`` (PEFT's default), ``"road_2"`` or ``"road_4"``.
      group_size: outputs per rotation group (even; PEFT's default 64); the
        output width must be a multiple of it.
      init_weights: True (PEFT's default): ``θ = 0``, ``α = 1`` (the
        identity); False: ``θ ~ N(0, 0.5²)``, ``α ~ N(1, 0.5²)``.
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of ``θ`` and ``α``.

    Returns:
      An ``Adapter`` with trainable ``RoAdParams(theta, alpha)``, no frozen
      part, and a bias hook.

    Static arguments: all.

    Raises:
      ValueError: an unknown ``variant``, an odd or non-positive
        ``group_size``, or (at init) an output width that is not a multiple
        of ``group_size``.
      TypeError: ``init_weights`` is not a bool.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = road("road_2", group_size=4)
      >>> w = jnp.arange(24.0).reshape(3, 8) / 24
      >>> t, f = ad.init(jax.random.key(0), w)
      >>> t.theta.shape, t.alpha.shape, f
      ((8,), (8,), None)
      >>> t = RoAdParams(jnp.full((8,), jnp.pi / 2), jnp.ones((8,)))
      >>> bool(jnp.allclose(ad.apply(w, t, f)[:, :2], -w[:, 2:4], atol=1e-6))
      True

    References:
      Liao et al., 2024, https://arxiv.org/abs/2409.00119
    """
    if variant not in VARIANTS:
        raise ValueError(f"road: variant must be one of {VARIANTS}, got {variant!r}")
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
            or group_size <= 0 or group_size % 2):
        raise ValueError(f"road: group_size must be a positive even integer, got "
                         f"{group_size!r}")
    if not isinstance(init_weights, bool):
        raise TypeError(f"road: init_weights must be a bool, got {init_weights!r}")
    param_dtype = jnp.dtype(param_dtype)

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("road takes no stats")
        n_out = w.shape[1]
        if n_out % group_size:
            raise ValueError(f"road: the output width {n_out} of the matrix view "
                             f"{tuple(w.shape)} is not a multiple of group_size="
                             f"{group_size}")
        size = int(n_out * _SIZE[variant])
        if init_weights:
            return RoAdParams(jnp.zeros((size,), param_dtype),
                              jnp.ones((size,), param_dtype)), None
        kt, ka = jax.random.split(key)
        theta = 0.5 * jax.random.normal(kt, (size,), jnp.float32)
        alpha = 1.0 + 0.5 * jax.random.normal(ka, (size,), jnp.float32)
        return RoAdParams(theta.astype(param_dtype), alpha.astype(param_dtype)), None

    def cols(t, *dtypes):
        ct = _lowrank.compute_dtype(jnp.float32, t.theta.dtype, *dtypes)
        return _cols(variant, group_size, t.theta.astype(ct), t.alpha.astype(ct)), ct

    def apply_matrix(w, t, f):
        (c1, c2), ct = cols(t, w.dtype)
        return _rotate(w.astype(ct), c1, c2, group_size)

    def unapply_matrix(w, t, f, aux):
        (c1, c2), ct = cols(t, w.dtype)
        return _unrotate(w.astype(ct), c1, c2, group_size)

    def bias_apply(b, t, f):
        (c1, c2), ct = cols(t, b.dtype)
        return _rotate(b.astype(ct), c1, c2, group_size).astype(b.dtype)

    def bias_unapply(b, t, f):
        (c1, c2), ct = cols(t, b.dtype)
        return _unrotate(b.astype(ct), c1, c2, group_size).astype(b.dtype)

    def factored_matrix(w, t, f):
        def out_map(h):
            (c1, c2), ct = cols(t, h.dtype)
            return _rotate(h.astype(ct), c1, c2, group_size).astype(h.dtype)

        return _protocol.FactoredTerms(out_map=out_map)

    return _lift.lift_matrix(
        name=f"road({variant}, group_size={group_size})",
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        bias=_protocol.BiasHook(name="bias", apply=bias_apply, unapply=bias_unapply),
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("variant", variant), ("group_size", group_size),
                         ("init_weights", init_weights)),
    )
