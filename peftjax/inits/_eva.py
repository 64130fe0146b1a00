# SPDX-License-Identifier: Apache-2.0
"""EVA: LoRA ``A`` from the principal directions of each layer's inputs, ranks redistributed.

EVA: Explained Variance Adaptation. Paischer et al., 2024.
https://arxiv.org/abs/2410.07170 (PEFT 0.21.2 ``tuners/lora/eva.py``,
``utils/incremental_pca.py``, ``EvaConfig``).

Torch layout, per targeted linear layer with inputs ``X (tokens, in)``:

1. incremental PCA of the inputs over batches (§3.1, Eq. 2; PEFT's
   ``IncrementalPCA.partial_fit``, sklearn's algorithm): running mean and
   variance, and the SVD of ``[diag(S_{t−1})·V_{t−1}; X_t − x̄_t;
   c·(μ_{t−1} − x̄_t)]`` (``c = √(n_{t−1} n_t / n)``), signs fixed so each
   right singular vector's largest-magnitude entry is positive
   (``svd_flip(u_based_decision=False)``), ``k = round(r·ρ)`` components
   kept (↔ ``_IncrementalPCA``);
2. convergence (§3.1): component ``i`` has converged when the cosine
   similarity of ``v_i`` between consecutive batches is ``>= τ``; a layer
   stops being updated when its first ``r_l`` components have converged and
   resumes if a later redistribution asks for more (↔ ``eva_fit``, all
   layers in lockstep as PEFT's forward hooks);
3. rank redistribution (§3.2, Eq. 3): the explained variance ratios
   ``S_i²/Σ n·var`` of all layers' first ``k`` components are ranked and the
   global budget ``Σ r`` goes to the largest (↔ ``_distribute``);
4. ``A = V[:r_l]`` (``whiten``: rows divided by ``√S_i``), ``B = 0``;
   ``adjust_scaling_factors``: ``alpha_l = alpha·r_l/r``; a layer given rank
   0 gets no adapter (↔ ``eva``).

Deviations from PEFT: exact float64 SVDs where PEFT calls
``torch.svd_lowrank(q=2k, niter=4)`` (a Gaussian sketch seeded 42); layers
whose inputs are equal (PEFT hashes them and shares one PCA) are fitted
independently here, with ties in the ranking broken by path order; PEFT's
cap of ``ρ`` above 1000 is not reproduced. Flax kernel ``K = Wᵀ``:
``a = Aᵀ`` ``(in, r_l)``, ``b = 0``.

Exports: ``EvaFit``, ``eva_fit``, ``eva``, ``collect_inputs``.
"""

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapters as _adapters
from peftjax import tree
from peftjax.inits import _base, _stats


class _IncrementalPCA:
    """PEFT's ``IncrementalPCA`` (sklearn's algorithm) in float64 NumPy, exact SVD."""

    def __init__(self, k: int):
        self.k = k
        self.n = 0
        self.mean = None
        self.var = None
        self.components = None
        self.singular_values = None
        self.ratio = None

    def partial_fit(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        n_new = x.shape[0]
        total = self.n + n_new
        new_sum = x.sum(0)
        t = new_sum / n_new
        new_unnorm = ((x - t) ** 2).sum(0) - ((x - t).sum(0) ** 2) / n_new
        if self.mean is None:
            mean = new_sum / total
            var = new_unnorm / total
            xc = x - mean
        else:
            last_sum = self.mean * self.n
            mean = (last_sum + new_sum) / total
            ratio = self.n / n_new
            var = (self.var * self.n + new_unnorm
                   + ratio / total * (last_sum / ratio - new_sum) ** 2) / total
            xb = x.mean(0)
            corr = math.sqrt(self.n / total * n_new) * (self.mean - xb)
            xc = np.vstack([self.singular_values[:, None] * self.components, x - xb, corr])
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
        vt = vt * signs[:, None]
        self.n, self.mean, self.var = total, mean, var
        self.components = vt[: self.k]
        self.singular_values = s[: self.k]
        self.ratio = s[: self.k] ** 2 / np.sum(var * total)


class EvaFit(NamedTuple):
    """What ``eva_fit`` returns (all NumPy float64, torch layout).

    Attributes:
      components: ``{path: (k, in)}`` the right singular vectors of the
        inputs (rows, descending; ``k = round(r·ρ)``).
      singular_values: ``{path: (k,)}``.
      explained_variance_ratio: ``{path: (k,)}``.
      ranks: ``{path: r_l}`` after redistribution (``Σ r_l = Σ r``).
      target_ranks: ``{path: r}`` as requested.
      num_batches: ``{path: batches the layer's PCA consumed}``.
    """

    components: dict[str, np.ndarray]
    singular_values: dict[str, np.ndarray]
    explained_variance_ratio: dict[str, np.ndarray]
    ranks: dict[str, int]
    target_ranks: dict[str, int]
    num_batches: dict[str, int]


def _distribute(pcas: Mapping[str, _IncrementalPCA], kmax: Mapping[str, int],
                budget: int) -> dict[str, int]:
    keys, values = [], []
    for p, pca in pcas.items():
        for v in pca.ratio[: kmax[p]]:
            keys.append(p)
            values.append(v)
    order = np.argsort(-np.asarray(values), kind="stable")[:budget]
    counts = {p: 0 for p in pcas}
    for i in order:
        counts[keys[i]] += 1
    return counts


def eva_fit(
    batches: Iterable[Mapping[str, Any]],
    ranks: Mapping[str, int],
    *,
    rho: float = 2.0,
    tau: float = 0.99,
    max_batches: int = 1000,
) -> EvaFit:
    """Incremental PCA of each layer's inputs until convergence, and EVA's ranks.

    Args:
      batches: an iterable of ``{path: X}`` with ``X (tokens, in)`` the inputs
        of the layer whose kernel is ``path`` for one batch (extra leading
        axes are flattened; ``collect_inputs`` computes them). A re-iterable
        (list, tuple) is cycled as PEFT cycles its dataloader, until every
        layer has converged or ``max_batches`` batches; a one-shot iterator
        is consumed once. Batches with fewer tokens than a layer's ``k`` are
        skipped for that layer (as PEFT does).
      ranks: ``{path: r}``, each layer's LoRA rank (PEFT's ``r`` /
        ``rank_pattern``); the budget is their sum.
      rho: ``ρ >= 1``: each layer may get up to ``round(r·ρ)`` (PEFT 2.0).
      tau: ``τ`` in ``[0, 1]``, the cosine-similarity threshold (PEFT 0.99).
      max_batches: stop with an error after this many batches.

    Returns:
      An ``EvaFit``; build the adapters with ``inits.eva(fit)``.

    Raises:
      ValueError: bad ``rho``/``tau``/``ranks``; a batch missing a path or
        with another feature size; no batch; no convergence within
        ``max_batches`` (naming the layers).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> xs = [{"w": rng.standard_normal((64, 4)) * [3.0, 1.0, 0.3, 0.1]} for _ in range(8)]
      >>> fit = eva_fit(xs, {"w": 1}, rho=1.0, tau=0.9)
      >>> fit.ranks, int(np.argmax(np.abs(fit.components["w"][0])))
      ({'w': 1}, 0)
    """
    if not rho >= 1.0:
        raise ValueError(f"eva_fit: rho must be >= 1.0, got {rho!r}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"eva_fit: tau must be in [0, 1], got {tau!r}")
    ranks = dict(ranks)
    if not ranks:
        raise ValueError("eva_fit: ranks is empty (no target paths)")
    for p, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"eva_fit: the rank of {p!r} must be a positive int, got {r!r}")
    kmax = {p: round(r * rho) for p, r in ranks.items()}
    budget = sum(ranks.values())
    pcas = {p: _IncrementalPCA(kmax[p]) for p in ranks}
    converged = {p: np.zeros(kmax[p], bool) for p in ranks}
    done = {p: False for p in ranks}
    used = {p: 0 for p in ranks}
    dist = dict(kmax)
    source = batches
    if not isinstance(batches, (list, tuple)):
        source = iter(batches)
    elif not batches:
        raise ValueError("eva_fit: `batches` is empty")
    stream = itertools.cycle(source) if isinstance(source, (list, tuple)) else source
    seen = 0
    for batch in stream:
        for p in ranks:
            now = bool(np.all(converged[p][: dist[p]]))
            if not done[p] and now:
                done[p] = True
            elif done[p] and not now:
                done[p] = False
        if all(done.values()):
            break
        if seen >= max_batches:
            break
        seen += 1
        for p in ranks:
            if done[p]:
                continue
            if p not in batch:
                raise ValueError(f"eva_fit: batch {seen - 1} has no inputs for {p!r}")
            x = np.asarray(jax.device_get(batch[p]), np.float64)
            x = x.reshape(-1, x.shape[-1])
            pca = pcas[p]
            if pca.components is not None and x.shape[1] != pca.components.shape[1]:
                raise ValueError(f"eva_fit: batch {seen - 1} gives {p!r} inputs of "
                                 f"{x.shape[1]} features, earlier batches "
                                 f"{pca.components.shape[1]}")
            if x.shape[1] < kmax[p]:
                raise ValueError(f"eva_fit: {p!r} has {x.shape[1]} input features, fewer "
                                 f"than round(r·rho) = {kmax[p]} components")
            if x.shape[0] < kmax[p]:
                continue
            prev = pca.components
            pca.partial_fit(x)
            used[p] += 1
            if prev is not None:
                cur = pca.components
                sim = np.sum(cur * prev, 1) / np.maximum(
                    np.linalg.norm(cur, axis=1) * np.linalg.norm(prev, axis=1), 1e-8)
                converged[p] = sim >= tau
        if any(pca.components is None for pca in pcas.values()):
            continue
        dist = _distribute(pcas, kmax, budget)
    if seen == 0:
        raise ValueError("eva_fit: `batches` yielded no batch")
    late = [p for p in ranks if pcas[p].components is None
            or not np.all(converged[p][: dist[p]])]
    if late:
        raise ValueError(
            f"eva_fit: {late[:10]} did not converge (tau={tau}) within {seen} batches; "
            "pass more or larger batches, a larger max_batches or a lower tau")
    return EvaFit(
        components={p: pcas[p].components for p in ranks},
        singular_values={p: pcas[p].singular_values for p in ranks},
        explained_variance_ratio={p: pcas[p].ratio for p in ranks},
        ranks=dist, target_ranks=ranks, num_batches=used)


def eva(
    fit: EvaFit,
    *,
    alpha: float = 8.0,
    scaling: _adapters.Scaling = _adapters.Scaling.ALPHA_OVER_RANK,
    whiten: bool = False,
    adjust_scaling_factors: bool = True,
    param_dtype: Any = jnp.float32,
) -> dict[str, _base.Initializer]:
    """EVA's plan: per path a LoRA of rank ``r_l`` with ``a = V[:r_l]ᵀ``, ``b = 0``.

    Pass the plan to ``inits.run(plan, key, params)``; the base is unchanged
    and every adapter is an ordinary ``adapters.lora`` (``r_l·(in+out)``
    trainable), exported as is (``inits.to_lora`` passes it through;
    ``io.save_peft`` writes the per-layer ranks and alphas as PEFT's
    ``rank_pattern`` / ``alpha_pattern``). Paths given rank 0 are left out (PEFT
    removes those layers' adapters). 2-D kernels only.

    Args:
      fit: ``eva_fit``'s result.
      alpha: ``lora_alpha`` for rank ``r`` (PEFT's ``lora_alpha``).
      scaling: ``adapters.Scaling`` member.
      whiten: divide each component by ``√S_i`` (PEFT ``EvaConfig.whiten``).
      adjust_scaling_factors: ``alpha_l = alpha·r_l/r`` so every layer keeps
        ``s = alpha/r`` (PEFT's default True).
      param_dtype: dtype of the factors.

    Returns:
      ``{path: Initializer}``.

    Example:
      >>> import jax, numpy as np, jax.numpy as jnp
      >>> from peftjax import inits
      >>> rng = np.random.default_rng(0)
      >>> xs = [{"w": rng.standard_normal((64, 4)) * [3.0, 1.0, 0.3, 0.1]} for _ in range(8)]
      >>> plan = inits.eva(inits.eva_fit(xs, {"w": 1}, rho=1.0, tau=0.9), alpha=2.0)
      >>> t = inits.run(plan, jax.random.key(0), {"w": jnp.ones((4, 3))}).state.trainable["w"]
      >>> t.a.shape, float(jnp.abs(t.b).max())
      ((4, 1), 0.0)
    """
    if not isinstance(fit, EvaFit):
        raise TypeError(f"eva: fit must be eva_fit's EvaFit, got {type(fit).__name__}")
    param_dtype = jnp.dtype(param_dtype)
    plan = {}
    for p, rl in fit.ranks.items():
        if rl == 0:
            continue
        r = fit.target_ranks[p]
        al = alpha * rl / r if adjust_scaling_factors and rl != r else alpha
        comp = fit.components[p][:rl]
        if whiten:
            comp = comp / np.sqrt(fit.singular_values[p][:rl])[:, None]
        plan[p] = _initializer(p, np.asarray(comp.T, np.float32), rl, al, scaling, param_dtype)
    return plan


def _initializer(path: str, a0: np.ndarray, rank: int, alpha: float,
                 scaling: _adapters.Scaling, param_dtype: Any) -> _base.Initializer:
    adapter = _adapters.lora(rank, alpha=alpha, scaling=scaling, param_dtype=param_dtype)

    def init(key, w, stats=None):
        if stats is not None:
            raise ValueError(f"eva takes no statistics, got {_base.describe(stats)}")
        if np.ndim(w) != 2 or np.shape(w)[0] != a0.shape[0]:
            raise ValueError(
                f"eva: {path!r} needs a 2-D (in, out) kernel with in={a0.shape[0]} "
                f"(the inputs' feature size), got {_base.describe(w)}")
        a = jnp.asarray(a0, param_dtype)
        b = jnp.zeros((rank, np.shape(w)[1]), param_dtype)
        return w, _adapters.LoRAParams(a=a, b=b), None

    return _base.Initializer(
        init=init, adapter=adapter, stats=None, modifies_base=False, rank=rank,
        alpha=float(alpha), scaling=scaling, dimension_numbers=None,
        param_dtype=param_dtype,
        name=f"eva(rank={rank}, alpha={alpha}, scaling={scaling.value})")


def collect_inputs(
    apply_fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    targets: Iterable[str],
    *,
    transform: Callable[..., Callable[..., Any]],
    num_tokens: int,
    dimension_numbers: tree.DimensionNumbers | None = None,
) -> dict[str, jax.Array]:
    """The inputs ``X (tokens, in)`` of each targeted matmul, batch by batch.

    The mechanism of ``collect_covariances`` (a zero-valued probe adapter
    whose backward rule returns the layer input as its "gradient"), so it
    works through ``jit``, ``scan`` and ``remat`` and leaves the outputs
    unchanged. Select rows afterwards (e.g. the attention mask's
    ``mask.reshape(-1)``, PEFT's ``prepare_layer_inputs_fn_language_modeling``)
    and pass the list to ``eva_fit``. One jitted program serves every batch
    (batches of one shape).

    Args:
      apply_fn: ``(params, batch) -> outputs``.
      params: the parameter tree.
      batches: an iterable of batches.
      targets: kernel paths.
      transform: ``peftjax.factored.transform``.
      num_tokens: rows per call (``batch·sequence`` for a language model).
      dimension_numbers: the kernels' matrix view (stacked kernels give
        ``(L, tokens, in)``).

    Returns:
      ``[{path: (batch..., tokens, in) float32}, ...]``, one per batch.

    Raises:
      ValueError: a targeted layer called other than once per forward; no
        batch.

    Example:
      >>> import jax.numpy as jnp
      >>> from peftjax import factored
      >>> p = {"w": jnp.ones((2, 3))}
      >>> x = jnp.array([[1.0, 2.0], [0.0, 1.0]])
      >>> collect_inputs(lambda q, b: b @ q["w"], p, [x], ["w"], transform=factored.transform,
      ...                num_tokens=2)[0]["w"].tolist()
      [[1.0, 2.0], [0.0, 1.0]]
    """
    flat = tree.leaves_by_path(params)
    paths = _stats._target_paths(targets, flat, "collect_inputs")
    n = int(num_tokens)

    def rows(xm):
        if xm.shape[0] != n:
            raise ValueError(f"collect_inputs: a targeted layer saw {xm.shape[0]} input "
                             f"rows per call, num_tokens={n}")
        return xm

    probe = _stats.input_probe("input_probe", rows,
                               lambda w: jnp.zeros((n, w.shape[0]), jnp.float32),
                               dimension_numbers)
    grad, trainable = _stats.probe_gradient(apply_fn, params, paths, probe, transform)
    step = jax.jit(lambda base, b: grad(trainable, base, b))
    result = []
    for batch in batches:
        g = step(params, batch)
        out = {}
        for p in paths:
            calls = np.asarray(g[p].calls)
            if (calls != 1).any():
                raise ValueError(f"collect_inputs: {p!r} was called {calls.tolist()} times "
                                 "per forward (expected once)")
            out[p] = g[p].stat
        result.append(out)
    if not result:
        raise ValueError("collect_inputs: `batches` yielded no batch")
    return result
