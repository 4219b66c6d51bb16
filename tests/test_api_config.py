"""The Python API as a notebook user calls it: options are checked by name before any work,
options of another method are refused, and the defects issue 14 reproduced stay fixed."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import run_cli, smooth_volume

from ssi_dask import deconvolve, richardson_lucy
from ssi_dask.config import DEFAULT_NUM_ITER, LRSettings
from ssi_dask.errors import ParameterError
from ssi_dask.psf import widefield_psf

PSF = widefield_psf((5, 7, 7), (0.3, 0.15, 0.15), na=1.0, wavelength=0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_iter": -1}, "num_iter must be an integer >= 0, got -1"),
        ({"num_iter": 2.5}, "num_iter must be an integer >= 0 or 'auto', got 2.5"),
        ({"num_iter": "many"}, "num_iter must be an integer >= 0 or 'auto', got 'many'"),
        ({"back_projector": "fast"}, "unknown back projector 'fast'; choose 'classic' or"),
        (
            {"back_projector": "wiener-butterworth", "wiener_alpha": -5},
            "wiener_alpha must be a finite number > 0, got -5",
        ),
        ({"wiener_alpha": 0.1}, "wiener_alpha only apply to the Wiener-Butterworth back"),
        (
            {"back_projector": "wiener-butterworth", "cutoff": 0.7},
            "cutoff is in cycles per pixel and must be <= 0.5, got 0.7",
        ),
        ({"offset": float("nan")}, "offset must be a finite number, got nan"),
        ({"wiener_alfa": 0.1}, "unknown option(s) wiener_alfa for method 'lr'"),
        ({"auto_options": {"n_samples": 2}}, "auto_options apply with num_iter='auto' only"),
    ],
)
def test_lr_options_are_checked_by_name(options, message):
    image = smooth_volume((12, 32, 32))
    with pytest.raises(ParameterError) as info:
        deconvolve(image, PSF, **options)
    assert message in str(info.value)


def test_ssi_refuses_lr_options_instead_of_dropping_them():
    image = smooth_volume((12, 32, 32))
    with pytest.raises(ParameterError) as info:
        deconvolve(image, PSF, method="ssi", num_iter=999, wiener_alpha=-5)
    assert str(info.value) == (
        "num_iter, wiener_alpha apply to method 'lr' only; method 'ssi' takes model=, tta=, "
        "chunks=, depth= and device="
    )


def test_default_iterations_come_from_the_config():
    image = smooth_volume((12, 32, 32))
    lazy = deconvolve(image, PSF)
    assert lazy.ssi_dask_provenance["iterations"] == DEFAULT_NUM_ITER == LRSettings().num_iter
    expected = richardson_lucy(image, PSF, num_iter=DEFAULT_NUM_ITER)
    np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_dataarray_with_automatic_iterations():
    """Was a raw ValueError: the DataArray path now records the count chosen per volume."""
    data = np.stack([smooth_volume((12, 48, 48), seed=s) for s in (1, 2)])
    array = xr.DataArray(data, dims=("c", "z", "y", "x"), coords={"c": ["a", "b"]})
    result = deconvolve(array, PSF, num_iter="auto", auto_options={"n_samples": 1, "max_iter": 6})
    chosen = result.attrs["ssi_dask"]["iterations"]
    assert len(chosen) == 2 and all(1 <= n <= 6 for n in chosen)
    for channel, n in enumerate(chosen):  # each volume really ran with its chosen count
        expected = richardson_lucy(data[channel], PSF, num_iter=n)
        got = result.isel(c=channel).values
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_ssi_dry_run_without_a_model(tmp_path):
    """Was an AttributeError traceback: the plan is printed for the untrained architecture."""
    import zarr

    array = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=(64, 96, 96), chunks=(32, 48, 48), dtype="f4"
    )
    array[...] = smooth_volume((64, 96, 96))
    np.save(tmp_path / "psf.npy", PSF)
    result = run_cli(
        "run",
        tmp_path / "in.zarr",
        tmp_path / "out.zarr",
        "--psf",
        tmp_path / "psf.npy",
        "--method",
        "ssi",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "dry run: nothing computed or written" in result.stdout
    assert "halo (depth)" in result.stdout
    assert not (tmp_path / "out.zarr").exists()


def test_the_psf_crosses_the_graph_once_prepared():
    from ssi_dask.lr import PreparedPSF, prepare_psf

    image = smooth_volume((12, 32, 32))
    lazy = deconvolve(
        image, PSF, num_iter=2, back_projector="wiener-butterworth", chunks=(12, 16, 16)
    )
    graph = dict(lazy.__dask_graph__())
    shared = [getattr(v, "value", v) for k, v in graph.items() if str(k).startswith("shared-psf")]
    assert len(shared) == 1 and isinstance(shared[0], PreparedPSF)  # one key for 4 chunks
    assert shared[0].back_projector.kind == "wiener-butterworth"
    prepared = prepare_psf(PSF, 3, back_projector="wiener-butterworth")
    np.testing.assert_array_equal(
        richardson_lucy(image, prepared, num_iter=2),
        richardson_lucy(image, PSF, num_iter=2, back_projector="wiener-butterworth"),
    )
    with pytest.raises(ParameterError, match="a PreparedPSF carries its back projector"):
        richardson_lucy(image, prepared, num_iter=2, wiener_alpha=0.1)


def test_one_device_vocabulary_with_training():
    """deconvolve(device=) takes training's names: 'cpu', 'cuda' ('gpu' an alias)."""
    from ssi_dask._backend import cupy_or_none
    from ssi_dask.errors import DeviceError

    image = smooth_volume((24, 24), seed=2)
    psf = widefield_psf((5, 5), (0.1, 0.1), na=1.0, wavelength=0.5)
    with pytest.raises(ParameterError, match=r"^device must be 'cpu' or 'cuda', got 'tpu'$"):
        deconvolve(image, psf, num_iter=2, device="tpu")
    if cupy_or_none() is None:  # the machines without CUDA: one line naming the fix
        for name in ("cuda", "gpu"):
            with pytest.raises(DeviceError, match=r"^device='cuda' needs CuPy and a CUDA device"):
                deconvolve(image, psf, num_iter=2, device=name)
    cpu = np.asarray(deconvolve(image, psf, num_iter=2, device="cpu"))
    np.testing.assert_allclose(cpu, richardson_lucy(image, psf, num_iter=2), rtol=1e-5, atol=1e-6)
