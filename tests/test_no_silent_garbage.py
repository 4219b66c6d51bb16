"""Issue 13, item 5: negative input and non-finite results never end as a complete output."""

from __future__ import annotations

import re

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from conftest import run_cli, smooth_volume, tree_digest
from test_lr import reference_rl

from ssi_dask import deconvolve, write_zarr
from ssi_dask.chunkfiles import block_regions
from ssi_dask.errors import NonFiniteResultError, ParameterError
from ssi_dask.lr import richardson_lucy
from ssi_dask.progress import read_records
from ssi_dask.verify import verify_output


def mixed_sign(shape, seed=0):
    """Background-subtracted data: structure on a zero background with noise around 0."""
    rng = np.random.default_rng(seed)
    image = 4.0 * smooth_volume(shape, seed=seed, offset=0.0) - 1.0
    return (image + rng.normal(0.0, 0.3, shape)).astype(np.float32)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_kernel_treats_negative_values_as_zero_and_leaves_the_input_alone(psf3d):
    image = mixed_sign((12, 30, 24))
    original = image.copy()
    assert image.min() < -1.0
    out = richardson_lucy(image, psf3d, num_iter=10)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(image, original)  # the caller's array is not clipped
    # the documented treatment, against the independent float64 reference of test_lr
    assert rel_err(out, reference_rl(np.clip(image, 0, None), psf3d, 10)) < 1e-4


def test_offset_is_subtracted_then_negative_values_are_treated_as_zero(psf3d):
    image = mixed_sign((24, 64, 48)) + 100.0  # a camera offset of 100 on top
    lazy = deconvolve(image, psf3d, num_iter=8, chunks=(24, 32, 24), offset=100.0)
    chunked = lazy.compute(scheduler="threads")
    reference = reference_rl(np.clip(image - 100.0, 0, None), psf3d, 8)
    assert np.isfinite(chunked).all()
    assert rel_err(chunked, reference) < 1e-3  # chunked (seams <= 1e-3) vs whole reference


def test_offset_must_be_finite(psf3d):
    with pytest.raises(ParameterError, match="offset must be a finite number, got nan"):
        deconvolve(np.ones((8, 16, 16), np.float32), psf3d, num_iter=1, offset=float("nan"))


def test_non_finite_chunk_fails_write_zarr_and_keeps_the_others(tmp_path):
    values = np.ones((8, 16, 32), np.float32)
    values[2, 3, 5] = np.inf  # in the first chunk [0:8, 0:16, 0:16]; the sync scheduler
    # runs the second one first, so exactly one chunk is written before the failure
    result = da.from_array(values, chunks=(8, 16, 16)) * 2.0
    out = tmp_path / "out.zarr"
    with dask.config.set(scheduler="synchronous"), pytest.raises(NonFiniteResultError) as error:
        write_zarr(result, out, attrs={"ssi_dask": {"method": "test"}})  # chunks in order
    message = str(error.value)
    assert message.startswith(
        "the result of chunk [0:8, 0:16, 0:16] is not finite (1 of 2048 values NaN or Inf) "
        "and was not written; likely cause: negative input values (subtract the background, "
        "e.g. with offset=)"
    )
    assert message.endswith(f"(1 of 2 chunks of {str(out)!r} are written and kept)")
    array = zarr.open_array(str(out), mode="r")
    assert array.attrs["ssi_dask"]["complete"] is False
    regions = dict(block_regions(((8,), (16,), (16, 16))))
    kept = read_records(
        out, run_fingerprint=array.attrs["ssi_dask"]["fingerprint"], regions=regions
    )
    assert list(kept) == [(0, 0, 1)]  # the finite chunk is recorded, the other is not
    np.testing.assert_array_equal(array[:, :, 16:], 2.0)
    assert not verify_output(out).ok


def _plain_zarr(path, data, chunks):
    zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype="f4")[...] = data
    return path


@pytest.fixture
def psf_file(tmp_path, psf3d):
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, psf3d)
    return path


def test_cli_mixed_sign_input_warns_once_and_matches_the_clipped_reference(
    tmp_path, psf_file, psf3d
):
    image = mixed_sign((24, 64, 48))
    source = _plain_zarr(tmp_path / "mixed.zarr", image, (24, 32, 24))
    before = tree_digest(source)
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run", source, out, "--psf", psf_file, "--iterations", 10, "--workers", 1,
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"warning: the input has values below 0 (min {image.min():.4g}")
    assert (
        "Lucy-Richardson treated them as 0: give the background level with --offset"
        in (warnings[0])
    )
    output = zarr.open_array(str(out), mode="r")
    assert output.attrs["ssi_dask"]["complete"] is True
    assert rel_err(output[...], reference_rl(np.clip(image, 0, None), psf3d, 10)) < 1e-3
    assert tree_digest(source) == before


def test_cli_offset_is_recorded_and_clears_the_warning(tmp_path, psf_file, psf3d):
    image = mixed_sign((24, 64, 48)) + 10.0  # every value above 0: --offset 10 restores it
    source = _plain_zarr(tmp_path / "offset.zarr", image, (24, 32, 24))
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run", source, out, "--psf", psf_file, "--iterations", 6, "--workers", 1,
        "--no-progress", "--offset", 10, "--chunks", "24,64,48",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: the input has values below 0 after subtracting --offset 10" in result.stderr
    output = zarr.open_array(str(out), mode="r")
    assert output.attrs["ssi_dask"]["offset"] == 10.0
    reference = reference_rl(np.clip(image - 10.0, 0, None), psf3d, 6)
    assert rel_err(output[...], reference) < 1e-4  # one chunk: the whole-volume computation


def test_cli_non_finite_result_fails_keeps_progress_and_is_not_complete(tmp_path, psf_file):
    image = smooth_volume((24, 64, 48), seed=4)
    image[:, 32:, :] = 3e38  # finite, but LR's sums overflow float32 there: NaN/Inf out
    source = _plain_zarr(tmp_path / "huge.zarr", image, (24, 32, 48))
    before = tree_digest(source)
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run", source, out, "--psf", psf_file, "--iterations", 2, "--workers", 1,
        "--no-progress", "--chunks", "24,32,48", "--depth", "0,0,0",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert line.startswith("ssi-dask: error: the result of chunk [0:24, 32:64, 0:48] is not finite")
    assert "likely cause: negative input values (subtract the background, e.g. with --offset)" in (
        line
    )
    kept = re.search(
        rf"\((\d) of 2 chunks of {re.escape(repr(str(out)))} are written and kept\)$", line
    )
    assert kept, line
    output = zarr.open_array(str(out), mode="r")
    assert output.attrs["ssi_dask"]["complete"] is False
    report = verify_output(out)
    assert not report.ok and "[0:24, 32:64, 0:48]" in report.missing  # never recorded
    # the message counts the records at the failure; a chunk still running then may finish
    assert report.recorded >= int(kept.group(1)) and len(report.missing) == 2 - report.recorded
    assert tree_digest(source) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--offset", "nan"], "--offset must be a finite number, got nan"),
        (["--offset", "5", "--method", "ssi"], "--offset applies to --method lr only"),
    ],
)
def test_cli_bad_offset_is_refused_before_any_work(tmp_path, psf_file, capsys, extra, message):
    from ssi_dask.cli import main

    source = _plain_zarr(tmp_path / "in.zarr", mixed_sign((24, 32, 32)), (24, 32, 32))
    before = tree_digest(source)
    out = tmp_path / "out.zarr"
    status = main(["run", str(source), str(out), "--psf", str(psf_file), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines == [f"ssi-dask: error: {message}"]
    assert not out.exists() and tree_digest(source) == before


def test_cli_ssi_model_giving_nan_fails_and_is_not_complete(tmp_path):
    """The SSI path: a model whose output is not finite stops the run the same way."""
    import torch

    from ssi_dask.psf import protocol_psf
    from ssi_dask.ssi import DEFAULTS, SSIModel, UNet, save_checkpoint

    network = UNet(3, levels=DEFAULTS[3]["levels"], base_channels=4)
    with torch.no_grad():
        next(iter(network.parameters())).fill_(float("nan"))  # a broken (diverged) model
    model = tmp_path / "nan.pt"
    save_checkpoint(SSIModel(network, {"offset": 0.0, "scale": 1.0}, protocol_psf(3)), model)
    source = _plain_zarr(tmp_path / "in.zarr", smooth_volume((24, 32, 32), seed=5), (24, 32, 32))
    before = tree_digest(source)
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run", source, out, "--method", "ssi", "--model", model,  # the checkpoint's PSF
        "--workers", 1, "--no-progress",
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("ssi-dask: error: the result of chunk [0:24, 0:32, 0:32] is not ")
    assert "with --method ssi a model that does not fit this data" in lines[0]
    assert lines[0].endswith(f"(0 of 1 chunks of {str(out)!r} are written and kept)")
    assert zarr.open_array(str(out), mode="r").attrs["ssi_dask"]["complete"] is False
    assert tree_digest(source) == before


def test_ome_run_applies_the_offset_and_warns(tmp_path, psf3d, local_client, capsys):
    """The OME-Zarr path (a TIFF written as OME-Zarr) treats negative values the same way."""
    from ssi_dask.cli import main
    from ssi_dask.psf import save_psf

    image = mixed_sign((12, 64, 64), seed=3) + 1.0  # still negative below 0 after --offset 1
    source = tmp_path / "stack.tif"
    tifffile.imwrite(source, image)
    psf_path = tmp_path / "psf.tif"
    save_psf(psf_path, psf3d, (0.3, 0.15, 0.15))
    out = tmp_path / "out.ome.zarr"
    status = main([
        "run", str(source), str(out), "--psf", str(psf_path), "--voxel-size", "0.3,0.15,0.15",
        "--output-format", "ome-zarr", "--iterations", "3", "--offset", "1", "--no-progress",
        "--scheduler", local_client.scheduler.address,
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0, err
    assert "warning: the input has values below 0 after subtracting --offset 1 (min " in err
    full = zarr.open_array(str(out / "0"), mode="r")
    assert full.attrs["ssi_dask"]["offset"] == 1.0 and full.attrs["ssi_dask"]["complete"] is True
    reference = reference_rl(np.clip(image - 1.0, 0, None), psf3d, 3)
    assert rel_err(full[...], reference) < 1e-4
