"""The Lucy-Richardson kernel on CuPy gives the NumPy results (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ssi_dask._backend import cupy_or_none
from ssi_dask.lr import RLPlan, convolve_same, get_plan, richardson_lucy

cp = cupy_or_none()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cp is None, reason="CuPy with a CUDA device is not available"),
]


def _gaussian(shape, sigmas):
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 + 0.3 for n in shape], indexing="ij")
    psf = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigmas, strict=True)))
    return (psf / psf.sum()).astype(np.float32)


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = 0.5 + rng.random(shape)
    img[tuple(rng.integers(0, n, 5) for n in shape)] += 30
    return img.astype(np.float32)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    ("shape", "psf_shape"),
    [((64, 45), (9, 7)), ((40, 50), (8, 6)), ((16, 40, 33), (7, 9, 5)), ((12, 30, 28), (6, 4, 8))],
)
def test_cupy_matches_numpy(shape, psf_shape):
    image = _image(shape)
    psf = _gaussian(psf_shape, [1.2, 1.5, 1.0][: len(shape)])
    ref = richardson_lucy(image, psf, num_iter=10)
    out = richardson_lucy(cp.asarray(image), psf, num_iter=10)
    assert isinstance(out, cp.ndarray)
    assert out.dtype == cp.float32 and out.shape == image.shape
    assert _rel(out.get(), ref) < 1e-4
    # a PSF already on the device works too
    out2 = richardson_lucy(cp.asarray(image), cp.asarray(psf), num_iter=10)
    assert _rel(out2.get(), ref) < 1e-4


def test_cupy_convolve_same():
    rng = np.random.default_rng(0)
    image = rng.random((20, 31, 26)).astype(np.float32)
    psf = rng.random((5, 6, 7)).astype(np.float32)
    out = convolve_same(cp.asarray(image), psf)
    assert isinstance(out, cp.ndarray)
    assert _rel(out.get(), fftconvolve(image.astype(np.float64), psf, mode="same")) < 1e-5


def test_cupy_plan_is_cached_per_module():
    psf = _gaussian((5, 5), (1.0, 1.0))
    gpu_plan = get_plan(psf, (32, 32), xp=cp)
    assert isinstance(gpu_plan, RLPlan)
    assert isinstance(gpu_plan.otf, cp.ndarray)
    assert get_plan(psf, (32, 32), xp=cp) is gpu_plan
    assert get_plan(psf, (32, 32)) is not gpu_plan
