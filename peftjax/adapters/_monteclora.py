# SPDX-License-Identifier: Apache-2.0
"""MonteCLoRA: LoRA whose ``A`` is a Monte Carlo mixture of Gaussian samples in training.

Robust and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of
Low-Rank Adaptation. Seth, Pathak, Sengupta, Verma, Raman, Gopalakrishnan,
Chatterjee & Chakraborty, TMLR 2025. https://arxiv.org/abs/2411.04358

The paper (§4, Proposed Methodology) treats the LoRA factor ``A`` as the mean
of ``N`` Gaussian samples whose covariance has a Wishart hyperprior and whose
mixture weights have a Dirichlet hyperprior, and adds the KL divergences to
the hyperpriors (and an optional entropy term) to the loss. Hugging Face
PEFT's ``tuners/lora/monteclora.py`` + ``MontecloraLinearVariant``
(``LoraConfig(monteclora_config=MontecloraConfig(...))``) is followed here,
also for its files. Per adapted matrix, with ``r`` the rank, trainable
``std_prior (r,)`` (``σ``) and ``expert_weights_prior (N,)`` (``π``), one
training forward draws (Flax layout ``a (in, r)``):

* covariance: ``g_p = max(exp(2σ_p)·c_p, 1e-3)`` with ``c_p`` the diagonal of
  a ``Wishart(df=r, I)`` sample, i.e. independent ``χ²(r)`` (PEFT keeps only
  the diagonal of ``diag(e^σ) W diag(e^σ)``);
* ``N`` noise matrices ``E_n = sample_scaler · Z_n · diag(√g)``, ``Z_n``
  standard normal ``(in, r)``;
* weights: ``α = max(e^π, 1e-6)``, logits ``μ + √(d + 1e-6) ⊙ z`` with
  ``μ = log α - mean(log α)``, ``d = (1/α)(1 - 2/N) + Σ(1/α)/N²`` (a normal
  approximation of ``Dirichlet(α)`` in log space), ``w = softmax(logits)``;
* ``A' = Σ_n w_n (a + E_n)``, and the LoRA term uses ``A'``.

At evaluation (and when merging) PEFT uses ``a`` itself: a plain LoRA; so
does ``apply`` here (``materialize``, ``fold``, the factored path). The
sampling is a separate pure function of a PRNG key: ``monteclora_sample(key,
assignment, trainable, frozen)`` returns the state with every MonteCLoRA
``a`` replaced by ``A'`` (differentiable in ``a``, ``σ`` and ``π``: the
reparameterisations) and the frozen buffers set to this draw's ``g`` and
``w`` (PEFT's ``gaussian_var_prior`` and ``expert_weights`` buffers); feed
those to ``materialize`` or ``factored.transform`` in the training step.
``monteclora_loss`` is PEFT's ``_get_monteclora_loss``: per matrix
``kl_loss_weight·(KL_dir + KL_wishart + KL_mvn) + [Σ w²]``, averaged over
matrices. PEFT's Dirichlet term adds ``Σ log Γ(α₂)/Γ(α₁)`` where the KL
divergence subtracts it; PEFT's sign is kept (computed with ``lgamma``
differences rather than PEFT's ``log(exp(lgamma))``).

Factored form: LoRA's, ``2·r·(in + out)`` FLOPs per row (the draw is made
once per step on ``(N, in, r)`` noise, not per row).

Exports: ``MonteCLoRAParams``, ``MonteCLoRABuffers``, ``monteclora``,
``monteclora_sample``, ``monteclora_loss``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax import tree
from peftjax.adapters import _lift, _lora, _lowrank, _protocol


class MonteCLoRAParams(NamedTuple):
    """Trainable MonteCLoRA parameters (per matrix; stacked leaves add batch axes).

    Attributes:
      a: ``(in, r)`` = PEFT ``lora_A`` transposed (the posterior mean).
      b: ``(r, out)`` = PEFT ``lora_B`` transposed.
      std_prior: ``(r,)``, log standard deviations of the Wishart scale.
      expert_weights_prior: ``(N,)``, log Dirichlet concentrations.
    """

    a: jax.Array
    b: jax.Array
    std_prior: jax.Array
    expert_weights_prior: jax.Array


class MonteCLoRABuffers(NamedTuple):
    """PEFT's sampler buffers: the last draw's covariance and mixture weights.

    Attributes:
      gaussian_var: ``(r, r)`` diagonal covariance (identity before any draw).
      expert_weights: ``(N,)`` mixture weights (``1/N`` before any draw).
    """

    gaussian_var: jax.Array
    expert_weights: jax.Array


def monteclora(
    rank: int,
    *,
    num_samples: int = 8,
    alpha: float = 8.0,
    scaling: _lora.Scaling = _lora.Scaling.ALPHA_OVER_RANK,
    sample_scaler: float = 1e-4,
    dirichlet_prior: float = 0.1,
    kl_loss_weight: float = 1e-5,
    use_entropy: bool = False,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
    dropout: float = 0.0,
) -> _protocol.Adapter:
    """MonteCLoRA: LoRA ``W0 + s·a@b`` with a sampled ``a`` in training.

    ``apply`` (evaluation, merging) is LoRA on ``a``; training draws ``A'``
    with ``monteclora_sample`` and adds ``monteclora_loss``. Trainable:
    ``r·(in + out) + r + N`` per matrix (PEFT's count); frozen: PEFT's
    sampler buffers.

    Args:
      rank: ``r`` (static).
      num_samples: ``N`` (PEFT's ``num_samples``, default 8).
      alpha: ``lora_alpha``.
      scaling: as for ``lora`` (``ALPHA_OVER_SQRT_RANK``: ``use_rslora``).
      sample_scaler: scale of the noise (PEFT's default 1e-4).
      dirichlet_prior: the Dirichlet hyperprior's concentration (0.1).
      kl_loss_weight: weight of the KL terms in ``monteclora_loss`` (1e-5).
      use_entropy: add ``Σ w²`` to ``monteclora_loss`` (PEFT's default False).
      dimension_numbers: the kernel's matrix view; default Flax ``(in, out)``
        and stacked ``(L, in, out)``.
      param_dtype: storage dtype of the parameters.
      dropout: dropout rate on the adapter input (factored path only).

    Returns:
      An ``Adapter`` with trainable ``MonteCLoRAParams`` and frozen
      ``MonteCLoRABuffers``.

    Static arguments: all.

    Raises:
      ValueError: ``rank``/``num_samples`` not positive, a non-positive
        ``alpha``, ``sample_scaler`` or ``dirichlet_prior``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = monteclora(2, num_samples=3)
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((6, 5)))
      >>> t.a.shape, t.std_prior.shape, t.expert_weights_prior.shape, f.gaussian_var.shape
      ((6, 2), (2,), (3,), (2, 2))

    References:
      Seth et al., TMLR 2025, https://arxiv.org/abs/2411.04358
    """
    rank = _lora.check_rank(rank, "monteclora")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"monteclora: num_samples must be a positive int, got {num_samples!r}")
    for name, v in (("sample_scaler", sample_scaler), ("dirichlet_prior", dirichlet_prior)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"monteclora: {name} must be a finite number > 0, got {v!r}")
    s = _lora.scaling_value(scaling, alpha, rank)
    param_dtype = jnp.dtype(param_dtype)
    n = num_samples

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("monteclora takes no stats")
        _lora.check_rank_fits(rank, w, "monteclora")
        n_in, n_out = w.shape
        ka, ks, ke = jax.random.split(key, 3)
        t = MonteCLoRAParams(
            a=_lora.kaiming_uniform_a(ka, n_in, rank, param_dtype),
            b=jnp.zeros((rank, n_out), param_dtype),
            std_prior=jax.random.uniform(ks, (rank,), param_dtype),  # torch.rand
            expert_weights_prior=jax.random.uniform(ke, (n,), param_dtype))
        f = MonteCLoRABuffers(jnp.eye(rank, dtype=param_dtype),
                              jnp.full((n,), 1.0 / n, param_dtype))
        return t, f

    return _lift.lift_matrix(
        name=f"monteclora(rank={rank}, num_samples={n}, alpha={alpha}, "
             f"scaling={scaling.value})",
        init_matrix=init_matrix,
        dimension_numbers=dimension_numbers,
        dropout=dropout,
        hyperparameters=(("rank", rank), ("num_samples", n), ("alpha", alpha),
                         ("scaling", scaling), ("s", s),
                         ("sample_scaler", float(sample_scaler)),
                         ("dirichlet_prior", float(dirichlet_prior)),
                         ("kl_loss_weight", float(kl_loss_weight)),
                         ("use_entropy", bool(use_entropy))),
        **_lowrank.low_rank_forms(lambda t, f: _lowrank.LowRank(t.a, t.b, s)),
    )


def _draw(key: jax.Array, t: MonteCLoRAParams, scaler: float):
    """One matrix's ``(A', gaussian_var (r, r), expert_weights (N,))``."""
    ct = _lowrank.compute_dtype(jnp.float32, t.a.dtype)
    a = t.a.astype(ct)
    n_in, r = a.shape
    n = t.expert_weights_prior.shape[0]
    kc, kz, kd = jax.random.split(key, 3)
    # diag of Wishart(df=r, I) (Bartlett): independent χ²(r), r squared normals each
    chi2 = jnp.sum(jax.random.normal(kc, (r, r), ct) ** 2, axis=0)
    g = jnp.maximum(jnp.exp(2 * t.std_prior.astype(ct)) * chi2, 1e-3)
    noise = scaler * jax.random.normal(kz, (n, n_in, r), ct) * jnp.sqrt(g)[None, None, :]
    alpha = jnp.maximum(jnp.exp(t.expert_weights_prior.astype(ct)), 1e-6)
    mu = jnp.log(alpha) - jnp.mean(jnp.log(alpha))
    d = jnp.maximum((1 / alpha) * (1 - 2 / n) + jnp.sum(1 / alpha) / n**2, 1e-6)
    logits = jnp.sqrt(d + 1e-6) * jax.random.normal(kd, (n,), ct) + mu
    w = jax.nn.softmax(logits)
    a_new = jnp.einsum("n,nij->ij", w, a[None] + noise)
    return a_new.astype(t.a.dtype), jnp.diag(g).astype(t.a.dtype), w.astype(t.a.dtype)


def _mc_paths(assignment, trainable, fn):
    paths = [p for p in assignment if isinstance(trainable.get(p), MonteCLoRAParams)]
    for p in paths:
        if "sample_scaler" not in dict(assignment[p].hyperparameters):
            raise ValueError(f"{fn}: {p!r} holds MonteCLoRAParams but its adapter "
                             f"{assignment[p]!r} is not a monteclora")
    return paths


def monteclora_sample(key: jax.Array, assignment: dict[str, _protocol.Adapter],
                      trainable: dict[str, Any], frozen: dict[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Draws MonteCLoRA's training-mode ``A'`` for every MonteCLoRA leaf.

    Args:
      key: a PRNG key; each leaf folds in its path, each stacked layer splits.
      assignment: ``{path: Adapter}``.
      trainable: ``AdapterState.trainable``.
      frozen: ``AdapterState.frozen``.

    Returns:
      ``(trainable, frozen)`` with each MonteCLoRA ``a`` replaced by its draw
      ``Σ_n w_n (a + E_n)`` and its buffers by this draw's covariance and
      weights; other leaves unchanged. Pass them to ``materialize`` /
      ``factored.transform`` (training) and ``frozen`` to ``monteclora_loss``.

    Raises:
      ValueError: ``MonteCLoRAParams`` under an adapter that is not a
        ``monteclora``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=monteclora(2, num_samples=3))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> t, f = monteclora_sample(jax.random.key(1), a, *st)
      >>> bool(jnp.allclose(t["w"].a, st.trainable["w"].a, atol=1e-2)), f["w"].expert_weights.shape
      (True, (3,))
    """
    trainable, frozen = dict(trainable), dict(frozen)
    for p in _mc_paths(assignment, trainable, "monteclora_sample"):
        t = trainable[p]
        scaler = dict(assignment[p].hyperparameters)["sample_scaler"]
        lead = t.std_prior.shape[:-1]
        k = _lift.path_key(key, p)
        if not lead:
            a, g, w = _draw(k, t, scaler)
        else:
            nl = len(lead)
            flat = jax.tree.map(lambda x, nl=nl: x.reshape((-1,) + x.shape[nl:]), t)
            keys = jax.random.split(k, math.prod(lead))
            a, g, w = jax.vmap(functools.partial(_draw, scaler=scaler))(keys, flat)
            a, g, w = (x.reshape(lead + x.shape[1:]) for x in (a, g, w))
        trainable[p] = t._replace(a=a)
        frozen[p] = MonteCLoRABuffers(g, w)
    return trainable, frozen


def monteclora_loss(assignment: dict[str, _protocol.Adapter], trainable: dict[str, Any],
                    frozen: dict[str, Any]) -> jax.Array:
    """PEFT's MonteCLoRA variational loss, averaged over MonteCLoRA matrices.

    Per matrix: ``kl_loss_weight·(KL_dir(e^π) + KL_wishart(e^σ) +
    KL_mvn(gaussian_var)) + Σ w²`` (the entropy term with ``use_entropy``),
    with PEFT's formulas (``MontecloraSampler.get_variational_loss``; see the
    module docstring for the Dirichlet term's sign). ``frozen`` holds the
    buffers of the step's draw (``monteclora_sample``); each stacked layer
    counts as one matrix. Computed in float32 or wider.

    Args:
      assignment: ``{path: Adapter}``.
      trainable: ``AdapterState.trainable`` (the priors).
      frozen: the buffers (``monteclora_sample``'s, or the state's).

    Returns:
      A scalar (0.0 without MonteCLoRA leaves).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from peftjax import adapters, tree
      >>> params = {"w": jnp.ones((4, 3))}
      >>> a = tree.assign(params, [tree.Rule(where="w", then=monteclora(2, num_samples=3))])
      >>> st = adapters.init(a, jax.random.key(0), params)
      >>> monteclora_loss(a, *st).shape
      ()
    """
    total, count = jnp.zeros((), jnp.float32), 0
    for p in _mc_paths(assignment, trainable, "monteclora_loss"):
        hp = dict(assignment[p].hyperparameters)
        t, f = trainable[p], frozen[p]
        ct = _lowrank.compute_dtype(jnp.float32, t.a.dtype)
        r, n = t.std_prior.shape[-1], t.expert_weights_prior.shape[-1]
        a2 = jnp.exp(t.expert_weights_prior.astype(ct))
        a1 = jnp.full(a2.shape, hp["dirichlet_prior"], ct)
        lg, dg = jax.scipy.special.gammaln, jax.scipy.special.digamma
        kl_dir = (lg(a2.sum(-1)) - lg(a1.sum(-1)) + jnp.sum(lg(a2) - lg(a1), -1)
                  + jnp.sum((a2 - a1) * (dg(a2) - dg(a2.sum(-1, keepdims=True))), -1))
        var = jnp.exp(2 * t.std_prior.astype(ct))
        kl_wish = 0.5 * (-jnp.sum(jnp.log(var), -1) * r + jnp.sum(var, -1) * r - r**2)
        gv = jnp.maximum(jnp.diagonal(f.gaussian_var.astype(ct), axis1=-2, axis2=-1), 1e-6)
        kl_mvn = n * 0.5 * (jnp.sum(gv, -1) - jnp.sum(jnp.log(gv), -1) - r)
        per = hp["kl_loss_weight"] * (kl_dir + kl_wish + kl_mvn)
        if hp["use_entropy"]:
            per = per + jnp.sum(f.expert_weights.astype(ct) ** 2, -1)
        total = total + jnp.sum(per).astype(jnp.float32)
        count += math.prod(per.shape)
    return total / max(count, 1)
