# SPDX-License-Identifier: Apache-2.0
"""Poly and MHR: a per-task mixture of LoRA skills, as a model hook.

Combining Modular Skills in Multitask Learning. Ponti, Sordoni, Bengio &
Reddy, 2022. https://arxiv.org/abs/2202.13914
Multi-Head Adapter Routing for Cross-Task Generalization. Caccia, Ponti,
Su, Pereira, Le Roux & Sordoni, NeurIPS 2023. https://arxiv.org/abs/2211.03831

Polytropon (Poly) keeps, per adapted projection, an inventory of ``s``
LoRA skills ``(A_j, B_j)`` and a task-skill allocation matrix of logits
``Z (n_tasks, s)``. A task ``t`` uses the normalised mixture of its skills
(the paper's Eq. 4): ``A_t = Σ_j w_tj A_j``, ``B_t = Σ_j w_tj B_j`` with
``w_t = ẑ_t / Σ_j ẑ_tj``, where ``ẑ`` is a relaxed-Bernoulli (Gumbel-
sigmoid) sample of ``Z`` while training (Eq. 5) and ``sigmoid(Z)`` at
evaluation. MHR (Multi-Head Routing) splits the input and output dimensions
into ``n_splits`` blocks, each with its own skills and allocation logits
(``Z (n_tasks, n_splits·s)``); the block mixtures are concatenated.

Hugging Face PEFT's ``tuners/poly`` (followed here, also for its files):
``poly_lora_A (n_splits, s, in/n_splits, r)``, ``poly_lora_B (n_splits, s,
r, out/n_splits)``, ``poly_router.module_logits (n_tasks, n_splits·s)``, one
router per adapted module; the update is ``y += x A_t B_t / r`` (scaling
``1/r``, no alpha); ``w = ẑ / (Σ ẑ + 1e-12)``; the training sample is torch's
``RelaxedBernoulli(temperature=1, logits=Z).rsample()``, i.e.
``sigmoid(Z + log u - log(1-u))`` with ``u`` uniform clamped to ``[eps,
1-eps]`` (here drawn with a JAX key: the same distribution, not torch's
bits). Init (``init_weights=True``): each ``A`` block kaiming-uniform
(bound ``1/sqrt(in/n_splits)``), ``B = 0``, ``Z ~ U(-1e-3, 1e-3)``.

Poly's update depends on the example's task, so it is not a weight-space
adapter: ``PolyHook`` is a ``peftjax.models.Hooks`` (a pytree; ``task_ids``
is one of its arrays, so a jitted step does not retrace per task and
``llama.generate(..., hooks=)`` decodes with it). Per row it costs
``2·r·(in + out)`` FLOPs after the per-example mixture (``B·s·r·(in+out)``
per call), LoRA's cost at rank ``r``.

Exports: ``PolyParams``, ``PolyHook``, ``poly_init``, ``poly_weights``.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.adapters import _hook_sites, _hooks

_EPS = 1e-12


class PolyParams(NamedTuple):
    """Trainable Poly parameters, per site (``{site name: array}``, every layer).

    Attributes:
      lora_a: ``(L, n_splits, n_skills, in/n_splits, r)`` = PEFT ``poly_lora_A``
        per layer.
      lora_b: ``(L, n_splits, n_skills, r, out/n_splits)`` = ``poly_lora_B``.
      module_logits: ``(L, n_tasks, n_splits·n_skills)`` = each module's
        ``poly_router.module_logits``.
    """

    lora_a: dict[str, jax.Array]
    lora_b: dict[str, jax.Array]
    module_logits: dict[str, jax.Array]


def poly_init(
    key: jax.Array,
    params: Any,
    *,
    target_modules: Sequence[str] | str,
    r: int = 8,
    n_tasks: int = 1,
    n_skills: int = 4,
    n_splits: int = 1,
    init_weights: bool = True,
    dtype: Any = jnp.float32,
) -> PolyParams:
    """Poly/MHR parameters for the targeted projections of a model, PEFT's init.

    Args:
      key: PRNG key.
      params: the model's params (a Llama's or BERT's, unrolled or scanned).
      target_modules: projection names (``["q_proj", "v_proj"]``; BERT
        ``"dense"`` = ``attention/output``, ``intermediate``, ``output``) or
        a regex searched in the site names.
      r: the rank of each skill.
      n_tasks: rows of each router's logits (task ids are ``0..n_tasks-1``).
      n_skills: skills per projection.
      n_splits: MHR blocks (1 = Poly); must divide in and out.
      init_weights: ``B = 0`` (the identity at init) or kaiming-uniform.
      dtype: of the parameters.

    Returns:
      ``PolyParams``.

    Example:
      >>> from peftjax.models import Site
      >>> params = {"layers": [{"self_attn": {"q_proj": {"kernel": jnp.zeros((8, 4))}}}]}
      >>> pp = poly_init(jax.random.key(0), params, target_modules=["q_proj"],
      ...                r=2, n_tasks=3, n_skills=4, n_splits=2)
      >>> pp.lora_a["self_attn/q_proj"].shape  # (L, n_splits, n_skills, in/2, r)
      (1, 2, 4, 4, 2)
      >>> hook = PolyHook(pp, task_ids=jnp.array([0, 2]))
      >>> site = Site(jnp.int32(0), "self_attn/q_proj", jnp.arange(3))
      >>> hook.linear(site, jnp.ones((2, 3, 8)), jnp.zeros((2, 3, 4))).shape
      (2, 3, 4)
    """
    fn = "poly_init"
    for name, v in (("r", r), ("n_tasks", n_tasks), ("n_skills", n_skills),
                    ("n_splits", n_splits)):
        if int(v) <= 0:
            raise ValueError(f"{fn}: {name}={v} must be positive")
    n_layers, shapes = _hook_sites.site_shapes(params, fn)
    sites = _hook_sites.select(shapes, target_modules, fn)
    a, b, z = {}, {}, {}
    for i, (site, (n_in, n_out)) in enumerate(sorted(sites.items())):
        if n_in % n_splits or n_out % n_splits:
            raise ValueError(f"{fn}: n_splits={n_splits} does not divide {site}'s "
                             f"in={n_in} and out={n_out}")
        ka, kb, kz = jax.random.split(jax.random.fold_in(key, i), 3)
        di, do = n_in // n_splits, n_out // n_splits
        shape_a = (n_layers, n_splits, n_skills, di, r)
        a[site] = jax.random.uniform(ka, shape_a, dtype, -1.0, 1.0) / jnp.sqrt(di)
        shape_b = (n_layers, n_splits, n_skills, r, do)
        b[site] = (jnp.zeros(shape_b, dtype) if init_weights else
                   jax.random.uniform(kb, shape_b, dtype, -1.0, 1.0) / jnp.sqrt(r))
        z[site] = jax.random.uniform(kz, (n_layers, n_tasks, n_splits * n_skills),
                                     dtype, -1e-3, 1e-3)
    return PolyParams(a, b, z)


def poly_weights(module_logits: jax.Array, task_ids: jax.Array, n_splits: int,
                 key: jax.Array | None = None) -> jax.Array:
    """PEFT's ``PolyRouter``: mixing weights ``(B, n_splits, n_skills)``.

    Args:
      module_logits: ``(n_tasks, n_splits·n_skills)``.
      task_ids: int ``(B,)``.
      n_splits: MHR blocks.
      key: a PRNG key for the training-mode relaxed-Bernoulli sample
        (temperature 1); ``None`` for PEFT's evaluation (``sigmoid``).

    Returns:
      ``ẑ / (Σ_skills ẑ + 1e-12)``.

    Example:
      >>> w = poly_weights(jnp.zeros((2, 4)), jnp.array([1]), 2)
      >>> w.shape, float(w[0, 0, 0])
      ((1, 2, 2), 0.5)
    """
    z = module_logits[task_ids]
    z = z.reshape(z.shape[0], n_splits, -1)
    if key is None:
        p = jax.nn.sigmoid(z)
    else:
        eps = jnp.finfo(z.dtype).eps
        u = jnp.clip(jax.random.uniform(key, z.shape, z.dtype), eps, 1 - eps)
        p = jnp.clip(jax.nn.sigmoid(z + jnp.log(u) - jnp.log1p(-u)), eps, 1 - eps)
    return p / (p.sum(-1, keepdims=True) + _EPS)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["params", "task_ids", "key"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PolyHook(_hooks.Hooks):
    """Poly/MHR as a ``peftjax.models.Hooks``: each example's task mixture.

    Attributes:
      params: ``PolyParams``.
      task_ids: int ``(B,)``, each example's task (traced: no retrace per task).
      key: ``None`` (PEFT's eval routing, ``sigmoid``) or a PRNG key (PEFT's
        training routing, a relaxed-Bernoulli sample per layer and module).
    """

    params: PolyParams
    task_ids: jax.Array
    key: jax.Array | None = None

    def attention(self, site: Any, q: jax.Array, attn: Any) -> None:
        """No extra attention (Poly adapts projections only)."""
        del site, q, attn

    def linear(self, site: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y + x A_t B_t / r`` at the adapted sites (``site``: a ``Site``)."""
        if site.name not in self.params.lora_a:
            return y
        a = self.params.lora_a[site.name][site.layer]  # (q, s, d, r)
        b = self.params.lora_b[site.name][site.layer]  # (q, s, r, o)
        q, _, _, r = a.shape
        key = None
        if self.key is not None:
            idx = sorted(self.params.lora_a).index(site.name)
            key = jax.random.fold_in(jax.random.fold_in(self.key, site.layer), idx)
        w = poly_weights(self.params.module_logits[site.name][site.layer],
                         self.task_ids, q, key).astype(a.dtype)
        am = jnp.einsum("bqs,qsdr->bqdr", w, a).reshape(w.shape[0], -1, r)
        bm = jnp.einsum("bqs,qsro->brqo", w, b).reshape(w.shape[0], r, -1)
        h = jnp.einsum("bti,bir->btr", x.astype(am.dtype), am)
        delta = jnp.einsum("btr,bro->bto", h, bm) / r
        return (y + delta.astype(y.dtype)).astype(y.dtype)


def check_task_ids(params: PolyParams, task_ids: Any, batch: int) -> None:
    """``ValueError`` for task ids out of ``[0, n_tasks)`` or of the wrong shape
    (concrete ids only; PEFT raises the same)."""
    n_tasks = next(iter(params.module_logits.values())).shape[1]
    t = jnp.asarray(task_ids)
    if t.shape != (batch,):
        raise ValueError(f"PolyHook: task_ids shape {t.shape}; expected ({batch},)")
    if int(t.max()) >= n_tasks or int(t.min()) < 0:
        raise ValueError(f"PolyHook: task ids {t.tolist()} outside [0, {n_tasks})")


