# SPDX-License-Identifier: Apache-2.0
"""WaveFT: a few trainable wavelet coefficients of the weight update.

Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets
(WaveFT). Bilican et al., 2025. https://arxiv.org/abs/2505.12532

``n`` positions of a wavelet-coefficient matrix are chosen at random once
(frozen); the trainable coefficients ``c (n,)`` are scattered there and the
update is their one-level inverse 2-D discrete wavelet transform,
``ΔW = α · IDWT2(ToDense(E, c))``. Hugging Face PEFT (``tuners/waveft``), which
this module follows, draws the positions exactly as FourierFT does
(``torch.randperm(out·in, generator=manual_seed(random_loc_seed))[:n]``, flat
``k`` -> row ``k // in``, column ``k % in``; reproduced without torch by
``fourierft_indices``), and reconstructs with its own port of
PyTorch-Wavelet-Toolbox's ``waverec2d``:

- the coefficient matrix is padded to ``(out + r, in + r)`` (``r = L - 2`` for
  a filter of length ``L``, PEFT's ``WAVELET_REDUCTIONS``), each side rounded
  up to even, with the positions shifted by half the padding;
- it is split into quadrants ``cA`` (top left), ``cH`` (top right), ``cV``
  (bottom left), ``cD`` (bottom right), each upsampled by 2 and filtered with
  the reconstruction filters ``lo``/``hi``: ``cA`` with ``lo`` along rows and
  columns, ``cH`` with ``hi`` along rows and ``lo`` along columns, ``cV`` with
  ``lo`` along rows and ``hi`` along columns, ``cD`` with ``hi`` both ways
  (so a top-right coefficient is high-pass *along rows*); ``L - 2`` samples
  are cut from each border and the result is cropped to ``(out, in)`` about
  its centre;
- ``α = scaling`` (PEFT's default 25), ``c = 0`` at init by default (the
  identity; ``init_weights=False`` draws ``0.01 · N(0, 1)``), and
  ``use_idwt=False`` skips the transform (``ΔW = α · ToDense(E, c)``).

Every coefficient therefore adds ``α·c_k · u_k v_kᵀ`` with ``u_k (out,)`` and
``v_k (in,)`` shifted copies of one filter each (at most ``L`` nonzeros): this
module builds, per axis, a table of those windows (indices and taps, from the
matrix shape and the filters only) and never forms the padded coefficient
matrix. The filters are the standard orthonormal Daubechies (``db1``-``db10``),
symlet (``sym2``-``sym10``) and coiflet (``coif1``-``coif3``) reconstruction
low-pass filters, with ``hi[i] = (-1)^i · lo[L-1-i]``; these are the families
PEFT 0.21 can build. PEFT's ``coif4`` and ``coif5`` tables are not
orthonormal filters (their sums are not ``√2``), so they are refused rather
than reproduced.

On a Flax kernel ``W (in, out)`` the update is ``ΔWᵀ``.

Exports: ``WaveFTParams``, ``WaveFTIndices``, ``waveft``, ``waveft_wavelets``.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.adapters import _fourierft, _lift, _lowrank, _protocol

# Reconstruction low-pass filters ``lo`` (sum √2, unit norm), float64.
_LOWPASS = {
    "db1": (0.7071067811865476, 0.7071067811865476),
    "db2": (0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037),
    "db3": (0.33267055295008263, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084,
        -0.08544127388224149, 0.035226291882100656),
    "db4": (0.2303778133088965, 0.7148465705529157, 0.6308807679298589, -0.027983769416859854,
        -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032),
    "db5": (0.16010239797419293, 0.6038292697971896, 0.7243085284377729, 0.13842814590132074,
        -0.24229488706638203, -0.032244869584638375, 0.07757149384004572,
        -0.006241490212798274, -0.012580751999081999, 0.0033357252854737712),
    "db6": (0.11154074335010947, 0.49462389039845306, 0.7511339080210954, 0.31525035170919763,
        -0.22626469396543983, -0.12976686756726194, 0.09750160558732304, 0.027522865530305727,
        -0.03158203931748603, 0.0005538422011614961, 0.004777257510945511,
        -0.0010773010853084796),
    "db7": (0.07785205408500918, 0.3965393194819173, 0.7291320908462351, 0.4697822874051931,
        -0.14390600392856498, -0.22403618499387498, 0.07130921926683026, 0.08061260915108308,
        -0.03802993693501441, -0.01657454163066688, 0.01255099855609984, 0.0004295779729213665,
        -0.0018016407040474908, 0.00035371379997452024),
    "db8": (0.05441584224310401, 0.31287159091429995, 0.6756307362972898, 0.5853546836542067,
        -0.015829105256349306, -0.2840155429615469, 0.0004724845739132828, 0.12874742662047847,
        -0.017369301001807547, -0.044088253930794755, 0.013981027917398282,
        0.008746094047405777, -0.004870352993451574, -0.00039174037337694705,
        0.0006754494064505693, -0.00011747678412476953),
    "db9": (0.038077947363878345, 0.24383467461259034, 0.6048231236901112, 0.6572880780513005,
        0.13319738582500756, -0.2932737832791749, -0.09684078322297646, 0.14854074933810638,
        0.03072568147933338, -0.06763282906132997, 0.00025094711483145197,
        0.022361662123679096, -0.004723204757751397, -0.00428150368246343,
        0.0018476468830562265, 0.00023038576352319597, -0.0002519631889427101,
        3.93473203162716e-05),
    "db10": (0.026670057900555554, 0.1881768000776915, 0.5272011889317256, 0.6884590394536035,
        0.2811723436605775, -0.24984642432731538, -0.19594627437737705, 0.12736934033579325,
        0.09305736460357235, -0.07139414716639708, -0.029457536821875813, 0.033212674059341,
        0.0036065535669561697, -0.010733175483330575, 0.001395351747052901,
        0.001992405295185056, -0.0006858566949597116, -0.00011646685512928545,
        9.358867032006959e-05, -1.3264202894521244e-05),
    "sym2": (0.48296291314469025, 0.836516303737469, 0.22414386804185735, -0.12940952255092145),
    "sym3": (0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084,
        -0.08544127388224149, 0.035226291882100656),
    "sym4": (0.0322231006040427, -0.012603967262037833, -0.09921954357684722,
        0.29785779560527736, 0.8037387518059161, 0.49761866763201545, -0.02963552764599851,
        -0.07576571478927333),
    "sym5": (0.019538882735286728, -0.021101834024758855, -0.17532808990845047,
        0.01660210576452232, 0.6339789634582119, 0.7234076904024206, 0.1993975339773936,
        -0.039134249302383094, 0.029519490925774643, 0.027333068345077982),
    "sym6": (-0.007800708325034148, 0.0017677118642428036, 0.04472490177066578,
        -0.021060292512300564, -0.07263752278646252, 0.3379294217276218, 0.787641141030194,
        0.4910559419267466, -0.048311742585633, -0.11799011114819057, 0.0034907120842174702,
        0.015404109327027373),
    "sym7": (0.010268176708511255, 0.004010244871533663, -0.10780823770381774,
        -0.14004724044296152, 0.2886296317515146, 0.767764317003164, 0.5361019170917628,
        0.017441255086855827, -0.049552834937127255, 0.0678926935013727, 0.03051551316596357,
        -0.01263630340325193, -0.0010473848886829163, 0.002681814568257878),
    "sym8": (0.0018899503327594609, -0.0003029205147213668, -0.01495225833704823,
        0.003808752013890615, 0.049137179673607506, -0.027219029917056003,
        -0.05194583810770904, 0.3644418948353314, 0.7771857517005235, 0.4813596512583722,
        -0.061273359067658524, -0.1432942383508097, 0.007607487324917605, 0.03169508781149298,
        -0.0005421323317911481, -0.0033824159510061256),
    "sym9": (0.0010694900329086053, -0.0004731544986800831, -0.010264064027633142,
        0.008859267493400484, 0.06207778930288603, -0.018233770779395985, -0.19155083129728512,
        0.035272488035271894, 0.6173384491409358, 0.717897082764412, 0.238760914607303,
        -0.05456895843083407, 0.0005834627461258068, 0.03022487885827568, -0.01152821020767923,
        -0.013271967781817119, 0.0006197808889855868, 0.0014009155259146807),
    "sym10": (-0.0004593294210046588, 5.7036083618494284e-05, 0.004593173585311828,
        -0.0008043589320165449, -0.02035493981231129, 0.005764912033581909,
        0.04999497207737669, -0.0319900568824278, -0.03553674047381755, 0.38382676106708546,
        0.7695100370211071, 0.47169066693843925, -0.07088053578324385, -0.15949427888491757,
        0.011609893903711381, 0.0459272392310922, -0.0014653825813050513,
        -0.008641299277022422, 9.563267072289475e-05, 0.0007701598091144901),
    "coif1": (-0.07273261951252645, 0.3378976624574818, 0.8525720202116004, 0.3848648468648578,
        -0.07273261951252645, -0.015655728135791993),
    "coif2": (0.01638733646320364, -0.04146493678687178, -0.0673725547237256,
        0.3861100668227629, 0.8127236354494135, 0.4170051844232391, -0.07648859907828076,
        -0.05943441864643109, 0.02368017194684777, 0.005611434819368834,
        -0.0018232088709110323, -0.000720549445520347),
    "coif3": (-0.003793512864380802, 0.007782596425672746, 0.023452696142077168,
        -0.06577191128146936, -0.06112339000297255, 0.40517690240911824, 0.7937772226260872,
        0.42848347637737, -0.07179982161915484, -0.08230192710629983, 0.03455502757329774,
        0.015880544863669452, -0.009007976136730624, -0.0025745176881367972,
        0.0011175187708306303, 0.0004662169598204029, -7.0983302506379e-05,
        -3.459977319727278e-05),
}
# PEFT lists these (its WAVELET_REDUCTIONS) but has no valid filter for them.
_REFUSED = {"coif4": "PEFT's coif4 table sums to 1.4485, not √2",
            "coif5": "PEFT's coif5 table has 48 taps, not 30"}


class WaveFTParams(NamedTuple):
    """Trainable wavelet coefficients.

    Attributes:
      spectrum: ``(n,)`` coefficients ``c`` (PEFT's ``waveft_spectrum``).
    """

    spectrum: jax.Array


class WaveFTIndices(NamedTuple):
    """Frozen coefficient positions (PEFT's ``waveft_indices``).

    Attributes:
      indices: ``(2, n)`` int32: row (output unit) and column (input feature)
        of each coefficient in the torch-layout ``(out, in)`` matrix, before
        PEFT's padding offset.
    """

    indices: jax.Array


def waveft_wavelets() -> tuple[str, ...]:
    """The wavelet families ``waveft`` accepts.

    Returns:
      Names as PEFT's ``wavelet_family``, ``db1`` ... ``coif3``.

    Example:
      >>> waveft_wavelets()[:3]
      ('db1', 'db2', 'db3')
    """
    return tuple(_LOWPASS)


def _filters(family: str) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(_LOWPASS[family], np.float64)
    hi = lo[::-1] * (-1.0) ** np.arange(lo.size)
    return lo, hi


@functools.lru_cache(maxsize=128)
def _axis(d: int, family: str) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Per-axis windows of the reconstruction along one side of size ``d``.

    Returns ``(half, offset, index, taps)``: the padded side is ``2·half``,
    positions shift by ``offset``; row ``band·half + i`` of ``index``/``taps``
    ``(2·half, L)`` is where coefficient ``i`` of band ``band`` (0 low, 1 high)
    lands in the cropped output and with which weights (0 where it falls
    outside; the index is then clamped, harmlessly).
    """
    lo, hi = _filters(family)
    length = lo.size
    padded = d + (length - 2)
    padded += padded % 2
    half, offset = padded // 2, (padded - d) // 2
    cut = (2 * length - 3) // 2  # waverec2d's border trim
    size = 2 * (half - 1) + length - 2 * cut
    start = (size - d) // 2  # PEFT's centred crop
    pos = (2 * np.arange(half)[:, None] + np.arange(length)[None, :]) - cut - start
    inside = (pos >= 0) & (pos < d)
    index = np.clip(pos, 0, d - 1)
    taps = np.stack([np.where(inside, f[None, :], 0.0) for f in (lo, hi)])
    return (half, offset, np.concatenate([index, index]).astype(np.int32),
            taps.reshape(2 * half, length))


def _windows(n_out: int, n_in: int, family: str | None, idx: jax.Array, dtype):
    """``(row index, row taps, column index, column taps)``, each ``(n, L)``."""
    if family is None:  # use_idwt=False: the coefficients are the update
        ones = jnp.ones(idx.shape[1:] + (1,), dtype)
        return idx[0][:, None], ones, idx[1][:, None], ones
    half_r, off_r, index_r, taps_r = _axis(n_out, family)
    half_c, off_c, index_c, taps_c = _axis(n_in, family)
    pr, pc = idx[0] + off_r, idx[1] + off_c
    hr, hc = pr >= half_r, pc >= half_c  # bottom half, right half
    # A right-half coefficient is high-pass along rows, a bottom-half one
    # along columns (waverec2d's lh = outer(hi, lo) for the top-right cH).
    rsel = jnp.where(hc, half_r, 0) + jnp.where(hr, pr - half_r, pr)
    csel = jnp.where(hr, half_c, 0) + jnp.where(hc, pc - half_c, pc)
    return (jnp.asarray(index_r)[rsel], jnp.asarray(taps_r, dtype)[rsel],
            jnp.asarray(index_c)[csel], jnp.asarray(taps_c, dtype)[csel])


def waveft(
    n_frequency: int = 2592,
    *,
    scaling: float = 25.0,
    wavelet_family: str = "db1",
    use_idwt: bool = True,
    random_loc_seed: int = 777,
    init_weights: bool = True,
    dimension_numbers: tree.DimensionNumbers | None = None,
    param_dtype: Any = jnp.float32,
) -> _protocol.Adapter:
    """WaveFT: ``W' = W + α · IDWT2(ToDense(E, c))ᵀ`` (PEFT's ``WAVEFT``).

    Trainable parameters per matrix: ``n_frequency``. The positions ``E``
    are frozen and regenerated from ``random_loc_seed`` (the same for every
    matrix of one shape, as in PEFT).

    The inverse DWT is linear and local, so each coefficient ``c_k`` adds a
    rank-one ``α·c_k · u_k v_kᵀ`` whose vectors have at most ``L`` nonzeros
    (``L`` the filter length: 2 for the default ``db1``). The factored path
    does not form ``ΔW``: it gathers ``x`` at each ``v_k``'s window, weighs
    it by the filter taps, scales by ``α·c`` and scatter-adds into the output
    at ``u_k``'s window: ``O(n·L)`` per row, independent of ``in·out``, and no
    weight-sized temporary or cotangent. The weight-space path scatter-adds the
    ``n`` ``L×L`` patches into a zero ``(in, out)`` matrix (``O(in·out +
    n·L²)``; PEFT runs a transposed convolution over the padded matrix).

    Args:
      n_frequency: ``n``, at most ``in·out`` (PEFT's default 2592).
      scaling: ``α`` (PEFT's default 25.0).
      wavelet_family: one of ``waveft_wavelets()`` (PEFT's default ``"db1"``,
        the Haar wavelet).
      use_idwt: False: no transform, ``ΔW = α · ToDense(E, c)`` (PEFT's
        ``use_idwt``; default True).
      random_loc_seed: seed of the positions (PEFT's default 777).
      init_weights: True (PEFT's default): ``c = 0``, the identity at init;
        False: ``c ~ 0.01 · N(0, 1)``.
      dimension_numbers: the kernel's matrix view.
      param_dtype: storage dtype of ``c``.

    Returns:
      An ``Adapter`` with trainable ``WaveFTParams`` and frozen
      ``WaveFTIndices``.

    Raises:
      ValueError: an unknown or refused wavelet family, a non-positive
        ``n_frequency``; at init, ``n_frequency > in·out`` (naming the shape).

    Static arguments: all.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> ad = waveft(4, wavelet_family="db2")
      >>> t, f = ad.init(jax.random.key(0), jnp.ones((3, 5)))
      >>> t.spectrum.shape, f.indices.shape
      ((4,), (2, 4))

    References:
      Bilican et al., 2025, https://arxiv.org/abs/2505.12532
    """
    if isinstance(n_frequency, bool) or not isinstance(n_frequency, int) or n_frequency < 1:
        raise ValueError(f"waveft: n_frequency must be a positive int, got {n_frequency!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"waveft: scaling must be finite, got {scaling!r}")
    if wavelet_family in _REFUSED:
        raise ValueError(f"waveft: wavelet_family={wavelet_family!r} is refused: "
                         f"{_REFUSED[wavelet_family]}")
    if wavelet_family not in _LOWPASS:
        raise ValueError(f"waveft: unknown wavelet_family={wavelet_family!r}; "
                         f"expected one of {waveft_wavelets()}")
    param_dtype = jnp.dtype(param_dtype)
    family = wavelet_family if use_idwt else None

    def init_matrix(key, w, stats):
        if stats is not None:
            raise ValueError("waveft takes no stats")
        n_in, n_out = w.shape
        if n_frequency > n_in * n_out:
            raise ValueError(f"waveft: n_frequency={n_frequency} exceeds in*out="
                             f"{n_in * n_out} of the matrix (in={n_in}, out={n_out}) "
                             f"of a kernel of shape {tuple(w.shape)} {w.dtype}")
        idx = _fourierft.fourierft_indices(n_out, n_in, n_frequency, random_loc_seed)
        if init_weights:
            c = jnp.zeros((n_frequency,), param_dtype)
        else:
            c = (0.01 * jax.random.normal(key, (n_frequency,), jnp.float32)).astype(param_dtype)
        return WaveFTParams(c), WaveFTIndices(jnp.asarray(idx))

    def parts(w, t, f):
        n_in, n_out = w.shape
        c = t.spectrum.astype(_lowrank.compute_dtype(jnp.float32, t.spectrum.dtype))
        return c * scaling, _windows(n_out, n_in, family, f.indices, c.dtype)

    def delta(w, t, f):
        """``ΔWᵀ (in, out)`` in float32 (or wider)."""
        c, (ri, rt, ci, ct) = parts(w, t, f)
        patches = c[:, None, None] * ct[:, :, None] * rt[:, None, :]
        return jnp.zeros(w.shape, c.dtype).at[ci[:, :, None], ri[:, None, :]].add(patches)

    def apply_matrix(w, t, f):
        d = delta(w, t, f)
        return w.astype(_lowrank.compute_dtype(w.dtype, d.dtype)) + d

    def unapply_matrix(w, t, f, aux):
        d = delta(w, t, f)
        return w.astype(_lowrank.compute_dtype(w.dtype, d.dtype)) - d

    def factored_matrix(w, t, f):
        n_out = w.shape[1]
        c, (ri, rt, ci, ct) = parts(w, t, f)

        def run(x):
            lead = (1,) * (x.ndim - 1)
            g = x.astype(c.dtype)[..., ci] * ct.reshape(lead + ct.shape)  # (..., n, L)
            z = jnp.sum(g, axis=-1) * c.reshape(lead + c.shape)
            y = jnp.zeros(x.shape[:-1] + (n_out,), c.dtype)
            return y.at[..., ri].add(z[..., None] * rt.reshape(lead + rt.shape))

        return _protocol.FactoredTerms(delta=run)

    return _lift.lift_matrix(
        name=(f"waveft(n_frequency={n_frequency}, scaling={float(scaling)!r}, "
              f"wavelet_family={wavelet_family!r}, use_idwt={bool(use_idwt)}, "
              f"seed={int(random_loc_seed)})"),
        init_matrix=init_matrix,
        apply_matrix=apply_matrix,
        unapply_matrix=unapply_matrix,
        dimension_numbers=dimension_numbers,
        factored_matrix=factored_matrix,
        hyperparameters=(("n_frequency", n_frequency), ("scaling", float(scaling)),
                         ("wavelet_family", wavelet_family), ("use_idwt", bool(use_idwt)),
                         ("random_loc_seed", int(random_loc_seed))),
    )
