"""Tests of the Lucy-Richardson kernel against an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ssi_dask import lr
from ssi_dask.errors import InputError, ParameterError, PSFError
from ssi_dask.lr import LinearConvolver, RLPlan, convolve_same, get_plan, richardson_lucy


# ---------------------------------------------------------------------------------------------
# independent reference: direct linear convolutions on the extended object domain, float64
# ---------------------------------------------------------------------------------------------
def reference_rl(image, psf, num_iter, *, eps=1e-6, edge_threshold=1e-3):
    """Lucy-Richardson with Bertero-Boccacci edge weights, written with fftconvolve only.

    The object lives on an extended domain of ``N + K - 1`` samples per axis; the image is the
    'valid' part of the object's convolution with the PSF; back-projection is the 'full'
    convolution of the ratio with the flipped PSF.
    """
    y = np.asarray(image, dtype=np.float64)
    h = np.asarray(psf, dtype=np.float64)
    h = h / h.sum()
    h_flip = h[(slice(None, None, -1),) * h.ndim]
    ext_shape = tuple(n + k - 1 for n, k in zip(y.shape, h.shape, strict=True))
    # object sample j (image coordinates) sits at j + (K - 1 - (K - 1) // 2) on the extension
    crop = tuple(
        slice(k - 1 - (k - 1) // 2, k - 1 - (k - 1) // 2 + n)
        for n, k in zip(y.shape, h.shape, strict=True)
    )
    weights = fftconvolve(np.ones_like(y), h_flip, mode="full")
    keep = weights > edge_threshold * weights.max()
    inv_w = np.where(keep, 1.0 / np.where(keep, weights, 1.0), 0.0)
    x = np.full(ext_shape, y.mean())
    for _ in range(num_iter):
        blurred = fftconvolve(x, h, mode="valid")
        assert blurred.shape == y.shape
        ratio = y / np.maximum(blurred, eps)
        x = x * fftconvolve(ratio, h_flip, mode="full") * inv_w
    return x[crop]


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
    """Smooth positive structures plus bright points, blurred, non-negative."""
    rng = np.random.default_rng(seed)
    img = 0.2 + rng.random(shape)
    for _ in range(6):
        idx = tuple(rng.integers(0, n) for n in shape)
        img[idx] += 20.0
    return img.astype(np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------------------------
CASES_2D = [
    ((48, 37), (7, 7)),
    ((40, 53), (8, 6)),  # even PSF sizes
    ((33, 64), (9, 4)),
    ((20, 25), (31, 17)),  # PSF larger than the image on one axis
]
CASES_3D = [
    ((12, 30, 23), (5, 7, 9)),
    ((16, 21, 18), (6, 8, 4)),  # even PSF sizes
    ((9, 24, 26), (7, 6, 5)),
]


@pytest.mark.parametrize(("shape", "psf_shape"), CASES_2D + CASES_3D)
def test_matches_reference(shape, psf_shape):
    image = make_image(shape)
    # asymmetric PSF so that a flip or an off-by-one centring error would show
    psf = gaussian_psf(
        psf_shape, [1.0 + 0.3 * i for i in range(len(shape))], shift=[0.4] * len(shape)
    )
    out = richardson_lucy(image, psf, num_iter=10)
    ref = reference_rl(image, psf, 10)
    assert out.dtype == np.float32
    assert out.shape == image.shape
    assert rel_err(out, ref) < 1e-4


def test_matches_reference_random_psf_and_options():
    rng = np.random.default_rng(3)
    image = make_image((30, 41), seed=5)
    psf = rng.random((6, 9))
    out = richardson_lucy(image, psf, num_iter=15, eps=1e-3, edge_threshold=0.05)
    ref = reference_rl(image, psf, 15, eps=1e-3, edge_threshold=0.05)
    assert rel_err(out, ref) < 1e-4


def test_num_iter_zero_returns_mean():
    image = make_image((20, 30))
    out = richardson_lucy(image, gaussian_psf((5, 5), (1, 1)), num_iter=0)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, np.full(image.shape, image.mean()), rtol=1e-6)
    np.testing.assert_allclose(out, reference_rl(image, np.ones((5, 5)), 0), rtol=1e-6)


@pytest.mark.parametrize("shape", [(25, 31), (7, 12, 10)])
def test_delta_psf_leaves_image_unchanged(shape):
    image = make_image(shape)
    psf = np.ones((1,) * len(shape))
    np.testing.assert_allclose(richardson_lucy(image, psf, num_iter=5), image, rtol=1e-5)
    # a centred delta in a larger (odd) array is the same
    psf = np.zeros((5,) * len(shape))
    psf[(2,) * len(shape)] = 3.0
    np.testing.assert_allclose(richardson_lucy(image, psf, num_iter=5), image, rtol=1e-5)
    # even size: the centre is sample (K - 1) // 2, like fftconvolve(mode='same')
    psf = np.zeros((4,) * len(shape))
    psf[(1,) * len(shape)] = 1.0
    np.testing.assert_allclose(richardson_lucy(image, psf, num_iter=5), image, rtol=1e-5)


def test_positivity_and_flux():
    # bright structures away from the border on a zero background: the flux stays inside
    truth = np.zeros((64, 72), np.float64)
    truth[20:25, 30:34] = 5.0
    truth[40, 50] = 50.0
    truth[30:45, 15] = 3.0
    psf = gaussian_psf((15, 15), (2.0, 2.5))
    image = fftconvolve(truth, psf, mode="same").clip(0).astype(np.float32)
    out = richardson_lucy(image, psf, num_iter=30)
    assert np.all(np.isfinite(out))
    assert out.min() >= -1e-6 * out.max()
    assert abs(out.sum() - image.sum()) < 1e-3 * image.sum()
    # deconvolution sharpens: the peak grows, and it stays at the right place
    assert out.max() > 2 * image.max()
    assert np.unravel_index(np.argmax(out), out.shape) == (40, 50)


def test_clip_and_dtypes():
    image = (make_image((20, 22)) * 100).astype(np.uint16)
    psf = gaussian_psf((5, 5), (1, 1))
    out = richardson_lucy(image, psf, num_iter=3, clip=True)
    assert out.dtype == np.float32
    assert out.max() <= 1.0 and out.min() >= -1.0
    ref = richardson_lucy(image.astype(np.float64), psf.astype(np.float32), num_iter=3)
    np.testing.assert_allclose(np.clip(ref, -1, 1), out)


def test_single_thread_matches_default():
    image = make_image((9, 40, 33))
    psf = gaussian_psf((5, 6, 7), (1.0, 1.5, 1.2))
    np.testing.assert_allclose(
        richardson_lucy(image, psf, 5, workers=1), richardson_lucy(image, psf, 5), rtol=1e-5
    )


def test_plan_reuse_and_cache():
    lr.clear_plan_cache()
    psf = gaussian_psf((5, 7), (1, 2))
    a = make_image((30, 40), seed=1)
    b = make_image((30, 40), seed=2)
    plan = get_plan(psf, a.shape)
    assert isinstance(plan, RLPlan)
    assert get_plan(psf.copy(), a.shape) is plan
    assert get_plan(psf, (31, 40)) is not plan
    assert get_plan(psf, a.shape, edge_threshold=1e-2) is not plan
    np.testing.assert_array_equal(plan.deconvolve(b, 4), richardson_lucy(b, psf, 4))
    for n, k, m in zip(a.shape, psf.shape, plan.work_shape, strict=True):
        assert m >= n + k - 1
    with pytest.raises(InputError, match="shape"):
        plan.deconvolve(np.ones((3, 4)), 2)
    lr.clear_plan_cache()


# ---------------------------------------------------------------------------------------------
# convolve_same
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "psf_shape"),
    [((40, 33), (7, 5)), ((40, 33), (6, 8)), ((10, 21, 16), (5, 4, 7)), ((12, 9), (25, 30))],
)
def test_convolve_same_matches_fftconvolve(shape, psf_shape):
    rng = np.random.default_rng(1)
    image = rng.random(shape)
    psf = rng.random(psf_shape)
    out = convolve_same(image, psf)
    ref = fftconvolve(image, psf, mode="same")
    assert out.dtype == np.float32 and out.shape == image.shape
    assert rel_err(out, ref) < 1e-5


def test_correlate_is_adjoint_of_convolve():
    rng = np.random.default_rng(2)
    psf = rng.random((6, 5))
    conv = LinearConvolver(psf, (23, 30))
    a, b = rng.random((23, 30)), rng.random((23, 30))
    lhs = float(np.sum(conv.convolve(a).astype(np.float64) * b))
    rhs = float(np.sum(a * conv.correlate(b).astype(np.float64)))
    assert abs(lhs - rhs) < 1e-5 * abs(lhs)
    # for odd sizes, correlation == 'same' convolution with the flipped PSF
    psf_odd = rng.random((5, 7))
    out = LinearConvolver(psf_odd, (23, 30)).correlate(b)
    assert rel_err(out, fftconvolve(b, psf_odd[::-1, ::-1], mode="same")) < 1e-5


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------
def test_psf_ndim_mismatch():
    with pytest.raises(PSFError, match="the PSF has 3 dimensions but the image has 2"):
        richardson_lucy(np.ones((8, 8)), np.ones((3, 3, 3)))
    with pytest.raises(PSFError, match="the PSF has 2 dimensions but the image has 3"):
        convolve_same(np.ones((4, 8, 8)), np.ones((3, 3)))


@pytest.mark.parametrize(
    ("psf", "message"),
    [
        (np.zeros((3, 3)), "the PSF sums to zero"),
        (np.array([[1.0, -0.5], [0.2, 0.1]]), "the PSF has negative values"),
        (np.array([[1.0, np.nan], [0.2, 0.1]]), "NaN or infinite"),
        (np.ones((0, 3)), "the PSF is empty"),
        (np.ones((3, 3), dtype=complex), "real numbers"),
    ],
)
def test_bad_psf(psf, message):
    with pytest.raises(PSFError, match=message):
        richardson_lucy(np.ones((8, 8)), psf)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.ones(8), "2D or 3D array, got 1 dimensions"),
        (np.ones((2, 3, 4, 5)), "2D or 3D array, got 4 dimensions"),
        (np.ones((0, 4)), "the image is empty"),
        (np.ones((4, 4), dtype=complex), "not a real number type"),
        ([[1.0, 2.0], [3.0, 4.0]], "2D or 3D array, got no dimensions"),
    ],
)
def test_bad_image(image, message):
    with pytest.raises(InputError, match=message):
        richardson_lucy(image, np.ones((3, 3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_iter": -1}, "num_iter must be an integer >= 0, got -1"),
        ({"num_iter": 2.5}, "num_iter must be an integer >= 0, got 2.5"),
        ({"num_iter": True}, "num_iter must be an integer >= 0, got True"),
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": "x"}, "eps must be a number"),
        ({"edge_threshold": 0.0}, "edge_threshold must lie strictly between 0 and 1"),
        ({"edge_threshold": 1.5}, "edge_threshold must lie strictly between 0 and 1"),
        ({"workers": 0}, "workers must be a positive integer or -1"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        richardson_lucy(np.ones((8, 8)), np.ones((3, 3)), **kwargs)


def test_errors_are_project_errors():
    from ssi_dask.errors import SsiDaskError

    for exc in (InputError, PSFError, ParameterError):
        assert issubclass(exc, SsiDaskError)
