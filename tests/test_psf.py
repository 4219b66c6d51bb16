"""PSF loading, validation, normalisation, cropping and generation from optics."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from ssi_dask.errors import PSFError
from ssi_dask.psf import (
    crop_psf,
    describe_psf,
    load_psf,
    normalize_psf,
    protocol_psf,
    validate_psf,
    widefield_psf,
)


def blob(shape=(9, 11, 11), sigma=1.5):
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    return np.exp(-sum(g.astype(float) ** 2 for g in grids) / (2 * sigma**2)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".npy", ".zarr"])
def test_load_every_format_normalises(tmp_path, suffix):
    kernel = 5.0 * blob()
    path = tmp_path / f"psf{suffix}"
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, kernel)
    elif suffix == ".npy":
        np.save(path, kernel)
    else:
        zarr.create_array(store=str(path), shape=kernel.shape, dtype="float32")[...] = kernel
    psf = load_psf(path, ndim=3, crop=False)
    assert psf.dtype == np.float32 and psf.shape == kernel.shape
    assert abs(float(psf.sum()) - 1.0) < 1e-6
    np.testing.assert_allclose(psf, kernel / kernel.sum(), rtol=1e-6)


def test_load_squeezes_singleton_axes(tmp_path):
    np.save(tmp_path / "p.npy", blob((1, 9, 9)))
    assert load_psf(tmp_path / "p.npy", ndim=2).shape == (9, 9)


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (np.array([[np.nan, 1.0], [1.0, 1.0]]), "contains NaN or Inf"),
        (np.array([[-1.0, 1.0], [1.0, 1.0]]), "has negative values"),
        (np.zeros((3, 3)), "sums to zero"),
        (np.zeros((0, 3)), "is empty"),
        (np.array([["a"]]), "must hold real numbers"),
    ],
)
def test_validation_messages(kernel, message):
    with pytest.raises(PSFError, match=message):
        validate_psf(kernel)


def test_wrong_dimensionality_and_bad_files(tmp_path):
    with pytest.raises(PSFError, match="has 2 dimensions but the image has 3; give a 3D PSF"):
        validate_psf(np.ones((3, 3)), 3)
    with pytest.raises(PSFError, match="does not exist"):
        load_psf(tmp_path / "missing.tif")
    (tmp_path / "psf.txt").write_text("1 2 3")
    with pytest.raises(PSFError, match="unsupported type '.txt'"):
        load_psf(tmp_path / "psf.txt")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(PSFError, match="could not be read"):
        load_psf(tmp_path / "broken.tif")


def test_crop_keeps_the_peak_centred():
    kernel = np.zeros((21, 25), np.float32)
    kernel[8:13, 10:17] = blob((5, 7), 1.0)
    cropped = crop_psf(kernel, threshold=1e-3)
    assert cropped.shape[0] % 2 == 1 and cropped.shape[1] % 2 == 1
    centre = tuple(s // 2 for s in cropped.shape)
    assert np.unravel_index(cropped.argmax(), cropped.shape) == centre
    assert cropped.sum() == pytest.approx(kernel.sum(), rel=1e-3)
    assert cropped.shape[0] < 21 and cropped.shape[1] < 25


def test_widefield_psf_from_optics():
    psf = widefield_psf((17, 17, 17), (0.2, 0.1, 0.1), na=1.0, wavelength=0.5)
    assert psf.shape == (17, 17, 17) and abs(float(psf.sum()) - 1) < 1e-5
    assert np.unravel_index(psf.argmax(), psf.shape) == (8, 8, 8)
    np.testing.assert_allclose(psf, psf[:, ::-1, :], atol=1e-6)  # symmetric laterally
    low_na = widefield_psf((17, 17, 17), (0.2, 0.1, 0.1), na=0.5, wavelength=0.5)
    # lower NA -> wider focal spot -> lower peak
    assert low_na[8].max() < psf[8].max()


def test_shipped_protocol_psf_matches_a_fresh_computation():
    fresh = widefield_psf((17, 17, 17), (0.406, 0.406, 0.406), na=0.8, wavelength=0.6)
    np.testing.assert_allclose(protocol_psf(3), fresh, rtol=1e-4, atol=1e-8)


def test_protocol_psf_is_a_defocused_ring():
    ring = protocol_psf(2)
    assert ring.shape == (17, 17) and abs(float(ring.sum()) - 1) < 1e-5
    # plane 0 is ~3.2 um out of focus: most of its energy lies on a ring, unlike the focal plane
    y, x = np.mgrid[-8:9, -8:9]
    core = y**2 + x**2 <= 4
    focal = protocol_psf(3)[8]
    assert ring[core].sum() < 0.25
    assert focal[core].sum() / focal.sum() > 0.8
    with pytest.raises(PSFError):
        protocol_psf(4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (16, 16), "voxel_size": (0.1, 0.1)}, "equal and odd"),
        ({"shape": (17, 17), "voxel_size": (0.1, 0.2)}, "lateral voxel sizes must be equal"),
        ({"shape": (17, 17), "voxel_size": (0.1, 0.1), "na": 1.5}, "below the refractive index"),
    ],
)
def test_widefield_psf_rejects_bad_optics(kwargs, message):
    arguments = {"na": 0.8, "wavelength": 0.5, **kwargs}
    with pytest.raises(PSFError, match=message):
        widefield_psf(**arguments)


def test_normalize_and_describe():
    psf = normalize_psf(np.full((3, 3), 2.0))
    assert psf.dtype == np.float32 and psf.sum() == pytest.approx(1.0)
    info = describe_psf(psf)
    assert info["shape"] == [3, 3] and len(info["sha256"]) == 16
    assert describe_psf(psf)["sha256"] == info["sha256"]
