# SPDX-License-Identifier: Apache-2.0
"""The adapter protocol: the types every adapter and every consumer share.

An adapter is a reparametrisation ``W' = apply(W, trainable, frozen)`` of one
weight leaf: ``Adapter(init, apply, ...)`` holds pure functions with the
hyperparameters captured by its factory (``lora(rank=8)``). Its parameters
are two small pytrees, ``trainable`` and ``frozen``; over a whole tree they
live in an ``AdapterState`` keyed by canonical path. ``FactoredForm`` and
``FactoredTerms`` describe the same adapter as terms of the matmul, which is
how ``peftjax.factored`` runs it without forming ``W'``.

Nothing here computes: per-matrix lifting is in ``_lift``, the low-rank
algebra in ``_lowrank``, the tree-level verbs in ``_tree``.

Exports: ``Adapter``, ``AdapterState``, ``BiasHook``, ``FactoredForm``,
``FactoredTerms``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from peftjax import tree
from peftjax.adapters._shared import SharedInit


class BiasHook(NamedTuple):
    """How an adapter on a kernel also reparametrises its sibling bias leaf.

    Attributes:
      name: the sibling leaf's last path component (``"bias"``).
      apply: ``(bias (batch..., out), trainable, frozen) -> bias'`` per matrix.
      unapply: the exact inverse, or None.
      required: if True, ``init`` raises when the kernel has no such sibling.
      kernel: if True, ``apply`` and ``unapply`` also take the base kernel's
        matrix view ``W0 (batch..., in, out)`` as a last argument (GLoRA's
        ``b + W0ᵀ·C``): the unadapted kernel in both directions (``unfold``
        recovers it with the kernel's ``unapply`` first).
    """

    name: str
    apply: Callable[..., jax.Array]
    unapply: Callable[..., jax.Array] | None = None
    required: bool = False
    kernel: bool = False


class FactoredTerms(NamedTuple):
    """One matrix's adapter as ``y = (out_map(in_map(x ⊙ in_scale) @ W) + delta(x̃)) ⊙ out_scale``.

    This is how the factored path (``peftjax.factored``) applies an adapter without
    forming ``W'``: the base product ``(x ⊙ in_scale) @ W`` is the model's own
    matmul, ``x̃`` is the adapter input after adapter dropout, and every term
    is cheap (vectors, or products with rank-``r`` factors).

    Attributes:
      in_scale: ``(in,)`` scale of the input features, or None (= 1).
      out_scale: ``(out,)`` scale of the output units, or None (= 1).
      delta: ``x̃ (..., in) -> (..., out)`` additive term, or None (= 0). It
        may return a wider dtype than ``x̃``.
      in_map: ``x (..., in) -> (..., in)``, a cheap linear map of the input
        applied before the base product (after ``in_scale``), or None (=
        identity): OFT's block-diagonal rotation ``x ↦ x·R``, so that ``R·W``
        is never formed. It must return ``x``'s dtype. Adapters with an
        ``in_map`` cannot vary per example (``adapters.batched``) nor run a
        factored convolution.
      out_map: ``h (..., out) -> (..., out)``, a cheap linear map of the
        base product's output ``h = in_map(x ⊙ in_scale) @ W`` (before
        ``delta`` is added), or None (= identity): RoAd's rotation of output
        pairs ``h ↦ R h``, so that neither ``R·W`` nor a second base product
        is formed. It must return ``h``'s dtype. The same restrictions as
        ``in_map`` apply.

    Example:
      >>> import jax.numpy as jnp
      >>> t = FactoredTerms(out_scale=jnp.full((3,), 2.0))
      >>> t.in_scale is None, t.delta is None, t.in_map is None, t.out_map is None
      (True, True, True, True)
    """

    in_scale: jax.Array | None = None
    out_scale: jax.Array | None = None
    delta: Callable[[jax.Array], jax.Array] | None = None
    in_map: Callable[[jax.Array], jax.Array] | None = None
    out_map: Callable[[jax.Array], jax.Array] | None = None


class FactoredForm(NamedTuple):
    """What ``peftjax.factored`` needs to run an adapter in factored form.

    Attributes:
      dimension_numbers: the leaf's matrix view (None: Flax defaults).
      terms: per matrix, ``(w (in, out), trainable, frozen) -> FactoredTerms``
        with unbatched ``trainable``/``frozen``.
      apply: per matrix, ``(w (in, out), trainable, frozen) -> w'``: the
        weight-space form, used where a kernel is consumed by an operation
        the factored path does not handle (it then materialises, loudly).
    """

    dimension_numbers: tree.DimensionNumbers | None
    terms: Callable[..., FactoredTerms]
    apply: Callable[..., jax.Array]


class Adapter(NamedTuple):
    """A per-leaf reparametrisation ``W' = apply(W, trainable, frozen)``.

    Attributes:
      init: ``(key, w, *, stats=None) -> (trainable, frozen)``; ``trainable``
        and ``frozen`` are NamedTuples of arrays (``frozen`` may be None).
      apply: ``(w, trainable, frozen) -> w'`` with ``w'`` in ``w``'s dtype.
      unapply: exact inverse ``(w', trainable, frozen, aux) -> w`` or None
        when no exact inverse exists (``unfold`` then raises ``TypeError``).
      fold_aux: ``(w, trainable, frozen) -> aux``: what ``fold`` must return
        so that ``unfold`` is exact (DoRA's column norms), or None.
      bias: a ``BiasHook`` when the adapter also changes the sibling bias.
      dropout: rate of dropout on the adapter's input; only the factored path
        (``peftjax.factored``) can apply it, see ``materialize``.
      name: a readable description used in ``repr`` and error messages.
      factored: a ``FactoredForm`` for the factored path (``peftjax.factored``),
        or None when the adapter exists in weight space only (the factored
        path then materialises it, with a warning).
      dimension_numbers: the leaf's matrix view, or None (2-D ``(in, out)``;
        ``tree.assign`` fills it in for stacked and declared leaves).
      relayout: ``dims -> Adapter``: the same adapter with another view
        (``with_dimension_numbers``), or None if it cannot change.
      elementwise: True when the adapter acts on the leaf elementwise and
        views no matrix (LN tuning on norm scales): ``tree.assign`` then
        binds no view, so 1-D and stacked ``(layers, d)`` leaves are allowed.
      hyperparameters: the factory's arguments as ``((name, value), ...)``
        (hashable; ``dict(adapter.hyperparameters)`` reads them), so that
        writers such as ``peftjax.io.save_peft`` need not parse ``name``.
        Empty for adapters that do not record them.
      shared: a ``SharedInit`` when the adapter's parameters hold ``Shared``
        placeholders for arrays shared by several leaves (VB-LoRA's vector
        bank): ``init`` makes them once under ``AdapterState.trainable
        ["@shared"]`` and the tree verbs resolve them (``_shared``); or None.

    An ``Adapter`` is static configuration: close over assignments (or pass
    them as static arguments) rather than passing them to ``jit`` as arrays.
    """

    init: Callable[..., tuple[Any, Any]]
    apply: Callable[..., jax.Array]
    unapply: Callable[..., jax.Array] | None = None
    fold_aux: Callable[..., Any] | None = None
    bias: BiasHook | None = None
    dropout: float = 0.0
    name: str = "adapter"
    factored: FactoredForm | None = None
    dimension_numbers: tree.DimensionNumbers | None = None
    relayout: Callable[..., "Adapter"] | None = None
    elementwise: bool = False
    hyperparameters: tuple[tuple[str, Any], ...] = ()
    shared: SharedInit | None = None

    def __repr__(self) -> str:
        return self.name

    def with_dimension_numbers(self, dims: tree.DimensionNumbers) -> "Adapter":
        """Returns this adapter viewing its leaf through ``dims``.

        Args:
          dims: the leaf's matrix view.

        Returns:
          The same method and hyperparameters with ``dims`` as its view.

        Raises:
          TypeError: the adapter cannot change its view.

        Example:
          >>> from peftjax import adapters, tree
          >>> a = adapters.lora(2).with_dimension_numbers(tree.dims.stacked())
          >>> a.dimension_numbers.batch_axis
          (0,)
        """
        if not isinstance(dims, tree.DimensionNumbers):
            raise TypeError(f"{self.name}: dims must be a DimensionNumbers, got {dims!r}")
        if self.relayout is None:
            raise TypeError(f"{self.name} has a fixed matrix view "
                            f"{self.dimension_numbers}; build it with "
                            "dimension_numbers= instead")
        return self.relayout(dims)

    def num_trainable(self, leaf: Any) -> int:
        """Returns the number of trainable parameters this adapter gives ``leaf``."""
        spec = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        trainable, _ = jax.eval_shape(
            lambda k, w: self.init(k, w), jax.random.key(0), spec
        )
        return sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))


class AdapterState(NamedTuple):
    """Adapter parameters of a whole tree, keyed by canonical path.

    Attributes:
      trainable: ``{path: NamedTuple of arrays}`` (the differentiated pytree).
      frozen: ``{path: NamedTuple of arrays or None}`` (never differentiated).
    """

    trainable: dict[str, Any]
    frozen: dict[str, Any]
