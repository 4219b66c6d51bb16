"""The Wiener-Butterworth back projector against independent float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import smooth_volume
from scipy.signal import fftconvolve

from ssi_dask import deconvolve
from ssi_dask._backend import cupy_or_none
from ssi_dask.errors import ParameterError
from ssi_dask.lr import (
    BackProjector,
    get_plan,
    otf_cutoff,
    resolve_back_projector,
    richardson_lucy,
    wiener_butterworth_defaults,
    wiener_butterworth_kernel,
)


def gaussian_psf(shape, sigmas, shift=None):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    shift = shift or [0.0] * len(shape)
    arg = sum(
        ((g - (n - 1) / 2 - s) / sg) ** 2
        for g, n, sg, s in zip(grids, shape, sigmas, shift, strict=True)
    )
    psf = np.exp(-0.5 * arg)
    return psf / psf.sum()


def make_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = 0.2 + rng.random(shape)
    for _ in range(6):
        img[tuple(rng.integers(0, n) for n in shape)] += 20.0
    return img.astype(np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------------
# independent reference: centred full complex FFTs on the PSF grid, then extended-domain RL
# ---------------------------------------------------------------------------------------------
def reference_wb_kernel(psf, alpha, order, cutoff, beta):
    """The back projector built with fftshift-centred complex FFTs (float64)."""
    h = np.asarray(psf, np.float64) / np.sum(psf)
    shape = h.shape
    # centre sample (K - 1) // 2 to the origin, full complex transform
    h0 = np.roll(h, [-((k - 1) // 2) for k in shape], axis=tuple(range(h.ndim)))
    otf = np.fft.fftn(h0)
    grids = np.meshgrid(*[np.fft.fftfreq(k) for k in shape], indexing="ij")
    r2 = np.zeros(shape)
    for g, c in zip(grids, cutoff, strict=True):
        if np.isfinite(c):
            r2 = r2 + (g / c) ** 2
    butter = 1.0 / np.sqrt(1.0 + (1.0 / beta**2 - 1.0) * r2**order)
    bp = np.conj(otf) / (np.abs(otf) ** 2 + alpha) * butter
    b0 = np.fft.ifftn(bp)
    assert np.abs(b0.imag).max() < 1e-8 * np.abs(b0.real).max()
    # b0 has its origin at index 0 like a correlation kernel; as a convolution kernel in the
    # place of the flipped PSF its origin is sample K - 1 - (K - 1) // 2
    b = np.roll(b0.real, [k - 1 - (k - 1) // 2 for k in shape], axis=tuple(range(h.ndim)))
    return b / b.sum()


def reference_wb_rl(image, psf, num_iter, kernel, *, eps=1e-6, edge_threshold=1e-3):
    """RL on the extended object domain with fftconvolve, back-projecting with ``kernel``."""
    y = np.asarray(image, np.float64)
    h = np.asarray(psf, np.float64) / np.sum(psf)
    crop = tuple(
        slice(k - 1 - (k - 1) // 2, k - 1 - (k - 1) // 2 + n)
        for n, k in zip(y.shape, h.shape, strict=True)
    )
    weights = fftconvolve(np.ones_like(y), kernel, mode="full")
    keep = weights > edge_threshold * weights.max()
    inv_w = np.where(keep, 1.0 / np.where(keep, weights, 1.0), 0.0)
    x = np.full(tuple(n + k - 1 for n, k in zip(y.shape, h.shape)), y.mean())
    for _ in range(num_iter):
        ratio = y / np.maximum(fftconvolve(x, h, mode="valid"), eps)
        x = np.maximum(x * fftconvolve(ratio, kernel, mode="full") * inv_w, 0.0)
    return x[crop]


# ---------------------------------------------------------------------------------------------
# the transform's documented properties
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "sigmas"), [((21, 21), (1.5, 2.5)), ((15, 17, 17), (3.0, 1.6, 1.8))]
)
def test_transform_times_otf_is_one_at_low_and_zero_beyond_cutoff(shape, sigmas):
    psf = gaussian_psf(shape, sigmas)
    # "low frequencies" are where |OTF|^2 >> alpha: the paper's alpha 1e-3, |OTF| >= 0.5
    spec = resolve_back_projector(psf, "wiener-butterworth", wiener_alpha=1e-3)
    assert all(np.isfinite(spec.cutoff))  # a Gaussian this wide has a cut-off on every axis
    kernel = wiener_butterworth_kernel(psf, spec).astype(np.float64)
    # transforms on the PSF grid, both with their own origin (centre of h, centre of h^T)
    axes = tuple(range(psf.ndim))
    otf = np.fft.fftn(np.roll(psf, [-((k - 1) // 2) for k in shape], axis=axes))
    bp = np.fft.fftn(np.roll(kernel, [-(k - 1 - (k - 1) // 2) for k in shape], axis=axes))
    product = otf * bp
    grids = np.meshgrid(*[np.fft.fftfreq(k) for k in shape], indexing="ij")
    r = np.sqrt(sum((g / c) ** 2 for g, c in zip(grids, spec.cutoff)))
    low = np.abs(otf) >= 0.5
    assert low.sum() >= 9
    assert np.abs(product[low] - 1).max() < 0.05
    beyond = r >= 1
    assert beyond.sum() > product.size // 4
    assert np.abs(product[beyond]).max() < 2 * spec.beta
    # the unmatched pair behaves like a low-pass with unit gain at zero frequency
    assert product.flat[0] == pytest.approx(1.0, abs=1e-6)


def test_default_cutoff_is_the_otf_support_of_a_gaussian():
    """|OTF| of a Gaussian is exp(-2 pi^2 sigma^2 k^2): the 5 % level has a closed form."""
    sigmas = (1.5, 2.5)
    psf = gaussian_psf((31, 31), sigmas)
    expected = [np.sqrt(np.log(1 / 0.05) / (2 * np.pi**2 * s**2)) for s in sigmas]
    assert otf_cutoff(psf) == pytest.approx(expected, rel=0.05)
    defaults = wiener_butterworth_defaults(psf)
    assert defaults["wiener_alpha"] == 0.05 and defaults["butterworth_order"] == 10
    assert defaults["cutoff"] == otf_cutoff(psf, 0.05) and defaults["beta"] == 0.01
    # a PSF narrower than a pixel has its OTF above 5 % up to Nyquist: no cut-off
    assert otf_cutoff(gaussian_psf((5, 5), (0.4, 0.4))) == (np.inf, np.inf)


@pytest.mark.parametrize(
    ("shape", "sigmas"), [((21, 21), (1.5, 2.5)), ((15, 16, 13), (3.0, 1.6, 1.2))]
)
def test_kernel_matches_independent_construction(shape, sigmas):
    psf = gaussian_psf(shape, sigmas, shift=[0.3] * len(shape))
    spec = resolve_back_projector(psf, "wiener-butterworth", wiener_alpha=0.01)
    ours = wiener_butterworth_kernel(psf, spec)
    ref = reference_wb_kernel(psf, 0.01, spec.butterworth_order, spec.cutoff, spec.beta)
    assert ours.shape == psf.shape and ours.dtype == np.float32
    assert rel_err(ours, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# the deconvolution
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "psf_shape", "options"),
    [
        ((48, 37), (9, 9), {}),
        ((40, 53), (8, 10), {"wiener_alpha": 0.003, "butterworth_order": 6}),
        ((12, 30, 23), (7, 9, 9), {"cutoff": (0.15, 0.2, np.inf)}),
        ((10, 21, 18), (6, 8, 8), {"wiener_alpha": 0.2, "cutoff": 0.25}),
    ],
)
def test_wb_matches_reference(shape, psf_shape, options):
    image = make_image(shape)
    psf = gaussian_psf(psf_shape, [1.0 + 0.3 * i for i in range(len(shape))], [0.4] * len(shape))
    spec = resolve_back_projector(psf, "wiener-butterworth", **options)
    kernel = reference_wb_kernel(
        psf, spec.wiener_alpha, spec.butterworth_order, spec.cutoff, spec.beta
    )
    out = richardson_lucy(image, psf, 4, back_projector="wiener-butterworth", **options)
    ref = reference_wb_rl(image, psf, 4, kernel)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert rel_err(out, ref) < 1e-4
    # and it is not classic LR
    assert rel_err(richardson_lucy(image, psf, 4), ref) > 1e-2


def test_wb_sharpens_faster_than_classic():
    """Noise-free: two WB iterations (the paper's alpha 1e-3) beat 2 and 20 classic ones."""
    rng = np.random.default_rng(1)
    truth = np.zeros((96, 96))
    truth[tuple(rng.integers(10, 86, (2, 40)))] = 1.0
    truth = fftconvolve(truth, gaussian_psf((5, 5), (0.8, 0.8)), mode="same") + 0.05
    psf = gaussian_psf((21, 21), (2.5, 2.5))
    image = fftconvolve(truth, psf, mode="same").astype(np.float32)
    wb = richardson_lucy(image, psf, 2, back_projector="wiener-butterworth", wiener_alpha=1e-3)
    err = {
        "classic": float(np.abs(richardson_lucy(image, psf, 2) - truth).mean()),
        "wiener-butterworth": float(np.abs(wb - truth).mean()),
    }
    classic20 = float(np.abs(richardson_lucy(image, psf, 20) - truth).mean())
    assert err["wiener-butterworth"] < err["classic"]
    assert err["wiener-butterworth"] < classic20


@pytest.mark.parametrize("num_iter", [2, 5])
def test_chunked_wb_equals_whole_2d(psf2d, num_iter):
    image = smooth_volume((96, 128), seed=3)
    options = {"back_projector": "wiener-butterworth", "wiener_alpha": 0.01}
    whole = richardson_lucy(image, psf2d, num_iter, **options)
    lazy = deconvolve(image, psf2d, num_iter=num_iter, chunks=32, **options)
    assert lazy.numblocks == (3, 4)
    chunked = lazy.compute(scheduler="threads")
    assert float(np.abs(chunked - whole).max() / np.abs(whole).max()) < 1e-3


def test_chunked_wb_equals_whole_3d(volume3d, psf3d):
    options = {"back_projector": "wiener-butterworth", "wiener_alpha": 0.01}
    whole = richardson_lucy(volume3d, psf3d, 3, **options)
    lazy = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 24), **options)
    assert lazy.numblocks == (1, 2, 4)
    chunked = lazy.compute(scheduler="threads")
    assert float(np.abs(chunked - whole).max() / np.abs(whole).max()) < 1e-3


def test_plans_are_cached_per_back_projector():
    psf = gaussian_psf((9, 9), (1.5, 1.5))
    classic = get_plan(psf, (40, 40))
    spec = resolve_back_projector(psf, "wiener-butterworth")
    wb = get_plan(psf, (40, 40), back_projector=spec)
    assert wb is not classic and wb.back_projector.kind == "wiener-butterworth"
    same = resolve_back_projector(psf, "wiener-butterworth")  # equal, not the same object
    again = get_plan(psf, (40, 40), back_projector=same)
    assert again is wb
    assert BackProjector("classic").as_dict() == {"back_projector": "classic"}
    described = wb.back_projector.as_dict()
    assert described["back_projector"] == "wiener-butterworth"
    assert described["wiener_alpha"] == 0.05 and described["butterworth_beta"] == 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"back_projector": "wiener"},
            "unknown back projector 'wiener'; choose 'classic' or 'wiener-butterworth'",
        ),
        (
            {"wiener_alpha": 0.1},
            "wiener_alpha only apply to the Wiener-Butterworth back projector; "
            "pass back_projector='wiener-butterworth' or drop them",
        ),
        (
            {"back_projector": "wiener-butterworth", "wiener_alpha": 0},
            "wiener_alpha must be a finite number > 0, got 0.0",
        ),
        (
            {"back_projector": "wiener-butterworth", "butterworth_order": -2},
            "butterworth_order must be a finite number > 0, got -2.0",
        ),
        (
            {"back_projector": "wiener-butterworth", "cutoff": (0.1, 0.2, 0.3)},
            "cutoff must be one number or 2 numbers (cycles per pixel per axis), "
            "got (0.1, 0.2, 0.3)",
        ),
        (
            {"back_projector": "wiener-butterworth", "cutoff": -0.1},
            "cutoff must be > 0 cycles per pixel, got -0.1",
        ),
    ],
)
def test_bad_back_projector_parameters(kwargs, message):
    image = make_image((20, 20))
    with pytest.raises(ParameterError) as info:
        richardson_lucy(image, gaussian_psf((5, 5), (1, 1)), 2, **kwargs)
    assert str(info.value) == message


@pytest.mark.gpu
@pytest.mark.skipif(cupy_or_none() is None, reason="CuPy with a CUDA device is not available")
@pytest.mark.parametrize(("shape", "psf_shape"), [((64, 45), (9, 7)), ((16, 40, 33), (7, 9, 5))])
def test_wb_on_gpu_matches_cpu(shape, psf_shape):
    cp = cupy_or_none()
    image = make_image(shape)
    psf = gaussian_psf(psf_shape, [1.2] * len(shape))
    options = {"back_projector": "wiener-butterworth", "wiener_alpha": 0.01}
    cpu = richardson_lucy(image, psf, 3, **options)
    gpu = richardson_lucy(cp.asarray(image), psf, 3, **options)
    assert isinstance(gpu, cp.ndarray)
    assert rel_err(cp.asnumpy(gpu), cpu.astype(np.float64)) < 1e-4
