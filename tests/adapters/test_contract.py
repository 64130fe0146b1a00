"""The adapter contract suite (docs/architecture.md#tests): every adapter passes it.

ADAPTERS is the single list of adapters; every later adapter joins it.

Time: an adapter run eagerly compiles each of its primitives once per new
shape, which for a rotation or a spectral adapter is hundreds of small
programs; so the suite runs ``init``/``apply``/``fold`` under ``jax.jit``
(one program per shape) everywhere except where eager execution is the
point (``test_jit_equals_eager_and_stacked_equals_loop``'s one eager call).
"""

import functools
import math

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import optax
import pytest

from peftjax import adapters, inits, tree
from tests import helpers as h
from tests.adapters.test_adamss import ref_adamss
from tests.adapters.test_bdlora import ref_bdlora
from tests.adapters.test_beft import ref_beft
from tests.adapters.test_boft import ref_boft
from tests.adapters.test_c3a import ref_c3a
from tests.adapters.test_clover import ref_clover
from tests.adapters.test_deft import ref_deft
from tests.adapters.test_delora import ref_delora
from tests.adapters.test_dsee import ref_dsee
from tests.adapters.test_dylora import ref_dylora
from tests.adapters.test_flora import ref_flora
from tests.adapters.test_fourierft import ref_fourierft
from tests.adapters.test_frod import ref_frod
from tests.adapters.test_glora import ref_glora
from tests.adapters.test_gralora import ref_gralora
from tests.adapters.test_hira import ref_hira
from tests.adapters.test_hra import ref_hra
from tests.adapters.test_increlora import ref_increlora
from tests.adapters.test_intrinsic_dim import ref_intrinsic, ref_said
from tests.adapters.test_kasa import ref_kasa
from tests.adapters.test_l4q import ref_l4q
from tests.adapters.test_lamda import ref_lamda
from tests.adapters.test_lokr import lokr_count, ref_lokr
from tests.adapters.test_loldu import ref_loldu
from tests.adapters.test_lora_b_only import ref_lora_b_only
from tests.adapters.test_miss import ref_miss
from tests.adapters.test_mora import ref_mora
from tests.adapters.test_mos import ref_mos
from tests.adapters.test_oft import oft_count, ref_oft
from tests.adapters.test_osf import ref_osf
from tests.adapters.test_peanut import ref_peanut
from tests.adapters.test_psoft import ref_psoft
from tests.adapters.test_pvera import ref_pvera
from tests.adapters.test_qalora import ref_qalora
from tests.adapters.test_randlora import randlora_count, ref_randlora
from tests.adapters.test_road import ref_road
from tests.adapters.test_salt import ref_salt
from tests.adapters.test_shira import ref_shira
from tests.adapters.test_sltrain import ref_sltrain
from tests.adapters.test_spp import ref_spp
from tests.adapters.test_supertuning import ref_supertuning
from tests.adapters.test_svft import ref_svft
from tests.adapters.test_tinylora import ref_tinylora
from tests.adapters.test_trainable_tokens import CONTRACT_INDICES, ref_trainable_tokens
from tests.adapters.test_unilora import ref_unilora
from tests.adapters.test_vblora import ref_vblora, vblora_count
from tests.adapters.test_vectorfit import ref_vectorfit
from tests.adapters.test_waveft import ref_waveft

S = adapters.scaling_value


# (name, factory, identity_at_init, reference(w, t, f) in float64,
#  trainable-count formula (n_in, n_out) -> int)
ADAPTERS = [
    (
        "lora",
        lambda: adapters.lora(rank=3, alpha=6.0),
        True,
        lambda w, t, f: h.ref_lora(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o),
    ),
    (
        "rslora",
        lambda: adapters.lora(rank=4, alpha=6.0,
                              scaling=adapters.Scaling.ALPHA_OVER_SQRT_RANK),
        True,
        lambda w, t, f: h.ref_lora(w, t, f, s=3.0),
        lambda i, o: 4 * (i + o),
    ),
    (
        "lora_gaussian",
        lambda: adapters.lora(rank=2, alpha=2.0, init=adapters.LoRAInit.GAUSSIAN),
        True,
        lambda w, t, f: h.ref_lora(w, t, f, s=1.0),
        lambda i, o: 2 * (i + o),
    ),
    (
        "dora",
        lambda: adapters.dora(rank=2, alpha=4.0),
        True,
        lambda w, t, f: h.ref_dora(w, t, f, s=2.0),
        lambda i, o: 2 * (i + o) + o,
    ),
    (
        "lora_xs",
        lambda: adapters.lora_xs(rank=3, core_init_std=0.0),
        True,
        lambda w, t, f: h.ref_lora_xs(w, t, f, s=1.0),
        lambda i, o: 9,
    ),
    (
        "ia3_output",
        lambda: adapters.ia3(adapters.Side.OUTPUT),
        True,
        h.ref_scale_out,
        lambda i, o: o,
    ),
    (
        "ia3_input",
        lambda: adapters.ia3(adapters.Side.INPUT),
        True,
        h.ref_scale_in,
        lambda i, o: i,
    ),
    (
        "ssf",
        lambda: adapters.ssf(zero_init=True),
        True,
        h.ref_scale_out,
        lambda i, o: 2 * o,
    ),
    (
        "vera",
        lambda: adapters.vera(3, max_in=8, max_out=8),
        True,
        h.ref_vera,
        lambda i, o: 3 + o,
    ),
    (
        "adalora",
        lambda: adapters.adalora(3, alpha=6.0),
        True,
        lambda w, t, f: h.ref_adalora(w, t, f, s=6.0 / (3 + 1e-5)),
        lambda i, o: 3 * (i + o + 1),
    ),
    (
        "sparse_delta",
        lambda: adapters.sparse_delta(0.3),
        True,
        lambda w, t, f: (h.f64(w).reshape(-1) + np.bincount(
            np.asarray(f.indices), h.f64(t.values), minlength=w.size)).reshape(w.shape),
        lambda i, o: int(0.3 * i * o),
    ),
    (
        "svfit",
        lambda: adapters.svfit(rank=3),
        True,
        h.ref_svfit,
        lambda i, o: 3,
    ),
    (
        "nola",
        lambda: adapters.nola(rank=2, num_basis_a=5, num_basis_b=4, alpha=4.0),
        True,
        lambda w, t, f: h.ref_nola(w, t, f, s=2.0),
        lambda i, o: 5 + 4,
    ),
    (
        "abba",
        lambda: adapters.abba(2, 3, alpha=2.0),
        True,
        lambda w, t, f: h.ref_abba(w, t, f, s=2.0),
        lambda i, o: (2 + 3) * (i + o),
    ),
    (
        "loha",
        lambda: adapters.loha(3, alpha=6.0),
        True,
        lambda w, t, f: h.ref_loha(w, t, f, s=2.0),
        lambda i, o: 2 * 3 * (i + o),
    ),
    (
        "lokr",
        lambda: adapters.lokr(rank=1, alpha=2.0, decompose_both=True),
        True,
        lambda w, t, f: ref_lokr(w, t, f, s=2.0),
        lambda i, o: lokr_count(i, o, 1, decompose_both=True),
    ),
    (
        "sora",
        lambda: adapters.sora(rank=3, alpha=6.0),
        True,
        lambda w, t, f: h.ref_sora(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o + 1),
    ),
    (
        "fourierft",
        lambda: adapters.fourierft(7, scaling=3.0, random_loc_seed=5, init_weights=True),
        True,
        lambda w, t, f: ref_fourierft(w, t, f, s=3.0),
        lambda i, o: 7,
    ),
    (
        "c3a",  # block_size=1: the only block dividing every shape used here
        lambda: adapters.c3a(1, init_weights=True),
        True,
        ref_c3a,
        lambda i, o: i * o,
    ),
    (
        "waveft",
        lambda: adapters.waveft(7, scaling=3.0, wavelet_family="db2", random_loc_seed=5),
        True,
        lambda w, t, f: ref_waveft(w, t, f, s=3.0, family="db2"),
        lambda i, o: 7,
    ),
    (
        # in, out = 6, 5 (and 5, 4): only a 1 x 1 grid divides them; the k x k block
        # grid (k = 2, 3) is covered in test_gralora.py. hybrid_r exercises the LoRA pair.
        "gralora",
        lambda: adapters.gralora(2, alpha=6.0, gralora_k=1, hybrid_r=1),
        True,
        lambda w, t, f: ref_gralora(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o),
    ),
    (
        "miss",
        lambda: adapters.miss(2),
        True,
        ref_miss,
        lambda i, o: 2 * o,
    ),
    (
        "hira",
        lambda: adapters.hira(3, factored_matmuls=True),
        True,
        ref_hira,
        lambda i, o: 3 * (i + o),
    ),
    (
        "hra",
        lambda: adapters.hra(3),
        False,
        ref_hra,
        lambda i, o: 3 * i,
    ),
    (
        "mica",  # inits.mica's adapter: a trains, b frozen (PEFT's MiCA variant)
        lambda: inits.mica(3, alpha=6.0).adapter,
        True,
        lambda w, t, f: h.f64(w) + 2.0 * h.f64(t.a) @ h.f64(f.b),
        lambda i, o: 3 * i,
    ),
    (
        "deft",  # relu projector, no alpha: the identity init is exact
        lambda: adapters.deft(3),
        True,
        ref_deft,
        lambda i, o: 3 * (i + o),
    ),
    (
        "psoft",  # strict Cayley R with both scales; alpha = r: scaling 1
        lambda: adapters.psoft(3, alpha=3.0),
        True,
        ref_psoft,
        lambda i, o: 3 + 2 * 3,
    ),
    (
        "adamss",  # SVD rank 3, two k-means groups of the outputs, rank 1 each
        lambda: adapters.adamss(3, num_subspaces=2),
        True,
        ref_adamss,
        lambda i, o: 2 * 3 + o,
    ),
    (
        "peanut",
        lambda: adapters.peanut(2, depth=1, scaling=0.5),
        True,
        lambda w, t, f: ref_peanut(w, t, f, s=0.5),
        lambda i, o: 2 * 2 * o + 2 * 2 * 2,
    ),
    (
        "delora",
        lambda: adapters.delora(2, delora_lambda=3.0),
        True,
        lambda w, t, f: ref_delora(w, t, f, r=2),
        lambda i, o: 2 * (i + o) + 1,
    ),
    (
        "oft",  # r=1: one block of size in (divides every shape used here)
        lambda: adapters.oft(r=1),
        True,
        ref_oft,
        lambda i, o: oft_count(i, i),
    ),
    (
        "boft",  # block_num=1: one block of size in, one factor (fits every shape here)
        lambda: adapters.boft(block_num=1),
        True,
        ref_boft,
        lambda i, o: i * i + o,
    ),
    (
        "road",  # output widths made even for it (see _o): groups of 2, road_4
        lambda: adapters.road("road_4", group_size=2),
        True,
        lambda w, t, f: ref_road(w, t, f, "road_4", 2),
        lambda i, o: 4 * o,  # theta and alpha, 2·out each
    ),
    (
        "osf",
        lambda: adapters.osf(2),
        True,
        ref_osf,
        lambda i, o: (min(i, o) - 2) * (i + o + 1),
    ),
    (
        # PEFT's default lora A/B and lora C, vector D/E: C, D, E act on the bias.
        "glora",
        lambda: adapters.glora(2, config_D_E="vector"),
        True,
        ref_glora,
        lambda i, o: 2 * 2 * (i + o) + 2 * (i + 1) + 2 * o,
    ),
    (
        # One leaf's own basis (unshare); W' = W up to rounding at init, not exactly.
        "frod",
        lambda: adapters.unshare(adapters.frod(0.2)),
        False,
        ref_frod,
        lambda i, o: i + adapters.frod_nnz(i, 0.2),
    ),
    (
        "beft",
        lambda: adapters.beft(),
        True,
        ref_beft,
        lambda i, o: o,
    ),
    (
        "tinylora",
        lambda: adapters.tinylora(r=2, u=3),
        True,
        ref_tinylora,
        lambda i, o: 3,
    ),
    (
        "shira",
        lambda: adapters.shira(1, random_seed=4),
        True,
        ref_shira,
        lambda i, o: i + o,
    ),
    (
        "supertuning",
        lambda: adapters.supertuning(0.5, r=2, lora_alpha=3.0),
        True,
        lambda w, t, f: ref_supertuning(w, t, f, s=1.5),
        lambda i, o: int(i * o * 0.5) + 2 * (i + o),
    ),
    (
        "randlora",
        lambda: adapters.unshare(adapters.randlora(2, max_in=8, max_out=8, alpha=6.0)),
        True,
        lambda w, t, f: ref_randlora(w, t, f, s=3.0),
        lambda i, o: randlora_count(i, o, 2),
    ),
    (
        "pvera",
        lambda: adapters.unshare(adapters.pvera(3, max_in=8, max_out=8)),
        True,
        ref_pvera,
        lambda i, o: 2 * 3 + o,
    ),
    (
        "ln_tuning",
        lambda: adapters.ln_tuning(),
        True,
        lambda w, t, f: h.f64(t.value),
        lambda i, o: i * o,
    ),
    (
        "trainable_tokens",
        lambda: adapters.trainable_tokens(CONTRACT_INDICES),
        True,
        ref_trainable_tokens,
        lambda i, o: len(CONTRACT_INDICES) * o,
    ),
    (
        # Shared bank (adapters.Shared) made private per leaf by unshare; in, out = 6, 5
        # admit only vector_length 1 (test_vblora.py covers longer vectors and sharing).
        "vblora",
        lambda: adapters.unshare(adapters.vblora(2, num_vectors=5, vector_length=1)),
        False,
        ref_vblora,
        lambda i, o: vblora_count(i, o, rank=2, num_vectors=5, vector_length=1),
    ),
    (
        "unilora",
        lambda: adapters.unshare(adapters.unilora(2, theta_d_length=7)),
        False,
        ref_unilora,
        lambda i, o: 7,
    ),
    (
        # one shared θ_d (adapters.Shared) made private per leaf by unshare;
        # test_intrinsic_dim.py covers sharing, sparse draws and the chunking
        "intrinsic_dim",
        lambda: adapters.unshare(adapters.intrinsic_dim(4)),
        True,
        ref_intrinsic,
        lambda i, o: 4,
    ),
    (
        "said",
        lambda: adapters.unshare(adapters.said(4)),
        True,
        ref_said,
        lambda i, o: 4 + 1,
    ),
    (
        # one shard per vector: the suite's widths (6, 5, 4) share no divisor > 1
        # (test_mos.py covers real shards and pools shared over layers)
        "mos",
        lambda: adapters.unshare(adapters.mos(2, pool_rank=2, private_rank=1,
                                              num_shards=1, public_shards=2, alpha=4.0)),
        True,
        lambda w, t, f: ref_mos(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o),
    ),
    (
        # group_size 1: the suite's widths (6, 5, 4) have no common divisor > 1
        # (test_qalora.py covers real groups); PEFT's factor L = in remains.
        "qalora",
        lambda: adapters.qalora(3, group_size=1, alpha=6.0),
        True,
        lambda w, t, f: ref_qalora(w, t, f, s=2.0, g=1),
        lambda i, o: 3 * (i + o),
    ),
    (
        # one block: the suite's widths (6, 5, 4) share no divisor > 1
        # (test_bdlora.py covers real blocks on both sides)
        "bdlora",
        lambda: adapters.bdlora(2, nblocks=1, block_diagonal="a", alpha=4.0),
        True,
        lambda w, t, f: ref_bdlora(w, t, f, s=2.0, side="a"),
        lambda i, o: 2 * (i + o),
    ),
    (
        # evaluation form (LoRA on the posterior mean); test_monteclora.py checks draws
        "monteclora",
        lambda: adapters.monteclora(3, num_samples=2, alpha=6.0),
        True,
        lambda w, t, f: h.ref_lora(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o) + 3 + 2,
    ),
    (
        # banded support, one off-diagonal (gather/scatter M); the authors' kaiming values
        # and gate 1/2: not the identity (test_svft.py covers every pattern)
        "svft",
        lambda: adapters.svft("banded", off_diag=1),
        False,
        ref_svft,
        lambda i, o: adapters.svft_count(min(i, o), 1) + 1,
    ),
    (
        "loldu",
        lambda: adapters.loldu(3, alpha=2.0),
        True,
        lambda w, t, f: ref_loldu(w, t, f, alpha=2.0),
        lambda i, o: 3,
    ),
    (
        # with the bias vector (the suite's kernels have a bias sibling)
        "vectorfit",
        lambda: adapters.vectorfit(train_bias=True),
        True,
        ref_vectorfit,
        lambda i, o: min(i, o) + o,
    ),
    (
        # type 6 (RoPE blocks): r̂ = 2 on the suite's widths; test_mora.py covers 1-6
        "mora",
        lambda: adapters.mora(1, mora_type=6),
        True,
        lambda w, t, f: ref_mora(w, t, f, mora_type=6),
        lambda i, o: adapters.mora_rank(i, o, 1, 6) ** 2,
    ),
    (
        "lamda",  # spectral init (S = 0); PMA frozen, S and PMB trainable
        lambda: adapters.lamda(2, alpha=4.0),
        True,
        lambda w, t, f: ref_lamda(w, t, f, s=2.0),
        lambda i, o: 2 * 2 + 2 * o,
    ),
    (
        # a matrix leaf has two modes; test_flora.py covers conv and head-split kernels
        "flora",
        lambda: adapters.flora(2, scale=2.0),
        True,
        lambda w, t, f: ref_flora(w, t, f, s=2.0),
        lambda i, o: 2 * 2 + 2 * (i + o),
    ),
    (
        # at its init rank b = r_max (test_dylora.py covers b < r_max and frozen=True)
        "dylora",
        lambda: adapters.dylora(3, alpha=6.0),
        True,
        lambda w, t, f: ref_dylora(w, t, f, alpha=6.0),
        lambda i, o: 3 * (i + o),
    ),
    (
        # not exactly the identity at init: the reserve component adds ~1e-8 (as the
        # authors' advance learning); test_increlora.py covers growth
        "increlora",
        lambda: adapters.increlora(3, alpha=6.0),
        False,
        lambda w, t, f: ref_increlora(w, t, f, alpha=6.0),
        lambda i, o: 3 * (i + o + 1),
    ),
    (
        "lora_b_only",
        lambda: adapters.lora_b_only(3, alpha=6.0),
        True,
        lambda w, t, f: ref_lora_b_only(w, t, f, s=2.0),
        lambda i, o: 3 * o,
    ),
    (
        # not the identity at init: the base loses its 3 smallest singular components
        "kasa",
        lambda: adapters.kasa(3, alpha=6.0),
        False,
        lambda w, t, f: ref_kasa(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o) + 3,
    ),
    (
        "salt",
        lambda: adapters.salt(2, lora_rank=2),
        True,
        ref_salt,
        lambda i, o: 2 * 2 + 2 * (min(i, o) - 2) * 2,
    ),
    (
        # the base at init up to rounding (W_h rebuilt from its SVD)
        "clover",
        lambda: adapters.clover(2),
        True,
        ref_clover,
        lambda i, o: o * 2,
    ),
    (
        # per-channel steps (block_size=None: the suite's widths share no block);
        # Q(W0) at init, not the identity (test_l4q.py covers blocks and offsets)
        "l4q",
        lambda: adapters.l4q(3, bits=4, block_size=None, alpha=6.0),
        False,
        lambda w, t, f: ref_l4q(w, t, f, s=2.0),
        lambda i, o: 3 * (i + o) + o,
    ),
    (
        "sltrain",
        lambda: adapters.sltrain(2, alpha=4.0, density=0.3),
        True,
        lambda w, t, f: ref_sltrain(w, t, f, s=2.0),
        lambda i, o: 2 * (i + o) + int(0.3 * i * o),
    ),
    (
        # magnitude support (no SVD at init: time); test_dsee.py checks the residual rule
        "dsee",
        lambda: adapters.dsee(2, alpha=4.0, num_sparse=3, support="magnitude"),
        True,
        lambda w, t, f: ref_dsee(w, t, f, s=2.0),
        lambda i, o: 2 * (i + o) + 3,
    ),
    (
        "roselora",
        lambda: adapters.roselora(2, alpha=4.0),
        True,
        lambda w, t, f: h.ref_lora(w, t, f, s=2.0),
        lambda i, o: 2 * (i + o),
    ),
    (
        # rank 1: the suite's widths (5, 4, 8) share no divisor > 1 (test_spp.py: r = 2, 4)
        "spp",
        lambda: adapters.spp(1),
        True,
        ref_spp,
        lambda i, o: i + o,
    ),
]
IDS = [a[0] for a in ADAPTERS]
# Adapters that pair output features (RoAd rotates pairs, CLOVER's heads of 2):
# the suite's odd output width 5 becomes 6 for them.
_EVEN_OUT = ("road", "clover")


def _o(name, n_out=5):
    """The output width the suite uses for adapter ``name``."""
    return n_out + 1 if name in _EVEN_OUT and n_out % 2 else n_out


def _w(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 0.5, dtype)


def _randomize(t, seed=1):
    """Random trainable values of the same shapes (positive magnitudes/scales)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(t)
    out = [
        jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if x.ndim == 1
                    else rng.standard_normal(x.shape) * 0.3, x.dtype)
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, out)


def _jit_init(ad):
    return jax.jit(ad.init)


def _jit_apply(ad):
    return jax.jit(ad.apply)


def _params(n_out=5):
    return {
        "lin": {"kernel": _w((6, n_out)), "bias": _w((n_out,), seed=3)},
        "other": {"kernel": _w((n_out, 4), seed=4)},
    }


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_identity_at_init(name, factory, identity, ref, count, getkey):
    ad = factory()
    w = _w((6, _o(name)))
    t, f = _jit_init(ad)(getkey(), w)
    got = _jit_apply(ad)(w, t, f)
    if identity and name not in ("dora", "clover"):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
    elif identity:
        # DoRA divides by the recomputed norm, CLOVER rebuilds each head block from
        # its SVD: identity up to rounding.
        np.testing.assert_allclose(h.f64(got), h.f64(w), **h.MATMUL_F32)
    else:  # not the identity at init (as PEFT): the documented initial delta
        assert np.abs(ref(w, t, f) - h.f64(w)).max() > 0
        np.testing.assert_allclose(h.f64(got), ref(w, t, f), **h.MATMUL_F32)


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_closed_form_matches_float64_reference(name, factory, identity, ref, count,
                                               getkey):
    ad = factory()
    w = _w((6, _o(name)))
    t, f = _jit_init(ad)(getkey(), w)
    t = _randomize(t)
    got = _jit_apply(ad)(w, t, f)
    np.testing.assert_allclose(h.f64(got), ref(w, t, f), **h.MATMUL_F32)


# DoRA's norm is a constant in backprop (paper §4.3), so numerical gradients
# differ by design; test_dora_gradient_treats_norm_as_constant covers it. OSF
# projects its gradients off the preserved subspace by design (tests/adapters/test_osf.py).
# L4Q rounds (a step function) and passes gradients straight through
# (tests/adapters/test_l4q.py checks its STE/LSQ gradients in closed form).
_NO_NUMERICAL_GRAD = ("dora", "osf", "l4q")


@pytest.mark.parametrize("name,factory,identity,ref,count",
                         [a for a in ADAPTERS if a[0] not in _NO_NUMERICAL_GRAD],
                         ids=[i for i in IDS if i not in _NO_NUMERICAL_GRAD])
def test_gradients_match_numerical(name, factory, identity, ref, count, getkey):
    ad = factory()
    w = _w((5, 4))
    t, f = _jit_init(ad)(getkey(), w)
    t = _randomize(t)
    c = _w((5, 4), seed=7)

    @jax.jit
    def loss(tt):
        return jnp.sum(ad.apply(w, tt, f) * c)

    with jax.numpy_dtype_promotion("standard"):
        jax.test_util.check_grads(loss, (t,), order=1, modes=("rev",),
                                  atol=h.GRAD_F32["atol"], rtol=h.GRAD_F32["rtol"])


def test_lora_gradient_closed_form(getkey):
    """dA = s·dW·bᵀ, dB = s·aᵀ·dW (docs/methods.md#lora); at init dA = 0."""
    s = 2.0
    ad = adapters.lora(rank=3, alpha=6.0)
    w = _w((6, 5))
    t, f = ad.init(getkey(), w)
    c = _w((6, 5), seed=9)  # dL/dW' for L = sum(W' * c)
    g0 = jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) * c))(t)
    np.testing.assert_array_equal(np.asarray(g0.a), np.zeros((6, 3), np.float32))
    np.testing.assert_allclose(h.f64(g0.b), s * h.f64(t.a).T @ h.f64(c), **h.MATMUL_F32)
    t = _randomize(t)
    g = jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) * c))(t)
    np.testing.assert_allclose(h.f64(g.a), s * h.f64(c) @ h.f64(t.b).T, **h.MATMUL_F32)


def test_dora_gradient_treats_norm_as_constant(getkey):
    """DoRA §4.3: gradients flow as if ||W + sAB|| were a constant."""
    s = 2.0
    ad = adapters.dora(rank=2, alpha=4.0)
    w = _w((5, 4))
    t, f = ad.init(getkey(), w)
    t = _randomize(t)
    c = _w((5, 4), seed=7)
    g = jax.grad(lambda tt: jnp.sum(ad.apply(w, tt, f) * c))(t)
    v = h.f64(w) + s * h.f64(t.a) @ h.f64(t.b)
    norm = np.sqrt((v**2).sum(axis=0))
    # dL/dm_j = sum_i c_ij v_ij / norm_j ; dL/dV = c * m / norm (norm constant)
    np.testing.assert_allclose(h.f64(g.magnitude), (h.f64(c) * v).sum(0) / norm,
                               **h.MATMUL_F32)
    dv = h.f64(c) * (h.f64(t.magnitude) / norm)[None, :]
    np.testing.assert_allclose(h.f64(g.a), s * dv @ h.f64(t.b).T, **h.MATMUL_F32)
    np.testing.assert_allclose(h.f64(g.b), s * h.f64(t.a).T @ dv, **h.MATMUL_F32)
    # Column norms of the effective weight equal the magnitude.
    np.testing.assert_allclose(
        np.sqrt((h.f64(ad.apply(w, t, f)) ** 2).sum(0)), h.f64(t.magnitude),
        **h.MATMUL_F32)


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_jit_equals_eager_and_stacked_equals_loop(name, factory, identity, ref,
                                                 count, getkey):
    ad2 = factory()
    ad = ad2.with_dimension_numbers(tree.dims.stacked())  # (layers, in, out)
    w = _w((3, 6, _o(name)))
    t, f = _jit_init(ad)(getkey(), w)
    t = _randomize(t)
    eager = ad.apply(w, t, f)  # the one eager call (the rest is jitted: time)
    jitted = jax.jit(ad.apply)(w, t, f)
    # XLA fuses the scaling into the matmul under jit: matmul rounding, not bits.
    np.testing.assert_allclose(h.f64(eager), h.f64(jitted), **h.MATMUL_F32)
    layer = _jit_apply(ad2)
    for i in range(3):
        ti = jax.tree.map(lambda x, i=i: x[i], t)
        fi = jax.tree.map(lambda x, i=i: x[i], f)
        np.testing.assert_allclose(h.f64(eager[i]), ref(w[i], ti, fi), **h.MATMUL_F32)
        np.testing.assert_allclose(
            h.f64(eager[i]), h.f64(layer(w[i], ti, fi)), **h.MATMUL_F32
        )
    # An explicit vmap of the 2-D adapter over the layer axis gives the same.
    vm = jax.jit(jax.vmap(ad2.apply))(w, t, f)
    np.testing.assert_allclose(h.f64(vm), h.f64(eager), **h.MATMUL_F32)


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_abstract_init(name, factory, identity, ref, count):
    ad = factory().with_dimension_numbers(tree.dims.stacked())
    spec = jax.ShapeDtypeStruct((2, 6, _o(name)), jnp.float32)
    t, f = jax.eval_shape(lambda k, w: ad.init(k, w), jax.random.key(0), spec)
    leaves = jax.tree.leaves(t)
    assert leaves and all(x.shape[0] == 2 for x in leaves)


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_dtypes_bf16_base(name, factory, identity, ref, count, getkey):
    ad = factory()
    params = {"lin": {"kernel": _w((6, _o(name)), dtype=jnp.bfloat16),
                      "bias": _w((_o(name),), dtype=jnp.bfloat16)}}
    a = tree.assign(params, [tree.Rule(where="lin/kernel", then=ad)])
    state = adapters.init(a, getkey(), params)
    for x in jax.tree.leaves(state.trainable):
        assert x.dtype == jnp.float32
    merged = adapters.fold(a, params, *state)
    assert merged["lin"]["kernel"].dtype == jnp.bfloat16
    assert merged["lin"]["bias"].dtype == jnp.bfloat16


def test_param_dtype_respected(getkey):
    ad = adapters.lora(rank=2, param_dtype=jnp.bfloat16)
    t, _ = ad.init(getkey(), _w((6, 5)))
    assert t.a.dtype == t.b.dtype == jnp.bfloat16


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_structure_and_trainable_count(name, factory, identity, ref, count, getkey):
    ad = factory()
    params = _params(_o(name))
    a = tree.assign(params, [tree.Rule(where="lin/kernel", then=ad)])
    state = adapters.init(a, getkey(), params)
    for x in jax.tree.leaves(state.trainable):
        assert isinstance(x, jax.Array), type(x)
    assert adapters.num_trainable(state.trainable) == count(6, _o(name))
    assert ad.num_trainable(params["lin"]["kernel"]) == count(6, _o(name))
    stacked = jnp.zeros((4, 6, _o(name)))
    assert ad.with_dimension_numbers(tree.dims.stacked()).num_trainable(stacked) == (
        4 * count(6, _o(name)))


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_determinism_and_rule_independence(name, factory, identity, ref, count):
    ad = factory()
    params = _params(_o(name))
    key = jax.random.key(3)
    a1 = tree.assign(params, [tree.Rule(where="lin/kernel", then=ad)])
    a2 = tree.assign(params, [tree.Rule(where="other/kernel", then=adapters.lora(2)),
                              tree.Rule(where="lin/kernel", then=ad)])
    s1 = adapters.init(a1, key, params)
    s1b = adapters.init(a1, key, params)
    s2 = adapters.init(a2, key, params)
    h.assert_tree_allclose(s1.trainable, s1b.trainable, **h.EXACT)
    h.assert_tree_allclose(s1.trainable["lin/kernel"], s2.trainable["lin/kernel"],
                           **h.EXACT)


# L4Q's merged weight is rounded: W0 cannot be recovered (no unapply).
_NO_UNFOLD = ("l4q",)


@pytest.mark.parametrize("name,factory,identity,ref,count",
                         [a for a in ADAPTERS if a[0] not in _NO_UNFOLD],
                         ids=[i for i in IDS if i not in _NO_UNFOLD])
def test_fold_unfold_roundtrip(name, factory, identity, ref, count, getkey):
    ad = factory()
    for dtype, tol in ((jnp.float32, h.MATMUL_F32), (jnp.bfloat16, h.BF16)):
        params = {"lin": {"kernel": _w((6, _o(name)), dtype=dtype),
                          "bias": _w((_o(name),), seed=3, dtype=dtype)}}
        a = tree.assign(params, [tree.Rule(where="lin/kernel", then=ad)])
        state = adapters.init(a, getkey(), params)
        state = state._replace(trainable=_randomize(state.trainable))
        merged, aux = adapters.fold(a, params, *state, return_aux=True)
        back = adapters.unfold(a, merged, *state, aux=aux)
        h.assert_tree_allclose(back, params, **tol)
        assert back["lin"]["kernel"].dtype == dtype


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_no_retrace_and_training_changes_only_trainable(name, factory, identity,
                                                        ref, count, getkey):
    ad = factory()
    params = _params(_o(name))
    a = tree.assign(params, [tree.Rule(where="lin/kernel", then=ad)])
    state = adapters.init(a, getkey(), params)
    frozen_before = jax.tree.map(np.array, state.frozen)
    params_before = jax.tree.map(np.array, params)
    x = _w((16, 6), seed=11)
    y = _w((16, 4), seed=12)

    def model(p, x):
        hdn = jnp.tanh(x @ p["lin"]["kernel"] + p["lin"]["bias"][None, :])
        return hdn @ p["other"]["kernel"]

    def loss(trainable):
        p = adapters.materialize(a, params, trainable, state.frozen)
        return jnp.mean((model(p, x) - y) ** 2)

    opt = optax.adam(0.05)
    opt_state = opt.init(state.trainable)

    def step(trainable, opt_state):
        value, grads = jax.value_and_grad(loss)(trainable)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int/float
            updates, opt_state = opt.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

    counted, counter = h.count_traces(step)
    jstep = jax.jit(counted)
    trainable = state.trainable
    losses = []
    for _ in range(5):
        trainable, opt_state, value = jstep(trainable, opt_state)
        losses.append(float(value))
    assert counter["n"] == 1
    assert losses[-1] < losses[0]
    h.assert_tree_allclose(params, params_before, **h.EXACT)
    h.assert_tree_allclose(state.frozen, frozen_before, **h.EXACT)
    changed = jax.tree.map(lambda u, v: bool(np.any(np.asarray(u) != np.asarray(v))),
                           trainable, state.trainable)
    assert any(jax.tree.leaves(changed))


@functools.cache
def _flax_params(n_out=5):
    """The Linen block, its params, input and jitted apply (built once per width)."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="up")(x)
            x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                                name="attn")(x)
            return nn.Dense(n_out, name="down")(jax.nn.gelu(x))

    model = Block()
    x = _w((2, 5, 4), seed=5)
    with jax.numpy_dtype_promotion("standard"):
        variables = model.init(jax.random.key(0), x)
    # one compiled forward per width, shared by every adapter's merged params
    return model, variables["params"], x, jax.jit(model.apply)


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_linen_mlp_and_attention(name, factory, identity, ref, count, getkey):
    model, params, x, forward = _flax_params(_o(name))
    ad = factory()
    a = tree.assign(params, [tree.Rule(where=r"(up|down)/kernel", then=ad)])
    state = jax.jit(lambda k, p: adapters.init(a, k, p))(getkey(), params)
    state = state._replace(trainable=_randomize(state.trainable))
    merged = jax.jit(lambda p, t, f: adapters.fold(a, p, t, f))(params, *state)
    for layer in ("up", "down"):
        p = f"{layer}/kernel"
        np.testing.assert_allclose(
            h.f64(merged[layer]["kernel"]),
            ref(params[layer]["kernel"], state.trainable[p], state.frozen[p]),
            **h.MATMUL_F32)
    # The merged params run through the unmodified Linen model.
    with jax.numpy_dtype_promotion("standard"):
        y = forward({"params": merged}, x)
    assert y.shape == (2, 5, _o(name)) and bool(jnp.all(jnp.isfinite(y)))


def test_linen_head_split_attention_kernels(getkey):
    model, params, x, _ = _flax_params()
    head_split = tree.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    out_proj = tree.DimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    rules = [
        tree.Rule(where=r"attn/(query|key|value)/kernel",
                  then=adapters.lora(2, alpha=8.0, dimension_numbers=head_split)),
        tree.Rule(where=r"attn/out/kernel",
                  then=adapters.lora(2, alpha=8.0, dimension_numbers=out_proj)),
    ]
    a = tree.assign(params, rules)
    state = adapters.init(a, getkey(), params)
    with jax.numpy_dtype_promotion("standard"):
        y0 = model.apply({"params": params}, x)
        y1 = model.apply({"params": adapters.materialize(a, params, *state)}, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))  # B = 0
    state = state._replace(trainable=_randomize(state.trainable))
    m = adapters.materialize(a, params, *state)
    q = h.f64(params["attn"]["query"]["kernel"])  # (embed, heads, head_dim)
    tq = state.trainable["attn/query/kernel"]
    want = q.reshape(q.shape[0], -1) + 4.0 * h.f64(tq.a) @ h.f64(tq.b)
    np.testing.assert_allclose(h.f64(m["attn"]["query"]["kernel"]),
                               want.reshape(q.shape), **h.MATMUL_F32)
    o = h.f64(params["attn"]["out"]["kernel"])  # (heads, head_dim, embed)
    to = state.trainable["attn/out/kernel"]
    want_o = o.reshape(-1, o.shape[-1]) + 4.0 * h.f64(to.a) @ h.f64(to.b)
    np.testing.assert_allclose(h.f64(m["attn"]["out"]["kernel"]),
                               want_o.reshape(o.shape), **h.MATMUL_F32)


@pytest.mark.parametrize("name,factory,identity,ref,count", ADAPTERS, ids=IDS)
def test_nnx_state(name, factory, identity, ref, count, getkey):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(6, _o(name), rngs=rngs)
            self.other = nnx.Linear(_o(name), 4, rngs=rngs)

        def __call__(self, x):
            return self.other(jnp.tanh(self.lin(x)))

    model = MLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    ad = factory()
    a = tree.assign(state, [tree.Rule(where="lin/kernel", then=ad)])
    s = adapters.init(a, getkey(), state)
    s = s._replace(trainable=_randomize(s.trainable))
    merged_state = adapters.fold(a, state, *s)
    pure = nnx.to_pure_dict(state)
    merged_pure = adapters.fold(a, pure, *s)
    np.testing.assert_array_equal(
        np.asarray(nnx.to_pure_dict(merged_state)["lin"]["kernel"]),
        np.asarray(merged_pure["lin"]["kernel"]),
    )
    w = pure["lin"]["kernel"]
    np.testing.assert_allclose(
        h.f64(merged_pure["lin"]["kernel"]),
        ref(w, s.trainable["lin/kernel"], s.frozen["lin/kernel"]),
        **h.MATMUL_F32,
    )
    graphdef, _ = nnx.split(model)
    x = _w((3, 6), seed=2)
    y = nnx.merge(graphdef, merged_state)(x)
    p = merged_pure
    want = jnp.tanh(x @ p["lin"]["kernel"] + p["lin"]["bias"][None, :]) @ p["other"]["kernel"]
    want = want + p["other"]["bias"][None, :]
    np.testing.assert_allclose(h.f64(y), h.f64(want), **h.MATMUL_F32)


def test_adapter_counts_match_formula_on_stacked_kernel():
    ad = adapters.lora(rank=3, dimension_numbers=tree.dims.stacked())
    assert ad.num_trainable(jnp.zeros((5, 8, 7))) == 5 * 3 * (8 + 7)
    # Undeclared, a 3-D kernel is not guessed to be stacked layers.
    with pytest.raises(ValueError, match=r"shape \(5, 8, 7\) \(rank 3\) has no default"):
        adapters.lora(rank=3).num_trainable(jnp.zeros((5, 8, 7)))
    assert math.prod((5, 8, 3)) == 120


# LN tuning has no factored form (W' = V is the trained leaf itself), nor
# trainable tokens (W' = W with k rows replaced: a scatter, looked up by a gather),
# nor SALT (a ReLU of a dense block of the singular-value matrix: a factored row
# would cost more than the base product), nor L4Q (W' = Q(W0 + s·A@B) is rounded
# as a whole: it is the weight).
_NO_FACTORED = ("ln_tuning", "trainable_tokens", "salt", "l4q")


@pytest.mark.parametrize("name,factory,identity,ref,count",
                         [a for a in ADAPTERS if a[0] not in _NO_FACTORED],
                         ids=[i for i in IDS if i not in _NO_FACTORED])
def test_factored_terms_equal_weight_space(name, factory, identity, ref, count,
                                           getkey):
    """x·W' equals the factored form (out_map(in_map(x ⊙ in) @ W) + delta(x)) ⊙ out."""
    ad = factory()
    w = _w((6, _o(name)))
    t, f = ad.init(getkey(), w)
    t = _randomize(t)
    x = _w((4, 6), seed=21)
    want = h.f64(x) @ ref(w, t, f)
    form = ad.factored
    assert form is not None, f"{name} has no factored form"
    terms = form.terms(w, t, f)
    xs = x if terms.in_scale is None else x * terms.in_scale[None, :]
    xs = xs if terms.in_map is None else terms.in_map(xs)
    y = xs @ w
    y = h.f64(y if terms.out_map is None else terms.out_map(y))
    if terms.delta is not None:
        y = y + h.f64(terms.delta(x))
    if terms.out_scale is not None:
        y = y * h.f64(terms.out_scale)[None, :]
    np.testing.assert_allclose(y, want, **h.MATMUL_F32)
