"""Self-supervised signal-to-noise estimate and the per-image ("auto") null-space weight."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ssi_dask.errors import ParameterError
from ssi_dask.ssi import train_ssi
from ssi_dask.ssi.forward import PSFOperator
from ssi_dask.ssi.train import estimate_signal_to_noise


def _psf(n=9, sigma=1.5):
    r = np.arange(n) - n // 2
    g = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _patches(signal_amp, noise_std, n=64, side=48, seed=0):
    """Blurred white 'signal' plus white noise, patch by patch."""
    rng = np.random.default_rng(seed)
    sig = np.stack(
        [fftconvolve(rng.standard_normal((side, side)), _psf(), "same") for _ in range(n)]
    )
    return signal_amp * sig + noise_std * rng.standard_normal((n, side, side))


def test_snr_of_pure_noise_is_zero():
    op = PSFOperator(_psf())
    rng = np.random.default_rng(1)
    assert estimate_signal_to_noise(rng.standard_normal((64, 48, 48)), op) == 0.0


def test_snr_scales_with_signal_power_and_not_with_units():
    op = PSFOperator(_psf())
    weak = estimate_signal_to_noise(_patches(1.0, 0.05), op)
    strong = estimate_signal_to_noise(_patches(2.0, 0.05), op)
    # the noise floor is measured where the PSF transmits nothing, so doubling the signal
    # amplitude multiplies the ratio by four (up to the "-1" and sampling)
    assert weak > 5
    assert strong / weak == pytest.approx(4.0, rel=0.1)
    scaled = estimate_signal_to_noise(1000.0 * _patches(1.0, 0.05), op)
    assert scaled == pytest.approx(weak, rel=1e-6)


def test_snr_without_noise_only_frequencies_is_infinite():
    delta = np.zeros((3, 3), np.float32)
    delta[1, 1] = 1
    op = PSFOperator(delta)
    assert estimate_signal_to_noise(_patches(1.0, 0.05), op) == float("inf")


def _image(noise_std, seed=0):
    rng = np.random.default_rng(seed)
    gt = np.zeros((96, 96), np.float32)
    for _ in range(25):
        y, x = rng.integers(4, 84), rng.integers(4, 84)
        gt[y : y + rng.integers(3, 9), x : x + rng.integers(3, 9)] = rng.uniform(0.4, 1)
    y = fftconvolve(gt, _psf(), mode="same") + noise_std * rng.standard_normal(gt.shape)
    return y.astype(np.float32)


# the network without a Lucy-Richardson prior: with one, "auto" means no penalty (below)
FAST = dict(steps=2, patch_size=32, batch_size=4, levels=2, base_channels=4, restarts=0, lr_prior=0)


def test_auto_null_space_weight_follows_the_measured_snr():
    clean = train_ssi(_image(0.01), _psf(), seed=0, **FAST).training
    noisy = train_ssi(_image(0.1), _psf(), seed=0, **FAST).training
    for t in (clean, noisy):
        assert t["null_space_weight"] == pytest.approx(
            min(t["null_space_scale"] / max(t["signal_to_noise"], 2.0) ** 2, 0.1)
        )
    # ten times the noise std: about 100x lower SNR, so a much stronger penalty
    assert noisy["signal_to_noise"] < clean["signal_to_noise"] / 20
    assert noisy["null_space_weight"] > 20 * clean["null_space_weight"]


def test_explicit_null_space_weight_is_used_as_given():
    t = train_ssi(_image(0.05), _psf(), seed=0, null_space_weight=0.07, **FAST).training
    assert t["null_space_weight"] == 0.07 and t["signal_to_noise"] is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("high", "null_space_weight must be a number >= 0 or 'auto', got 'high'"),
        (-0.1, "null_space_weight must be >= 0, got -0.1"),
    ],
)
def test_bad_null_space_weight(value, message):
    with pytest.raises(ParameterError) as err:
        train_ssi(_image(0.05), _psf(), null_space_weight=value, **FAST)
    assert str(err.value) == message


def test_auto_null_space_weight_is_capped():
    t = train_ssi(_image(0.1), _psf(), seed=0, null_space_max=0.002, **FAST).training
    uncapped = t["null_space_scale"] / max(t["signal_to_noise"], 2.0) ** 2
    assert uncapped > 0.002 and t["null_space_weight"] == 0.002
    assert t["null_space_max"] == 0.002


def test_auto_null_space_weight_is_zero_with_a_prior():
    # the prior supplies what the PSF barely transmits: "auto" turns the penalty off, and an
    # explicit weight is still used as given
    options = dict(FAST, lr_prior=3)
    t = train_ssi(_image(0.1), _psf(), seed=0, **options).training
    assert t["null_space_weight"] == 0.0 and t["signal_to_noise"] is None
    t = train_ssi(_image(0.1), _psf(), seed=0, null_space_weight=0.05, **options).training
    assert t["null_space_weight"] == 0.05
