"""Tests of ssi_dask.bench.synthetic: degradation chain and ground truths."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from ssi_dask.bench import synthetic
from ssi_dask.bench.synthetic import (
    GROUND_TRUTH_2D_NAMES,
    add_poisson_gaussian_noise,
    add_salt_and_pepper,
    blur,
    degrade,
    ground_truth_2d,
    ground_truth_3d,
    load_ground_truth,
    normalise_ground_truth,
    quantise,
)
from ssi_dask.errors import InputError, ParameterError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import skimage.data._fetchers as fetchers

    monkeypatch.setattr(fetchers, "_fetch", refuse)


def _psf(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).random(shape) + 0.1
    return p / p.sum()


# ---------------------------------------------------------------------------------------------
# blur
# ---------------------------------------------------------------------------------------------


def test_blur_matches_fftconvolve_2d() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 50)).astype(np.float32)
    psf = _psf((7, 5))
    out = blur(image, psf)
    assert out.dtype == np.float32
    assert out.shape == image.shape
    expected = scipy.signal.fftconvolve(image.astype(np.float64), psf, mode="same")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    # ... and the direct (non-FFT) linear convolution
    direct = scipy.signal.convolve(image.astype(np.float64), psf, mode="same", method="direct")
    np.testing.assert_allclose(out, direct, rtol=1e-5, atol=1e-6)


def test_blur_matches_fftconvolve_3d() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((12, 16, 20))
    psf = _psf((5, 5, 5))
    out = blur(image, psf)
    expected = scipy.signal.fftconvolve(image, psf, mode="same")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_blur_interior_spot_keeps_flux_and_places_psf() -> None:
    image = np.zeros((31, 33))
    image[15, 12] = 2.0
    psf = _psf((5, 7), seed=3)
    out = blur(image, psf)
    assert float(out.sum()) == pytest.approx(2.0, rel=1e-6)
    # The PSF appears (unflipped) centred on the spot.
    np.testing.assert_allclose(out[13:18, 9:16], 2.0 * psf, rtol=1e-5, atol=1e-7)


def test_blur_zero_padding_at_edges() -> None:
    image = np.ones((10, 10))
    psf = np.full((3, 3), 1.0 / 9.0)
    out = blur(image, psf)
    assert out[0, 0] == pytest.approx(4.0 / 9.0, rel=1e-6)  # corner sees 4 of 9 pixels
    assert out[0, 5] == pytest.approx(6.0 / 9.0, rel=1e-6)  # edge sees 6 of 9
    assert out[5, 5] == pytest.approx(1.0, rel=1e-6)


def test_blur_rejects_dimension_mismatch() -> None:
    with pytest.raises(ParameterError):
        blur(np.zeros((8, 8)), np.ones((3, 3, 3)))


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
def test_noise_statistics(level: float) -> None:
    x = np.full((1000, 1000), level, dtype=np.float32)
    y = add_poisson_gaussian_noise(x, rng=123)
    assert y.dtype == np.float32
    d = y.astype(np.float64) - level
    variance = 0.001 * level + 0.1**2
    # Standard error of the mean: sqrt(var / 1e6) ~ 1e-4; of the variance: var * sqrt(2 / 1e6).
    assert abs(d.mean()) < 6 * np.sqrt(variance / d.size)
    assert d.var() == pytest.approx(variance, rel=0.01)


def test_noise_custom_parameters_and_negative_clip() -> None:
    x = np.full((500, 500), 0.4)
    y = add_poisson_gaussian_noise(x, rng=0, poisson_scale=0.05, gaussian_std=0.0)
    assert (y - x).var() == pytest.approx(0.05 * 0.4, rel=0.02)
    # Negative variance argument is clipped at 0: no noise, no NaN.
    neg = np.full((4, 4), -1.0)
    out = add_poisson_gaussian_noise(neg, rng=0, poisson_scale=1.0, gaussian_std=0.0)
    np.testing.assert_array_equal(out, neg.astype(np.float32))


def test_noise_reproducible() -> None:
    x = np.random.default_rng(0).random((32, 32))
    a = add_poisson_gaussian_noise(x, rng=5)
    b = add_poisson_gaussian_noise(x, rng=5)
    c = add_poisson_gaussian_noise(x, rng=6)
    d = add_poisson_gaussian_noise(x, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# salt and pepper
# ---------------------------------------------------------------------------------------------


def test_salt_and_pepper_fraction_and_values() -> None:
    x = np.full((200, 300), 2.0)  # outside [0, 1): every replaced pixel changes
    y = add_salt_and_pepper(x, rng=0, fraction=0.01)
    assert y.dtype == np.float32
    changed = y != 2.0
    assert int(changed.sum()) == round(0.01 * x.size)
    vals = y[changed]
    assert vals.min() >= 0.0
    assert vals.max() < 1.0
    assert vals.mean() == pytest.approx(0.5, abs=0.05)
    # input untouched
    assert np.all(x == 2.0)


def test_salt_and_pepper_reproducible_and_zero_fraction() -> None:
    x = np.full((50, 50), 2.0)
    a = add_salt_and_pepper(x, rng=1)
    np.testing.assert_array_equal(a, add_salt_and_pepper(x, rng=1))
    assert not np.array_equal(a, add_salt_and_pepper(x, rng=2))
    np.testing.assert_array_equal(add_salt_and_pepper(x, rng=1, fraction=0.0), x)
    with pytest.raises(ParameterError):
        add_salt_and_pepper(x, rng=1, fraction=1.5)


# ---------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------


def test_quantise_hand_values() -> None:
    y = np.array([0.1, 0.3, 0.62, 0.9])
    # round(4 y) / 4 = [0, 1, 2, 4] / 4
    np.testing.assert_array_equal(quantise(y, bits=2), np.array([0.0, 0.25, 0.5, 1.0], np.float32))


def test_quantise_grid_10_bits() -> None:
    y = np.random.default_rng(0).random((64, 64))
    q = quantise(y)
    assert q.dtype == np.float32
    scaled = q.astype(np.float64) * 1024
    np.testing.assert_array_equal(scaled, np.round(scaled))
    assert np.abs(q - y).max() <= 0.5 / 1024 + 1e-9


# ---------------------------------------------------------------------------------------------
# degrade
# ---------------------------------------------------------------------------------------------


def test_degrade_chain_matches_steps() -> None:
    x = ground_truth_2d("camera", size=96)
    psf = _psf((9, 9))
    out = degrade(x, psf, seed=3)
    rng = np.random.default_rng(3)
    y = blur(x, psf)
    y = add_poisson_gaussian_noise(y, rng)
    y = add_salt_and_pepper(y, rng, fraction=0.01)
    y = np.clip(quantise(y, bits=10), 0, 1)
    np.testing.assert_array_equal(out, y)
    assert out.dtype == np.float32
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    scaled = out.astype(np.float64) * 1024
    np.testing.assert_array_equal(scaled, np.round(scaled))


def test_degrade_seeded() -> None:
    x = ground_truth_2d("coins", size=64)
    psf = _psf((5, 5))
    np.testing.assert_array_equal(degrade(x, psf, seed=0), degrade(x, psf, seed=0))
    assert not np.array_equal(degrade(x, psf, seed=0), degrade(x, psf, seed=1))


def test_degrade_without_noise_is_blur() -> None:
    x = ground_truth_3d(shape=(16, 16, 16))
    psf = _psf((3, 3, 3))
    out = degrade(
        x, psf, seed=0, poisson_scale=0, gaussian_std=0, salt_and_pepper=0, bits=None, clip=False
    )
    np.testing.assert_array_equal(out, blur(x, psf))


# ---------------------------------------------------------------------------------------------
# ground truths
# ---------------------------------------------------------------------------------------------


def test_normalise_ground_truth() -> None:
    img = np.array([[10, 20], [30, 110]], dtype=np.uint8)
    out = normalise_ground_truth(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.1], [0.2, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(normalise_ground_truth(np.full((3, 3), 7)), np.zeros((3, 3)))
    with pytest.raises(InputError):
        normalise_ground_truth(np.array([np.nan, 1.0]))


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("name", GROUND_TRUTH_2D_NAMES)
def test_ground_truth_2d_all_names(name: str) -> None:
    img = ground_truth_2d(name)
    assert img.dtype == np.float32
    assert img.ndim == 2
    assert img.min() == 0.0 and img.max() == 1.0


@pytest.mark.usefixtures("no_network")
def test_ground_truth_2d_shapes_and_crop() -> None:
    assert ground_truth_2d("camera").shape == (512, 512)
    assert ground_truth_2d("coins").shape == (303, 384)
    assert ground_truth_2d("text").shape == (172, 448)
    full = ground_truth_2d("camera")
    crop = ground_truth_2d("camera", size=128)
    np.testing.assert_array_equal(crop, full[192:320, 192:320])
    assert ground_truth_2d("coins", size=(100, 50)).shape == (100, 50)
    with pytest.raises(ParameterError):
        ground_truth_2d("camera", size=1000)
    with pytest.raises(ParameterError):
        ground_truth_2d("no-such-image")


def test_ground_truth_2d_files_ship_with_skimage() -> None:
    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    for filename in synthetic._SKIMAGE_FILES.values():
        assert (data_dir / filename).is_file(), filename


@pytest.mark.usefixtures("no_network")
def test_ground_truth_2d_camera_matches_8bit_scaling() -> None:
    import imageio.v3 as iio
    import skimage

    raw = iio.imread(Path(skimage.__file__).parent / "data" / "camera.png")
    assert raw.dtype == np.uint8
    expected = (raw.astype(np.float32) - raw.min()) / (float(raw.max()) - raw.min())
    np.testing.assert_allclose(ground_truth_2d("camera"), expected, atol=1e-7)


def test_ground_truth_3d_demo() -> None:
    from skimage.data import binary_blobs

    vol = ground_truth_3d()
    assert vol.shape == (64, 64, 64)
    assert vol.dtype == np.float32
    assert set(np.unique(vol)) <= {0.0, 1.0}
    expected = binary_blobs(length=64, blob_size_fraction=0.1, n_dim=3, rng=1)
    np.testing.assert_array_equal(vol, expected.astype(np.float32))
    np.testing.assert_array_equal(vol, ground_truth_3d(seed=1))
    assert not np.array_equal(vol, ground_truth_3d(seed=2))
    assert 0.3 < vol.mean() < 0.7


def test_ground_truth_3d_shapes_and_smoothing() -> None:
    vol = ground_truth_3d(shape=(16, 24, 32))
    assert vol.shape == (16, 24, 32)
    assert ground_truth_3d(shape=20).shape == (20, 20, 20)
    smooth = ground_truth_3d(shape=32, smooth=True)
    assert smooth.dtype == np.float32
    assert smooth.min() >= 0.0 and smooth.max() <= 1.0
    assert np.any((smooth > 0.05) & (smooth < 0.95))  # soft edges
    binary = ground_truth_3d(shape=32)
    assert abs(float(smooth.mean()) - float(binary.mean())) < 0.02  # smoothing keeps mass
    with pytest.raises(ParameterError):
        ground_truth_3d(shape=(8, 8))


# ---------------------------------------------------------------------------------------------
# load_ground_truth
# ---------------------------------------------------------------------------------------------


def test_load_ground_truth_png_gray_and_rgb(tmp_path: Path) -> None:
    import imageio.v3 as iio
    from skimage.color import rgb2gray

    rng = np.random.default_rng(0)
    gray = rng.integers(5, 200, size=(20, 30), dtype=np.uint8)
    iio.imwrite(tmp_path / "gray.png", gray)
    out = load_ground_truth(tmp_path / "gray.png")
    np.testing.assert_allclose(out, normalise_ground_truth(gray), atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0

    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    out_rgb = load_ground_truth(tmp_path / "rgb.png")
    assert out_rgb.shape == (20, 30)
    np.testing.assert_allclose(out_rgb, normalise_ground_truth(rgb2gray(rgb)), atol=1e-6)


def test_load_ground_truth_tiff_stack(tmp_path: Path) -> None:
    import tifffile

    stack = np.random.default_rng(1).integers(0, 4096, size=(6, 10, 12), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    out = load_ground_truth(tmp_path / "stack.tif")
    assert out.shape == (6, 10, 12)
    np.testing.assert_allclose(out, normalise_ground_truth(stack), atol=1e-7)


def test_load_ground_truth_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        load_ground_truth(tmp_path / "nope.png")


def test_offset_condition_is_scored_on_the_truths_scale() -> None:
    """The offset condition's data are ``0.15 + 0.7 * blurred``: its restorations are mapped
    back to the truth's scale before scoring (issue 16), so an input without blur and noise
    scores as the truth itself, not as a 0.15 + 0.7 affine copy of it."""
    from ssi_dask.bench.metrics import psnr
    from ssi_dask.bench.protocol import degrade_condition, run_protocol, to_truth_units

    truth = ground_truth_2d("camera", size=64)
    delta = np.zeros((3, 3), np.float32)
    delta[1, 1] = 1
    data, psf = degrade_condition(truth, delta, "offset", seed=0)
    assert psf is delta
    np.testing.assert_allclose(data.mean(), 0.15 + 0.7 * truth.mean(), atol=0.01)
    mapped = to_truth_units(data, "offset")
    np.testing.assert_allclose(mapped, np.clip((data - 0.15) / 0.7, 0, 1), rtol=1e-6)
    assert psnr(truth, mapped) > psnr(truth, np.clip(data, 0, 1)) + 2
    result = run_protocol(truth, delta, lr_iterations=(1,), ssi=False, condition="offset")
    assert result.metrics["input"]["psnr"] == pytest.approx(psnr(truth, mapped), abs=1e-6)
    # LR with a delta PSF leaves the data as they are
    assert result.metrics["lr-1"]["psnr"] == pytest.approx(psnr(truth, mapped), abs=0.05)
    # the other conditions are only clipped
    low, _ = degrade_condition(truth, delta, "low-noise", seed=0)
    np.testing.assert_array_equal(to_truth_units(low, "low-noise"), np.clip(low, 0, 1))
