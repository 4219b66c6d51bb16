"""xarray.DataArray in -> DataArray out, with dims, coords and attrs kept and provenance added."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import smooth_volume

from ssi_dask import deconvolve
from ssi_dask.errors import InputError, PSFError
from ssi_dask.lr import richardson_lucy
from ssi_dask.psf import describe_psf, normalize_psf, widefield_psf


@pytest.fixture(scope="module")
def two_psfs():
    return {
        "GFP": widefield_psf((5, 9, 9), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52),
        "RFP": widefield_psf((5, 9, 9), (0.3, 0.15, 0.15), na=1.0, wavelength=0.61),
    }


def test_dataarray_with_channels_keeps_dims_coords_attrs(two_psfs):
    values = np.stack([smooth_volume((10, 32, 40), seed=s) for s in range(2)])
    coords = {
        "c": ["GFP", "RFP"],
        "z": np.arange(10) * 0.3,
        "y": np.arange(32) * 0.15,
        "x": 5.0 + np.arange(40) * 0.15,
    }
    image = xr.DataArray(
        values, dims=("c", "z", "y", "x"), coords=coords, name="cells", attrs={"sample": "A1"}
    )
    result = deconvolve(image, two_psfs, num_iter=4, chunks=(10, 16, 40))
    assert isinstance(result, xr.DataArray) and isinstance(result.data, da.Array)
    assert result.dims == image.dims and result.name == "cells"
    for name in coords:
        np.testing.assert_array_equal(result.coords[name].values, image.coords[name].values)
    assert result.attrs["sample"] == "A1"
    provenance = result.attrs["ssi_dask"]
    assert provenance["method"] == "lr" and provenance["iterations"] == 4 and provenance["version"]
    assert [p["sha256"] for p in provenance["psf"]] == [
        describe_psf(normalize_psf(two_psfs[c]))["sha256"] for c in ("GFP", "RFP")
    ]
    computed = result.compute()
    for index, channel in enumerate(("GFP", "RFP")):
        expected = richardson_lucy(values[index], two_psfs[channel], num_iter=4)
        np.testing.assert_allclose(computed.values[index], expected, rtol=1e-4, atol=1e-5)
    assert image.attrs == {"sample": "A1"}  # the input is untouched


def test_dask_backed_2d_dataarray_with_time(psf2d):
    values = np.stack([smooth_volume((40, 48), seed=s) for s in range(3)])
    image = xr.DataArray(
        da.from_array(values, chunks=(1, 20, 48)), dims=("t", "y", "x"), coords={"t": [0, 5, 10]}
    )
    result = deconvolve(image, psf2d, num_iter=3)
    assert result.dims == ("t", "y", "x") and list(result.coords["t"].values) == [0, 5, 10]
    for t in range(3):
        expected = richardson_lucy(values[t], psf2d, num_iter=3)
        np.testing.assert_allclose(result.values[t], expected, rtol=1e-4, atol=1e-5)


def test_dataarray_errors(psf3d, two_psfs):
    bad = xr.DataArray(np.ones((4, 16, 16), np.float32), dims=("y", "x", "z"))
    with pytest.raises(InputError, match=r"DataArray dims \('y', 'x', 'z'\) are not OME-like"):
        deconvolve(bad, psf3d)
    image = xr.DataArray(
        np.ones((2, 8, 16, 16), np.float32),
        dims=("c", "z", "y", "x"),
        coords={"c": ["GFP", "DAPI"]},
    )
    with pytest.raises(PSFError, match=r"no PSF for channel\(s\) \['DAPI'\]"):
        deconvolve(image, two_psfs)


def test_dataarray_with_an_ssi_model_equals_whole_image_prediction(psf2d):
    from ssi_dask.ssi import model_hash, predict, train_ssi

    values = np.stack([smooth_volume((64, 72), seed=s) for s in range(2)])
    image = xr.DataArray(values, dims=("t", "y", "x"), coords={"t": [0, 30]}, attrs={"run": 7})
    model = train_ssi(
        values[0], psf2d, seed=0, steps=2, restarts=0, device="cpu", validation_patches=2,
        base_channels=4, levels=2, batch_size=2, patch_size=32,
    )  # fmt: skip
    result = deconvolve(image, psf2d, method="ssi", model=model, chunks=(32, 72))
    assert result.dims == ("t", "y", "x") and list(result.coords["t"].values) == [0, 30]
    assert result.attrs["run"] == 7
    provenance = result.attrs["ssi_dask"]
    assert provenance["method"] == "ssi"
    assert provenance["model"]["sha256"] == model_hash(model)
    computed = result.values
    for index in range(2):  # chunked along y, each time point on its own: equal to whole-image
        expected = predict(model, values[index], device="cpu")
        np.testing.assert_allclose(computed[index], expected, atol=1e-4 * float(np.ptp(expected)))
