"""The detector's clipping in the SSI forward model (ssi_dask.ssi.sensor and its use)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve
from scipy.stats import norm

from ssi_dask.errors import ParameterError
from ssi_dask.ssi import predict, train_ssi
from ssi_dask.ssi.sensor import ClippedSensor, detect_clip_bounds, estimate_noise_model


def _expected_by_integration(s, lower, upper, gain, floor):
    """E[clip(s + sigma Z)] by numerical quadrature over the normal density."""
    sigma = math.sqrt(gain * s + floor)
    lo = -math.inf if lower is None else lower
    hi = math.inf if upper is None else upper

    def integrand(z):
        return min(max(s + sigma * z, lo), hi) * norm.pdf(z)

    kinks = [(b - s) / sigma for b in (lower, upper) if b is not None]
    value, _ = integrate.quad(integrand, -12, 12, points=kinks, limit=200)
    return value


@pytest.mark.parametrize(
    "lower, upper", [(0.0, 1.0), (0.0, None), (None, 1.0)], ids=["both", "lower", "upper"]
)
def test_expectation_matches_numerical_integration(lower, upper):
    sensor = ClippedSensor(lower, upper, gain=0.004, floor=0.01)
    s = np.array([0.0, 0.02, 0.1, 0.3, 0.5, 0.8, 0.97, 1.0], dtype=np.float32)
    got = sensor.expectation(torch.from_numpy(s)).numpy()
    want = [_expected_by_integration(float(v), lower, upper, 0.004, 0.01) for v in s]
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_expectation_far_from_the_bounds_is_the_signal_and_is_differentiable():
    sensor = ClippedSensor(0.0, 1.0, gain=0.0, floor=1e-4)  # sigma 0.01
    s = torch.tensor([0.3, 0.5, 0.7], requires_grad=True)
    out = sensor.expectation(s)
    torch.testing.assert_close(out, s.detach(), atol=1e-6, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(s.grad, torch.ones(3), atol=1e-5, rtol=0)
    # at the lower bound the clipped noise's mean is sigma * phi(0) = sigma / sqrt(2 pi)
    at_floor = ClippedSensor(0.0, None, 0.0, 0.01).expectation(torch.zeros(1))
    assert float(at_floor) == pytest.approx(0.1 / math.sqrt(2 * math.pi), rel=1e-5)


def test_detect_clip_bounds():
    rng = np.random.default_rng(0)
    dark = rng.normal(0.1, 0.1, 100_000)
    bright = rng.normal(0.9, 0.1, 100_000)
    assert detect_clip_bounds(np.clip(dark, 0, 1)) == (0.0, None)
    assert detect_clip_bounds(np.clip(bright, 0, 1)) == (None, 1.0)
    assert detect_clip_bounds(np.clip(np.concatenate([dark, bright]), 0, 1)) == (0.0, 1.0)
    # quantised (10 bits) and clipped, as in the benchmark protocol
    assert detect_clip_bounds(np.clip(np.round(1024 * dark) / 1024, 0, 1)) == (0.0, None)
    # unclipped: continuous, or integer counts whose tails thin out towards min and max
    assert detect_clip_bounds(dark) == (None, None)
    assert detect_clip_bounds(rng.poisson(30, 100_000).astype(np.float32)) == (None, None)
    # a handful of values at the minimum is not clipping
    few = np.clip(rng.normal(4.0, 1.0, 100_000), 0, None)  # ~3 values at 0
    assert detect_clip_bounds(few) == (None, None)


def _smooth_field(shape, rng, lo=0.05, hi=0.9):
    f = gaussian_filter(rng.standard_normal(shape), 6)
    return lo + (hi - lo) * (f - f.min()) / (f.max() - f.min())


@pytest.mark.parametrize("ndim", [2, 3])
def test_noise_model_recovers_poisson_gaussian_noise(ndim):
    rng = np.random.default_rng(1)
    gain, floor = 0.004, 0.0025  # sigma 0.05 at 0, 0.08 at 0.9
    shape = (24, 96, 96) if ndim == 2 else (6, 48, 48, 48)
    signal = np.stack([_smooth_field(shape[1:], rng) for _ in range(shape[0])])
    noisy = signal + np.sqrt(gain * signal + floor) * rng.standard_normal(shape)
    # 1 % salt-and-pepper and clipping at 0: neither should move the estimate much
    hit = rng.random(shape) < 0.01
    noisy[hit] = rng.random(int(hit.sum()))
    noisy = np.clip(noisy, 0, None)
    est_gain, est_floor = estimate_noise_model(noisy, lower=0.0)
    assert est_gain == pytest.approx(gain, rel=0.25)
    assert est_floor == pytest.approx(floor, rel=0.25)


def test_noise_model_on_a_mostly_clipped_image():
    """Sparse beads on a background clipped at 0: hardly a block is free of clipped pixels, so
    the noise is measured in the clipped background itself (censored blocks)."""
    rng = np.random.default_rng(3)
    truth = np.zeros((4, 128, 128))
    for plane in truth:
        for _ in range(40):
            y, x = rng.integers(2, 126, size=2)
            plane[y - 2 : y + 2, x - 2 : x + 2] = rng.uniform(0.4, 1.0)
    signal = np.stack([gaussian_filter(p, 1.5) for p in truth])
    floor = 0.08**2
    noisy = np.clip(
        signal + np.sqrt(0.002 * signal + floor) * rng.standard_normal(signal.shape), 0, 1
    )
    hit = rng.random(noisy.shape) < 0.01
    noisy[hit] = rng.random(int(hit.sum()))
    assert (noisy == 0).mean() > 0.35
    clipped_near = gaussian_filter((noisy == 0).astype(float), 1) > 0
    free_blocks = ~clipped_near[:, 1:-1, 1:-1][:, :120, :120].reshape(4, 15, 8, 15, 8).any((2, 4))
    assert free_blocks.sum() < 10  # the residual way alone would have nothing to fit
    est_gain, est_floor = estimate_noise_model(noisy, lower=0.0)
    assert math.sqrt(est_floor) == pytest.approx(0.08, rel=0.15)
    assert est_gain < 0.02


def _clipped_scene(seed=0):
    """Bright blobs on a black background, blurred, noise std 0.1, clipped at 0 and 1."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((128, 128), np.float32)
    for _ in range(30):
        y, x = rng.integers(4, 116), rng.integers(4, 116)
        gt[y : y + rng.integers(3, 9), x : x + rng.integers(3, 9)] = rng.uniform(0.5, 1)
    r = np.arange(7) - 3
    psf = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 1.5**2))
    psf = (psf / psf.sum()).astype(np.float32)
    y = fftconvolve(gt, psf, mode="same") + 0.1 * rng.standard_normal(gt.shape)
    return gt, psf, np.clip(y, 0, 1).astype(np.float32)


TRAIN = dict(
    steps=150, patch_size=48, batch_size=8, levels=2, base_channels=8, eval_every=50, restarts=0
)


def test_training_models_the_clipping_and_removes_the_background_bias():
    gt, psf, y = _clipped_scene()
    background = gt == 0
    background &= gaussian_filter(gt, 4) == 0  # far from any blob
    assert (y == 0).mean() > 0.2  # heavily clipped data: the case this is for
    # the clipped noise has a positive mean where the truth is 0
    assert y[background].mean() > 0.03

    modelled = train_ssi(y, psf, seed=0, **TRAIN)
    plain = train_ssi(y, psf, seed=0, sensor_clipping=None, **TRAIN)
    sensor = modelled.training["sensor"]
    assert sensor["lower_raw"] == pytest.approx(0.0, abs=1e-6)
    assert sensor["upper_raw"] is None  # 0.02 % of the pixels reach 1: below the 0.1 % rule
    assert math.sqrt(sensor["floor"]) * modelled.normalisation["scale"] == pytest.approx(
        0.1, rel=0.25
    )
    assert plain.training["sensor"] is None

    bias_modelled = float(predict(modelled, y)[background].mean())
    bias_plain = float(predict(plain, y)[background].mean())
    assert bias_plain > 0.02  # the plain forward model restores the clipped noise's mean
    assert bias_modelled < 0.5 * bias_plain


def test_explicit_bounds_and_bad_values():
    gt, psf, y = _clipped_scene(seed=1)
    fast = dict(TRAIN, steps=5, eval_every=5)
    model = train_ssi(y, psf, seed=0, sensor_clipping=(0.0, None), **fast)
    assert model.training["sensor"]["lower_raw"] == pytest.approx(0.0, abs=1e-6)
    assert model.training["sensor"]["upper"] is None
    with pytest.raises(ParameterError, match=r"^sensor_clipping must be 'auto', None or"):
        train_ssi(y, psf, sensor_clipping="yes", **fast)
    with pytest.raises(ParameterError, match=r"^sensor_clipping needs lower < upper"):
        train_ssi(y, psf, sensor_clipping=(1.0, 0.0), **fast)
