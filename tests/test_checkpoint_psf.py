"""``run --method ssi --model X`` takes the PSF stored in the checkpoint; a different PSF is
refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from conftest import run_cli
from test_cli import _assert_clean_failure

import ssi_dask
from ssi_dask.bench.synthetic import degrade, ground_truth_2d
from ssi_dask.psf import crop_psf, describe_psf, normalize_psf, protocol_psf
from ssi_dask.ssi import load_checkpoint, predict, save_checkpoint, train_ssi


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    truth = ground_truth_2d("camera", size=96)
    psf = protocol_psf(2)
    image = degrade(truth, psf, seed=0)
    path = folder / "image.zarr"
    zarr.create_array(store=str(path), shape=image.shape, chunks=(48, 48), dtype="float32")[...] = (
        image
    )
    model = train_ssi(
        image, psf, seed=0, device="cpu", steps=4, patch_size=32, batch_size=2, restarts=0
    )
    model_path = folder / "model.pt"
    save_checkpoint(model, model_path)
    tifffile.imwrite(folder / "same.tif", psf)
    wide = np.zeros((31, 31), np.float32)  # a different PSF: a wider Gaussian
    yy, xx = np.mgrid[-15:16, -15:16]
    wide[...] = np.exp(-(yy**2 + xx**2) / (2 * 4.0**2))
    tifffile.imwrite(folder / "other.tif", wide)
    return folder, path, model_path, image


def test_psf_comes_from_the_checkpoint(trained):
    folder, path, model_path, _ = trained
    job = ssi_dask.Job(
        input=str(path),
        output=str(folder / "dry.zarr"),
        method="ssi",
        ssi=ssi_dask.SSISettings(model=str(model_path)),
        dry_run=True,
    )
    report = ssi_dask.run(job, echo=None)
    stored = normalize_psf(crop_psf(load_checkpoint(model_path).psf))
    psf = report.provenance["psf"]
    assert psf["sha256"] == describe_psf(stored)["sha256"]
    assert psf["source"] == f"stored in the checkpoint {model_path}"


def test_same_psf_is_accepted_and_a_different_one_refused(trained):
    folder, path, model_path, _ = trained
    same = run_cli(
        "run", path, folder / "a.zarr", "--method", "ssi", "--model", model_path,
        "--psf", folder / "same.tif", "--dry-run",
    )  # fmt: skip
    assert same.returncode == 0, same.stderr
    other = run_cli(
        "run", path, folder / "b.zarr", "--method", "ssi", "--model", model_path,
        "--psf", folder / "other.tif", "--dry-run",
    )  # fmt: skip
    assert other.returncode == 2
    _assert_clean_failure(
        other, f"--psf differs from the PSF stored in --model {model_path} (shape (31, 31)"
    )
    assert not (folder / "b.zarr").exists()


def test_run_without_psf_applies_the_checkpoint(trained):
    folder, path, model_path, image = trained
    out = folder / "ssi.zarr"
    result = run_cli(
        "run", path, out, "--method", "ssi", "--model", model_path, "--workers", 1,
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = predict(load_checkpoint(model_path), image, device="cpu")
    output = zarr.open_array(str(out), mode="r")
    np.testing.assert_allclose(output[...], expected, atol=1e-4 * float(np.ptp(expected)))
    assert output.attrs["ssi_dask"]["psf"]["source"].startswith("stored in the checkpoint")
