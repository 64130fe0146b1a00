# SPDX-License-Identifier: Apache-2.0
"""Statistics for data-driven initialisers: accumulated gradients, input covariances.

The initialisers never run a hidden training loop (see
docs/conventions.md#data-driven-initialisers-take-explicit-statistics): these
helpers compute the statistics explicitly, and ``inits.run`` takes them as
``stats={path: array}``.

* ``accumulate_gradients`` ↔ LoRA-SB's gradient accumulation (Ponkshe et al.,
  2024, https://arxiv.org/abs/2411.19557, §3; ``utils/gradient_utils.py``) and
  LoRA-GA's gradient estimate (Wang et al., 2024,
  https://arxiv.org/abs/2407.05000, Eq. 8).
* ``collect_covariances`` ↔ CorDA's covariance ``C = mean XᵀX`` of each
  targeted layer's input (Yang et al., 2024, https://arxiv.org/abs/2406.05223,
  §3.1; PEFT ``tuners/lora/corda.py::calib_cov_distribution``).

How covariances are collected, on any model (the choice): ``inits`` sits
below ``exec`` in the layering, so ``collect_covariances`` takes the
factored-execution transform as an argument (``transform=exec.factored``).
Each targeted kernel gets a *probe* adapter whose factored term adds an exact
zero to the layer output through a ``jax.custom_vjp`` whose backward rule
returns ``XᵀX/max(X)²`` (and a call count) as the probe's "gradient". One
``jax.grad`` of the summed outputs therefore yields every targeted layer's
covariance, through ``scan`` over stacked layers, ``remat`` and ``jit``, on
peftjax's NNX models and on unmodified Linen/NNX models alike; the model's
outputs are unchanged. Flax's ``intercept_methods`` would cover Linen only,
and capturing activations as Python side effects leaks tracers out of
``scan``.

Exports: ``accumulate_gradients``, ``collect_covariances``.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base

PyTree = Any


def _target_paths(targets: Any, flat: dict[str, Any], fn: str) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    paths = list(targets)  # a plan/assignment dict iterates over its paths
    if not paths:
        raise ValueError(f"{fn}: no target paths given")
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f"{fn}: targets {missing[:10]} are not leaves of params")
    for p in paths:
        if not jnp.issubdtype(flat[p].dtype, jnp.floating):
            raise TypeError(f"{fn}: target {p!r} is not floating ({_base.describe(flat[p])})")
    return paths


def _split(params: PyTree, paths: Sequence[str]) -> tuple[dict[str, Any], Callable]:
    flat = tree.leaves_by_path(params)
    tgt = {p: flat[p] for p in paths}

    def join(t: dict[str, Any], base: PyTree) -> PyTree:
        return tree.map_with_path(lambda p, x: t.get(p, x), base)

    return tgt, join


def accumulate_gradients(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batches: Iterable[Any],
    targets: Iterable[str],
    *,
    mean: bool = False,
    offload: bool = False,
    dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
    """Sums (or averages) full-weight gradients of the targeted leaves over batches.

    ``G = Σ_b ∂loss_fn(params, b)/∂W`` for each targeted ``W``, differentiating
    the targeted leaves only (every other leaf is a non-differentiated
    argument, so it gets no gradient). The accumulate step is one jitted
    function ``(acc, params, batch) -> acc + grad`` with ``acc`` donated.

    Memory: device memory holds the params, the running sum (one float32 copy
    of each targeted leaf) and, inside the step, one batch's targeted
    gradients plus that batch's activations, never more: no gradient of an
    untargeted leaf and no per-batch history. With ``offload=True`` the running
    sum lives in host memory (NumPy, float32) and the device holds one batch's
    targeted gradients at a time. Per targeted ``(in, out)`` matrix this is
    ``4·in·out`` bytes for the sum (plus as much transiently).

    LoRA-SB uses the sum of per-batch mean losses (``mean=False``; any
    normalisation is absorbed by ``sign``); LoRA-GA uses the mean over
    batches (``mean=True``). To use ``num_samples`` examples as LoRA-SB does,
    pass batches that together hold exactly that many.

    Args:
      loss_fn: ``(params, batch) -> scalar loss`` (mean over the batch).
      params: the frozen pretrained parameter tree.
      batches: an iterable of batches (consumed once).
      targets: the leaf paths (a list, or a plan/assignment dict).
      mean: divide the sum by the number of batches.
      offload: keep the running sum on the host.
      dtype: accumulation dtype.

    Returns:
      ``{path: gradient}`` with each leaf's shape, in ``dtype``.

    Raises:
      ValueError: no batches, unknown targets, or non-finite gradients (naming
        the path).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> loss = lambda p, x: jnp.sum(x @ p["w"] + p["b"])
      >>> g = accumulate_gradients(loss, params, [jnp.ones((1, 3))] * 2, ["w"])
      >>> g["w"].tolist()
      [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    flat = tree.leaves_by_path(params)
    paths = _target_paths(targets, flat, "accumulate_gradients")
    tgt, join = _split(params, paths)
    dtype = jnp.dtype(dtype)

    def grads(t, base, batch):
        g = jax.grad(lambda tt: loss_fn(join(tt, base), batch))(t)
        return {p: x.astype(dtype) for p, x in g.items()}

    def add(acc, base, batch):
        t = {p: tree.leaves_by_path(base)[p] for p in paths}
        g = grads(t, base, batch)
        return {p: acc[p] + g[p] for p in paths}

    n = 0
    if offload:
        grad_step = jax.jit(lambda base, batch: grads(
            {p: tree.leaves_by_path(base)[p] for p in paths}, base, batch))
        acc_h = {p: np.zeros(np.shape(tgt[p]), dtype) for p in paths}
        for batch in batches:
            g = jax.device_get(grad_step(params, batch))
            for p in paths:
                acc_h[p] += g[p]
            n += 1
        acc = acc_h
    else:
        step = jax.jit(add, donate_argnums=0)
        acc = {p: jnp.zeros(np.shape(tgt[p]), dtype) for p in paths}
        for batch in batches:
            acc = step(acc, params, batch)
            n += 1
    if n == 0:
        raise ValueError("accumulate_gradients: `batches` yielded no batch")
    out = {}
    for p in paths:
        x = jnp.asarray(acc[p])
        if mean:
            x = x / jnp.asarray(n, dtype)
        _base.check_finite(x, f"accumulate_gradients: the gradient of {p!r}")
        out[p] = x
    return out


class _Probe(NamedTuple):
    stat: jax.Array  # float32 zeros shaped like what ``reduce`` returns
    calls: jax.Array  # () float32, zero


def input_probe(name: str, reduce: Callable[[jax.Array], jax.Array],
                zeros: Callable[[jax.Array], jax.Array],
                dims: tree.DimensionNumbers | None) -> _adapters.Adapter:
    """A zero-valued adapter whose "gradient" is a statistic of its layer input.

    Its factored delta is ``0``, so the model's outputs are unchanged; its
    backward rule returns ``_Probe(reduce(X), 1)`` as the cotangent of its
    trainable part, with ``X`` the call's inputs flattened to ``(tokens, in)``
    in float32. ``jax.grad`` of any function of the outputs (through
    ``factored.transform``) therefore sums the statistic and the call count
    over the calls, through ``jit``, ``scan`` and ``remat``.

    Args:
      name: the adapter's name.
      reduce: ``(tokens, in) float32 -> statistic`` (traced).
      zeros: ``w (in, out) -> zeros`` shaped like the statistic.
      dims: the kernels' matrix view.

    Returns:
      The probe adapter (trainable ``_Probe(stat, calls)``).
    """

    @jax.custom_vjp
    def zero(x, probe, n_out):
        return jnp.zeros(x.shape[:-1] + (n_out.shape[0],), x.dtype)

    def fwd(x, probe, n_out):
        return zero(x, probe, n_out), (x, n_out)

    def bwd(res, ct):
        x, n_out = res
        xm = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return (jnp.zeros_like(x), _Probe(reduce(xm), jnp.ones((), jnp.float32)),
                jnp.zeros_like(n_out))

    zero.defvjp(fwd, bwd)

    def init_matrix(key, w, stats):
        return _Probe(zeros(w), jnp.zeros((), jnp.float32)), None

    def terms(w, t, f):
        n_out = jnp.zeros((w.shape[1],), jnp.float32)
        return _adapters.FactoredTerms(delta=lambda x: zero(x, t, n_out))

    return _adapters.lift_matrix(
        name=name, init_matrix=init_matrix, apply_matrix=lambda w, t, f: w,
        dimension_numbers=dims, factored_matrix=terms)


def probe_gradient(apply_fn: Callable[..., Any], params: PyTree, paths: Sequence[str],
                   probe: _adapters.Adapter, transform: Callable[..., Callable[..., Any]]
                   ) -> tuple[Callable[..., Any], Any]:
    """``(grad, trainable)``: ``grad(trainable, params, batch)`` returns the
    probes' ``{path: _Probe}`` summed over one batch's calls (``probe`` on
    each of ``paths``, the outputs' floating leaves summed as the loss)."""
    wanted = set(paths)
    assignment = tree.assign(params, tree.Rule(where=lambda p, _: p in wanted, then=probe))
    state = _adapters.init(assignment, jax.random.key(0), params)

    def total(trainable, base, batch):
        out = transform(apply_fn, assignment, trainable, state.frozen)(base, batch)
        return sum((jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out)
                    if jnp.issubdtype(x.dtype, jnp.floating)), jnp.zeros((), jnp.float32))

    return jax.grad(total), state.trainable


def _covariance(normalize: bool) -> Callable[[jax.Array], jax.Array]:
    def reduce(xm):
        if normalize:
            xm = xm / jnp.abs(jnp.max(xm))
        return xm.T @ xm

    return reduce


def collect_covariances(
    apply_fn: Callable[..., Any],
    params: PyTree,
    batches: Iterable[Any],
    targets: Iterable[str],
    *,
    transform: Callable[..., Callable[..., Any]],
    normalize: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
) -> dict[str, jax.Array]:
    """Collects ``C = mean over calls of XᵀX`` of each targeted matmul's input.

    For every targeted kernel ``W (in, out)`` used as ``y = x @ W``, each call
    (one batch through one layer) contributes ``XᵀX`` with ``X`` the call's
    inputs flattened to ``(tokens, in)`` in float32, divided by
    ``|max(X)|²`` when ``normalize`` (CorDA's quirk in PEFT: the absolute value
    of the *largest element*, not ``max|X|``); the sum is divided by the
    number of calls. Stacked kernels ``(L, in, out)`` give ``(L, in, in)``.
    PEFT's hook expects one sequence per call: pass batches of one sequence
    to reproduce its statistics exactly.

    Mechanism: see the module docstring (a zero-valued probe adapter run
    through ``transform``, which must be ``peftjax.factored.transform``).

    Memory: per targeted matrix a float32 ``(in, in)`` running sum plus, in the
    backward pass, one ``(in, in)`` product per call and the layer inputs the
    model already keeps for its own backward pass. No weight-sized gradient.

    Args:
      apply_fn: ``(params, batch) -> outputs`` (any float pytree).
      params: the parameter tree (argument 0 of ``apply_fn``).
      batches: iterable of batches.
      targets: leaf paths of the targeted kernels.
      transform: ``peftjax.factored.transform``.
      normalize: divide each call's ``X`` by ``|max(X)|`` (CorDA/PEFT).
      dimension_numbers: the kernels' matrix view (None: ``(in, out)``, or
        ``(L, in, out)`` for the scanned ``layers/...`` layout).

    Returns:
      ``{path: (batch..., in, in) float32}``.

    Raises:
      ValueError: no batches; a targeted kernel that no call multiplied (its
        call count is 0); non-finite covariances.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import factored
      >>> params = {"w": jnp.ones((2, 3))}
      >>> x = jnp.array([[1.0, 2.0], [0.0, 1.0]])
      >>> c = collect_covariances(lambda p, b: b @ p["w"], params, [x], ["w"],
      ...                         transform=factored.transform, normalize=False)
      >>> c["w"].tolist()
      [[1.0, 2.0], [2.0, 5.0]]
    """
    flat = tree.leaves_by_path(params)
    paths = _target_paths(targets, flat, "collect_covariances")
    # Stacked leaves (the scanned ``layers/...`` layout) get their view from
    # ``tree.assign``; other rank >= 3 kernels need dimension_numbers.
    probe = input_probe("covariance_probe", _covariance(normalize),
                        lambda w: jnp.zeros((w.shape[0], w.shape[0]), jnp.float32),
                        dimension_numbers)
    grad, trainable = probe_gradient(apply_fn, params, paths, probe, transform)

    @jax.jit
    def step(acc, base, batch):
        return jax.tree.map(jnp.add, acc, grad(trainable, base, batch))

    acc = trainable
    n = 0
    for batch in batches:
        acc = step(acc, params, batch)
        n += 1
    if n == 0:
        raise ValueError("collect_covariances: `batches` yielded no batch")
    out = {}
    for p in paths:
        calls = np.asarray(acc[p].calls)
        if (calls == 0).any():
            raise ValueError(
                f"collect_covariances: {p!r} ({_base.describe(flat[p])}) was never "
                "multiplied by an input that reaches the outputs (call count 0); "
                "is it used by apply_fn through a matmul?")
        c = acc[p].stat / jnp.asarray(calls, jnp.float32)[..., None, None]
        _base.check_finite(c, f"collect_covariances: the covariance of {p!r}")
        out[p] = c
    return out
