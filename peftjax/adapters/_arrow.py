# SPDX-License-Identifier: Apache-2.0
"""Arrow (+ GenKnowSub): per-token routing over a library of LoRAs, as a model hook.

Towards Modular LLMs by Building and Reusing a Library of LoRAs. Ostapenko,
Su, Ponti, Charlin, Le Roux, Pereira, Caccia & Sordoni, ICML 2024.
https://arxiv.org/abs/2405.11157
GenKnowSub: Improving Modularity and Reusability of LLMs through General
Knowledge Subtraction. Bagherifard et al., ACL 2025 (short).
https://aclanthology.org/2025.acl-short.54/

Arrow (the paper's Sec. 4.2, Eq. 4-5) routes zero-shot: each expert LoRA
``e`` of a module gets a prototype ``v_e``, the top right singular vector
of its ``ΔW_e = B_e A_e`` (torch layout; a vector of the input space); a
token ``x`` scores each expert by ``|⟨x, v_e⟩|`` (the absolute value makes
the sign of the singular vector irrelevant), keeps the top ``k`` and
mixes them with ``softmax(score / T)``: ``y += Σ_e c_e s_e B_e A_e x``
(``s_e`` the expert's ``alpha/r``). GenKnowSub first subtracts the mean of
general-knowledge LoRAs from each task LoRA, factor by factor:
``A_e ← A_e - mean_g A_g``, ``B_e ← B_e - mean_g B_g`` (PEFT's
``gen_know_sub``; the prototypes are computed after it).

Hugging Face PEFT's ``tuners/lora/arrow.py`` (followed here): the score is
the raw ``|x·v_e|`` (not a cosine: ``x`` is not normalised), top-k then
softmax over the kept scores with temperature ``router_temperature``; the
experts must share rank and targets. PEFT finds ``v_e`` by 15 power
iterations on ``Aᵀ(BᵀB)A`` (``v ← w/(‖w‖+1e-8)``) from ``torch.randn(in)``
drawn from a generator seeded with ``rng_seed``; 15 iterations do not
always converge (on perturbed rank-2 LoRAs the tests see prototypes off by
0.4 in cosine), so with ``rng_seed`` set this module runs the same
iterations from the same start vector (torch's CPU ``randn``, reproduced in
NumPy: its Mersenne twister, 24-bit uniforms and 16-wide Box-Muller; for
``in >= 16``). With ``rng_seed=None`` PEFT's start is random and here
the prototype is the exact top singular vector (what the paper defines:
QR of ``A`` then an ``r × out`` SVD, no ``(in, out)`` temporary).

Per row: ``2·E·in`` FLOPs for the scores plus ``2·E·r·(in+out)`` for the
experts (all ``E`` experts are evaluated, as PEFT; top-k zeroes the others'
coefficients).

Exports: ``ArrowConfig``, ``ArrowExperts``, ``ArrowHook``, ``arrow_experts``,
``arrow_prototype``, ``torch_randn``.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.adapters import _hooks


class ArrowConfig(NamedTuple):
    """PEFT's ``ArrowConfig`` (``top_k``, ``router_temperature``, ``use_gks``,
    ``rng_seed``: PEFT's power-iteration start; ``None``: exact prototypes)."""

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    rng_seed: int | None = None


def torch_randn(n: int, seed: int) -> np.ndarray:
    """``torch.randn(n, generator=torch.Generator().manual_seed(seed))`` on CPU
    (float32, ``n >= 16``), in NumPy.

    Example:
      >>> [round(float(v), 4) for v in torch_randn(16, 0)[:3]]
      [-1.1258, -1.1524, -0.2506]
    """
    if n < 16:
        raise ValueError(f"torch_randn: n={n}; torch's scalar path (n < 16) is not "
                         "reproduced")
    rs = np.random.RandomState(seed)  # MT19937 seeded as torch's CPU generator
    raw = rs.randint(0, 2**32, size=n + (16 if n % 16 else 0), dtype=np.uint32)
    u = ((raw & ((1 << 24) - 1)).astype(np.float64) / (1 << 24)).astype(np.float32)

    def fill16(d):
        u1, u2 = 1.0 - d[:8].astype(np.float64), d[8:16].astype(np.float64)
        rad, th = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
        d[:8], d[8:16] = rad * np.cos(th), rad * np.sin(th)

    data = u[:n].copy()
    for i in range(0, n - 15, 16):
        fill16(data[i:i + 16])
    if n % 16:
        tail = u[n:].copy()
        fill16(tail)
        data[n - 16:] = tail
    return data


def _power_prototype(a: jax.Array, b: jax.Array, seed: int, iters: int = 15,
                     eps: float = 1e-8) -> jax.Array:
    """PEFT's ``top_right_singular_vec_from_BA`` (float32)."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    c = jnp.einsum("...ro,...so->...rs", b32, b32)  # Bᵀ B in torch's layout
    v = jnp.broadcast_to(jnp.asarray(torch_randn(a.shape[-2], seed)), a.shape[:-1])
    v = v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + eps)
    for _ in range(iters):
        w = jnp.einsum("...ir,...r->...i", a32, jnp.einsum(
            "...rs,...s->...r", c, jnp.einsum("...ir,...i->...r", a32, v)))
        v = w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + eps)
    return v.astype(a.dtype)


class ArrowExperts(NamedTuple):
    """The (GenKnowSub-subtracted) task LoRAs and their prototypes, per site.

    Attributes:
      lora_a: ``{site: (L, E, in, r)}``.
      lora_b: ``{site: (L, E, r, out)}``.
      scaling: ``{site: (E,)}`` each expert's ``alpha/r``.
      prototypes: ``{site: (L, E, in)}`` unit top right singular vectors of
        ``B_e A_e`` (torch layout).
    """

    lora_a: dict[str, jax.Array]
    lora_b: dict[str, jax.Array]
    scaling: dict[str, jax.Array]
    prototypes: dict[str, jax.Array]


def arrow_prototype(a: jax.Array, b: jax.Array) -> jax.Array:
    """The unit top right singular vector of torch's ``ΔW = B A`` (``(in,)``).

    Args:
      a: ``(..., in, r)`` (Flax layout: ``ΔW_flax = a @ b``).
      b: ``(..., r, out)``.

    Returns:
      ``(..., in)`` (sign: its largest-magnitude entry positive).

    Example:
      >>> a = jnp.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
      >>> arrow_prototype(a, jnp.eye(2)).tolist()
      [1.0, 0.0, 0.0]
    """
    q, r = jnp.linalg.qr(a.astype(jnp.float32))  # a = q r, q (in, r)
    u, _, _ = jnp.linalg.svd(r @ b.astype(jnp.float32), full_matrices=False)
    v = jnp.einsum("...ir,...r->...i", q, u[..., :, 0])
    i = jnp.argmax(jnp.abs(v), axis=-1, keepdims=True)
    sign = jnp.sign(jnp.take_along_axis(v, i, axis=-1))
    return (v * sign).astype(a.dtype)


def arrow_experts(task: Sequence[tuple[dict, dict, dict]],
                  general: Sequence[tuple[dict, dict, dict]] = (),
                  config: ArrowConfig | None = None) -> ArrowExperts:
    """Stacks task LoRAs (GenKnowSub when ``config.use_gks``) and computes prototypes.

    Args:
      task: per task LoRA ``(lora_a {site: (L, in, r)}, lora_b {site: (L, r,
        out)}, scaling {site: float})``.
      general: the general LoRAs, same form (GenKnowSub's).
      config: ``ArrowConfig`` (default ``ArrowConfig()``).

    Returns:
      ``ArrowExperts``.

    Raises:
      ValueError: LoRAs with different sites or shapes (PEFT refuses them
        too), or ``use_gks`` without general LoRAs.

    Example:
      >>> a = {"mlp/up_proj": jnp.ones((1, 4, 2))}
      >>> b = {"mlp/up_proj": jnp.ones((1, 2, 3))}
      >>> ex = arrow_experts([(a, b, {"mlp/up_proj": 2.0})] * 2)
      >>> ex.prototypes["mlp/up_proj"].shape
      (1, 2, 4)
    """
    fn = "arrow_experts"
    config = ArrowConfig() if config is None else config
    if not task:
        raise ValueError(f"{fn}: no task LoRAs")
    if config.top_k <= 0 or config.router_temperature <= 0:
        raise ValueError(f"{fn}: top_k={config.top_k} and router_temperature="
                         f"{config.router_temperature} must be positive")
    if config.use_gks and not general:
        raise ValueError(f"{fn}: use_gks=True needs general LoRAs")
    sites = sorted(task[0][0])
    for i, (a, b, _) in enumerate(list(task) + list(general)):
        if sorted(a) != sites:
            raise ValueError(f"{fn}: LoRA {i} adapts {sorted(a)}, the first {sites}")
        for s in sites:
            if a[s].shape != task[0][0][s].shape or b[s].shape != task[0][1][s].shape:
                raise ValueError(f"{fn}: LoRA {i} at {s}: shapes {a[s].shape}, "
                                 f"{b[s].shape} differ from the first's")
    la, lb, sc, pr = {}, {}, {}, {}
    for s in sites:
        a = jnp.stack([t[0][s] for t in task], axis=1)  # (L, E, in, r)
        b = jnp.stack([t[1][s] for t in task], axis=1)
        if config.use_gks:
            a = a - jnp.mean(jnp.stack([g[0][s] for g in general]), axis=0)[:, None]
            b = b - jnp.mean(jnp.stack([g[1][s] for g in general]), axis=0)[:, None]
        la[s], lb[s] = a, b
        sc[s] = jnp.asarray([float(t[2][s]) for t in task], a.dtype)
        pr[s] = (arrow_prototype(a, b) if config.rng_seed is None
                 else _power_prototype(a, b, config.rng_seed))
    return ArrowExperts(la, lb, sc, pr)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["experts"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class ArrowHook(_hooks.Hooks):
    """Arrow's per-token routing as a ``peftjax.models.Hooks``.

    Attributes:
      experts: ``ArrowExperts``.
      config: ``ArrowConfig`` (static).
    """

    experts: ArrowExperts
    config: ArrowConfig = ArrowConfig()

    def attention(self, site: Any, q: jax.Array, attn: Any) -> None:
        """No extra attention."""
        del site, q, attn

    def linear(self, site: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y + Σ_e c_e(x) s_e B_e A_e x`` at the routed sites."""
        if site.name not in self.experts.lora_a:
            return y
        a = self.experts.lora_a[site.name][site.layer]  # (E, in, r)
        b = self.experts.lora_b[site.name][site.layer]  # (E, r, out)
        p = self.experts.prototypes[site.name][site.layer]  # (E, in)
        x = x.astype(a.dtype)
        sim = jnp.abs(jnp.einsum("bti,ei->bte", x, p))
        k = min(self.config.top_k, p.shape[0])
        top, _ = jax.lax.top_k(sim, k)
        keep = sim >= top[..., -1:]
        score = jnp.where(keep, sim, -jnp.inf) / self.config.router_temperature
        coeff = jax.nn.softmax(score, axis=-1)
        coeff = coeff * self.experts.scaling[site.name].astype(a.dtype)[None, None, :]
        h = jnp.einsum("bti,eir->bter", x, a) * coeff[..., None]
        delta = jnp.einsum("bter,ero->bto", h, b)
        return y + delta.astype(y.dtype)
