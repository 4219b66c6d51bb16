"""Tests of ssi_dask.bench.metrics against hand-computed values and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
from skimage.metrics import (
    normalized_mutual_information,
    peak_signal_noise_ratio,
    structural_similarity,
)

from ssi_dask.bench.metrics import (
    all_metrics,
    mutual_information,
    psnr,
    spectral_mutual_information,
    ssim,
)


def _reference_nmi(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """Independent MI / joint entropy via numpy.histogram2d (each image over its own range)."""
    counts, _, _ = np.histogram2d(
        a.ravel(),
        b.ravel(),
        bins=bins,
        range=[[a.min(), a.max()], [b.min(), b.max()]],
    )
    p = counts / counts.sum()
    px = p.sum(axis=1)
    py = p.sum(axis=0)
    h_xy = -sum(v * math.log(v) for v in p.ravel() if v > 0)
    h_x = -sum(v * math.log(v) for v in px if v > 0)
    h_y = -sum(v * math.log(v) for v in py if v > 0)
    return (h_x + h_y - h_xy) / h_xy


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    yy, xx = np.mgrid[0:64, 0:80]
    clean = 0.5 + 0.4 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    noisy = clean + 0.1 * rng.standard_normal(clean.shape)
    return clean, noisy


# ---------------------------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------------------------


def test_psnr_known_mse() -> None:
    ref = np.zeros((8, 8))
    img = np.full((8, 8), 0.1)  # MSE = 0.01 -> 20 dB
    assert psnr(ref, img) == pytest.approx(20.0, abs=1e-9)
    # data range 2 adds 20 log10(2) dB
    assert psnr(ref, img, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-9)


def test_psnr_identical_is_inf() -> None:
    a = np.random.default_rng(0).random((5, 5))
    assert psnr(a, a) == math.inf


def test_psnr_matches_skimage(pair) -> None:
    clean, noisy = pair
    expected = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    assert psnr(clean, noisy) == pytest.approx(expected, rel=1e-12)


def test_psnr_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        psnr(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        psnr(np.zeros((3, 3)), np.zeros((3, 3)), data_range=0)
    with pytest.raises(ValueError):
        psnr(np.zeros((3, 3)), np.full((3, 3), np.nan))


# ---------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------


def test_ssim_identical_is_one(pair) -> None:
    clean, _ = pair
    assert ssim(clean, clean) == pytest.approx(1.0)


def test_ssim_constant_images_hand_value() -> None:
    # Zero variances: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = (0.01 L)^2.
    a = np.full((16, 16), 0.2)
    b = np.full((16, 16), 0.6)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_skimage_2d(pair, data_range) -> None:
    clean, noisy = pair
    expected = structural_similarity(clean, noisy, win_size=7, data_range=data_range)
    assert ssim(clean, noisy, data_range=data_range) == pytest.approx(expected, rel=1e-12)


def test_ssim_matches_skimage_3d() -> None:
    rng = np.random.default_rng(3)
    clean = rng.random((12, 14, 16))
    noisy = clean + 0.2 * rng.standard_normal(clean.shape)
    expected = structural_similarity(clean, noisy, win_size=7, data_range=1.0)
    assert ssim(clean, noisy) == pytest.approx(expected, rel=1e-12)


def test_ssim_data_range_two_is_higher(pair) -> None:
    clean, noisy = pair
    assert ssim(clean, noisy, data_range=2.0) > ssim(clean, noisy, data_range=1.0)


def test_ssim_rejects_small_image_and_even_window() -> None:
    with pytest.raises(ValueError):
        ssim(np.zeros((5, 20)), np.zeros((5, 20)))
    with pytest.raises(ValueError):
        ssim(np.zeros((20, 20)), np.zeros((20, 20)), win_size=6)


# ---------------------------------------------------------------------------------------------
# Mutual information
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [2, 256])
def test_mi_hand_computed_two_by_two(bins) -> None:
    # Joint probabilities [[1/4, 1/4], [0, 1/2]]: MI = 3/4 ln(4/3), H(A,B) = 3/2 ln 2.
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [1.0, 1.0]])
    expected = 0.75 * math.log(4 / 3) / (1.5 * math.log(2))  # = 0.5 * log2(4/3)
    assert mutual_information(a, b, bins=bins) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.5 * math.log2(4 / 3))


def test_mi_identical_is_one(pair) -> None:
    clean, noisy = pair
    assert mutual_information(clean, clean) == pytest.approx(1.0, abs=1e-12)
    assert mutual_information(noisy, noisy) == pytest.approx(1.0, abs=1e-12)


def test_mi_invariant_to_increasing_affine_map(pair) -> None:
    _, noisy = pair
    # Each image is binned over its own range, so y = 2x + 3 has the same bins (up to rounding).
    assert mutual_information(noisy, 2.0 * noisy + 3.0) == pytest.approx(1.0, abs=1e-9)


def test_mi_independent_is_near_zero() -> None:
    rng = np.random.default_rng(7)
    a = rng.random((1000, 1000))
    b = rng.random((1000, 1000))
    # Plug-in bias is about (bins - 1)^2 / (2 N) nats: tiny with 16 bins and 10^6 samples.
    assert mutual_information(a, b, bins=16) < 1e-3
    assert mutual_information(a, b) < 0.01


def test_mi_is_symmetric(pair) -> None:
    clean, noisy = pair
    assert mutual_information(clean, noisy) == pytest.approx(
        mutual_information(noisy, clean), rel=1e-12
    )


def test_mi_matches_histogram2d_reference(pair) -> None:
    clean, noisy = pair
    for bins in (8, 64, 256):
        expected = _reference_nmi(clean, noisy, bins)
        assert mutual_information(clean, noisy, bins=bins) == pytest.approx(expected, rel=1e-9)


def test_mi_relation_to_skimage_nmi(pair) -> None:
    # skimage returns (H(A) + H(B)) / H(A, B); ours is I(A; B) / H(A, B) = that - 1.
    clean, noisy = pair
    expected = normalized_mutual_information(clean, noisy, bins=256) - 1.0
    assert mutual_information(clean, noisy) == pytest.approx(expected, rel=1e-9)


def test_mi_decreases_with_noise(pair) -> None:
    clean, noisy = pair
    noisier = noisy + 0.3 * np.random.default_rng(1).standard_normal(noisy.shape)
    assert 0 < mutual_information(clean, noisier) < mutual_information(clean, noisy) < 1


def test_mi_constant_images_give_zero() -> None:
    const = np.full((10, 10), 0.3)
    other = np.random.default_rng(0).random((10, 10))
    assert mutual_information(const, other) == 0.0
    assert mutual_information(other, const) == 0.0
    assert mutual_information(const, const) == 0.0


def test_mi_3d(pair) -> None:
    rng = np.random.default_rng(5)
    a = rng.random((10, 12, 14))
    assert mutual_information(a, a) == pytest.approx(1.0)
    b = a + 0.1 * rng.standard_normal(a.shape)
    assert mutual_information(a, b) == pytest.approx(_reference_nmi(a, b, 256), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Spectral mutual information
# ---------------------------------------------------------------------------------------------


def test_smi_identical_is_one(pair) -> None:
    clean, noisy = pair
    assert spectral_mutual_information(clean, clean) == pytest.approx(1.0, abs=1e-12)
    assert spectral_mutual_information(noisy, noisy) == pytest.approx(1.0, abs=1e-12)


def test_smi_invariant_to_positive_scaling(pair) -> None:
    # L2 normalisation removes the scale: SMI(x, 5x) = 1.
    _, noisy = pair
    assert spectral_mutual_information(noisy, 5.0 * noisy) == pytest.approx(1.0, abs=1e-9)


def test_smi_matches_independent_computation(pair) -> None:
    clean, noisy = pair

    def spectrum(x: np.ndarray) -> np.ndarray:
        return scipy.fft.dctn(x / np.sqrt(np.sum(x**2)), type=2, norm=None)

    expected = _reference_nmi(spectrum(clean), spectrum(noisy), 256)
    assert spectral_mutual_information(clean, noisy) == pytest.approx(expected, rel=1e-9)


def test_smi_uses_unnormalised_dct_with_dc() -> None:
    # The DC coefficient of a positive image is by far the largest: it is part of the binned
    # range. Dropping it, or using the orthonormal DCT (which rescales the first row/column),
    # gives a different value.
    rng = np.random.default_rng(11)
    a = rng.random((16, 16))
    b = a + 0.3 * rng.random((16, 16))
    value = spectral_mutual_information(a, b)
    assert 0.0 < value < 1.0

    def spectrum(x: np.ndarray, norm: str | None) -> np.ndarray:
        return scipy.fft.dctn(x / np.linalg.norm(x), type=2, norm=norm)

    assert value == pytest.approx(_reference_nmi(spectrum(a, None), spectrum(b, None), 256))
    no_dc = _reference_nmi(spectrum(a, None).ravel()[1:], spectrum(b, None).ravel()[1:], 256)
    ortho = _reference_nmi(spectrum(a, "ortho"), spectrum(b, "ortho"), 256)
    assert value != pytest.approx(no_dc, rel=1e-6)
    assert value != pytest.approx(ortho, rel=1e-6)
    # All-zero image: constant (zero) spectrum -> 0.
    assert spectral_mutual_information(np.zeros((8, 8)), a[:8, :8]) == 0.0


def test_smi_3d() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((8, 9, 10))
    assert spectral_mutual_information(a, a) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# all_metrics
# ---------------------------------------------------------------------------------------------


def test_all_metrics_keys_and_values(pair) -> None:
    clean, noisy = pair
    out = all_metrics(clean, noisy)
    assert set(out) == {"psnr", "ssim", "mi", "smi"}
    assert all(isinstance(v, float) for v in out.values())
    c = np.clip(clean, 0, 1)
    n = np.clip(noisy, 0, 1)
    assert out["psnr"] == pytest.approx(psnr(c, n))
    assert out["ssim"] == pytest.approx(ssim(c, n, data_range=1.0))
    assert out["mi"] == pytest.approx(mutual_information(c, n))
    assert out["smi"] == pytest.approx(spectral_mutual_information(c, n))


def test_all_metrics_clips_inputs() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((16, 16))
    img = ref + 5.0  # clipped to all ones
    out = all_metrics(ref, img)
    assert out["psnr"] == pytest.approx(psnr(ref, np.ones_like(ref)))
    assert out["mi"] == 0.0  # constant after clipping
    # The reference is clipped too.
    out2 = all_metrics(ref * 3 - 1, ref)
    assert out2["psnr"] == pytest.approx(psnr(np.clip(ref * 3 - 1, 0, 1), ref))


def test_all_metrics_ssim_data_range(pair) -> None:
    clean, noisy = pair
    c = np.clip(clean, 0, 1)
    n = np.clip(noisy, 0, 1)
    out = all_metrics(clean, noisy, ssim_data_range=2.0)
    assert out["ssim"] == pytest.approx(structural_similarity(c, n, win_size=7, data_range=2.0))
