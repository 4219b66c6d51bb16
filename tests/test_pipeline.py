"""One run path (issue 14): ``ssi_dask.run(job)`` from Python for OME-Zarr, resume from
Python, and the OME-Zarr runs' new ``--resume`` and ``--iterations auto``."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import zarr
from conftest import run_cli, tree_digest
from test_ome import SHAPE, VOXEL, psf_file, write_ome_input

import ssi_dask
from ssi_dask.errors import ParameterError
from ssi_dask.lr import richardson_lucy
from ssi_dask.progress import progress_folder


def ome_job(source, out, psf_path, **changes) -> ssi_dask.Job:
    job = ssi_dask.Job(
        input=source,
        output=out,
        psf=ssi_dask.PSFSettings(files=(str(psf_path),)),
        lr=ssi_dask.LRSettings(num_iter=3),
        progress=False,
    )
    return dataclasses.replace(job, **changes)


def test_ome_zarr_run_and_resume_from_python(tmp_path, local_client):
    source = tmp_path / "image.ome.zarr"
    data = write_ome_input(source, "0.5")
    before = tree_digest(source)
    psf_path, psf = psf_file(tmp_path, VOXEL)
    out = tmp_path / "out.ome.zarr"
    job = ome_job(source, out, psf_path, channels=("RFP",))
    report = ssi_dask.run(job, client=local_client, echo=None)
    assert report.ome_zarr and report.volumes == 2 and report.levels == 2
    assert report.shape == (2, 1, *SHAPE[2:])
    full = zarr.open_group(str(out), mode="r")["0"]
    for t in range(2):  # channel 1 ("RFP") only, each volume against whole-volume LR
        expected = richardson_lucy(data[t, 1], psf, num_iter=3)
        np.testing.assert_allclose(full[t, 0], expected, rtol=1e-4, atol=1e-5)
    first = np.asarray(full[...])
    assert ssi_dask.verify_output(out / "0").ok

    # an interrupted run: two chunks' records and files gone; resume recomputes only them
    records = sorted(p for p in progress_folder(out / "0").iterdir() if not p.name.startswith("."))
    for record in records[:2]:
        record.unlink()
    shutil.rmtree(out / "0" / "c" / "1")  # every chunk file of time point 1
    assert not ssi_dask.verify_output(out / "0").ok
    resumed = ssi_dask.run(dataclasses.replace(job, resume=True), client=local_client, echo=None)
    assert resumed.provenance["method"] == "lr"
    assert np.array_equal(zarr.open_group(str(out), mode="r")["0"][...], first)
    assert ssi_dask.verify_output(out / "0", check_data=True).ok
    assert zarr.open_group(str(out), mode="r").attrs["ssi_dask"]["complete"] is True
    assert tree_digest(source) == before

    # a resume with other parameters is refused, naming the difference
    with pytest.raises(ssi_dask.errors.OutputError, match="different parameters"):
        ssi_dask.run(
            dataclasses.replace(job, resume=True, lr=ssi_dask.LRSettings(num_iter=4)),
            client=local_client,
            echo=None,
        )


def test_ome_zarr_cli_resume_and_automatic_iterations(tmp_path, local_client):
    source = tmp_path / "image.ome.zarr"
    data = write_ome_input(source, "0.4")
    psf_path, psf = psf_file(tmp_path, VOXEL)
    out = tmp_path / "out.ome.zarr"
    args = [
        "run", source, out, "--psf", psf_path, "--iterations", "auto", "--auto-samples", "1",
        "--auto-max-iterations", "6", "--channel", "0", "--scheduler",
        local_client.scheduler.address, "--no-progress",
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    attrs = zarr.open_group(str(out), mode="r")["0"].attrs["ssi_dask"]
    chosen = attrs["iterations"]
    assert isinstance(chosen, int) and 1 <= chosen <= 6
    assert attrs["auto_iterations"]["num_iter"] == chosen
    full = zarr.open_group(str(out), mode="r")["0"][...]
    expected = richardson_lucy(data[1, 0], psf, num_iter=chosen)
    np.testing.assert_allclose(full[1, 0], expected, rtol=1e-4, atol=1e-5)
    # resume (was refused for every OME output): continues with the count the first run chose
    (out / "0" / ".ssi_dask_progress" / "0.0.0.0.0").unlink()
    second = run_cli(*args, "--resume")
    assert second.returncode == 0, second.stderr
    assert np.array_equal(zarr.open_group(str(out), mode="r")["0"][...], full)
    assert zarr.open_group(str(out), mode="r")["0"].attrs["ssi_dask"]["iterations"] == chosen


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "magic"}, "method must be 'lr' or 'ssi', got 'magic'"),
        (
            {"resume": True, "overwrite": True},
            "resume=True keeps the output and overwrite=True deletes",
        ),
        (
            {"repair": True},
            "repair=True checks an existing output; give it together with resume=True",
        ),
        (
            {"method": "ssi", "lr": ssi_dask.LRSettings(num_iter=5)},
            "lr.num_iter apply to method 'lr' only",
        ),
        ({"ssi": ssi_dask.SSISettings(model="m.pt")}, "ssi.model and ssi.save_model apply to"),
        ({"level": -1}, "level must be an integer >= 0, got -1"),
        ({"voxel_size": (0.3, 0.0, 0.1)}, "voxel_size must be a finite number > 0, got 0.0"),
    ],
)
def test_job_is_checked_when_built(changes, message):
    with pytest.raises(ParameterError) as info:
        ssi_dask.Job(input="in.zarr", output="out.zarr", **changes)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ssi_dask.LayoutSettings(zarr_format=4), "zarr_format must be 2 or 3, got 4"),
        (lambda: ssi_dask.LayoutSettings(output_format="tiff"), "output_format must be auto"),
        (lambda: ssi_dask.ClusterSettings(workers=0), "workers must be an integer >= 1, got 0"),
        (lambda: ssi_dask.ClusterSettings(scheduler="a", scheduler_file="b"), "not both"),
        (lambda: ssi_dask.TrainSettings(steps=0), "steps must be an integer >= 1, got 0"),
        (lambda: ssi_dask.TrainSettings(background=1.5), "background must be in [0, 1)"),
        (lambda: ssi_dask.PSFSettings(files=("p.tif",), na=1.0), "files or optics"),
    ],
)
def test_settings_are_checked_when_built(build, message):
    with pytest.raises(ParameterError) as info:
        build()
    assert message in str(info.value)


def test_a_typo_names_the_parameter():
    with pytest.raises(TypeError, match="num_iters"):
        ssi_dask.LRSettings(num_iters=5)


def test_dry_run_prints_the_provenance_the_run_writes(tmp_path, zarr3d, psf3d_file):
    import json

    out = tmp_path / "out.zarr"
    common = [zarr3d, out, "--psf", psf3d_file, "--iterations", 2, "--workers", 1]
    dry = run_cli("run", *common, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    line = next(x for x in dry.stdout.splitlines() if x.startswith("  provenance      "))
    printed = json.loads(line.split("provenance", 1)[1])
    done = run_cli("run", *common, "--no-progress")
    assert done.returncode == 0, done.stderr
    written = dict(zarr.open_array(str(out)).attrs["ssi_dask"])
    for key in ("command",):  # the command line differs by --dry-run
        printed.pop(key), written.pop(key)
    assert {k: written[k] for k in printed} == printed


def test_dataarray_run_from_python(tmp_path, local_client, psf3d):
    import xarray as xr
    from conftest import smooth_volume

    data = np.stack([smooth_volume((12, 32, 32), seed=s) for s in (1, 2)])
    array = xr.DataArray(data, dims=("c", "z", "y", "x"), coords={"c": ["GFP", "RFP"]})
    np.save(tmp_path / "psf.npy", psf3d)
    job = ssi_dask.Job(
        input=array,
        output=tmp_path / "out.zarr",
        psf=ssi_dask.PSFSettings(files=(str(tmp_path / "psf.npy"),)),
        lr=ssi_dask.LRSettings(num_iter=3),
        channels=("RFP",),
        progress=False,
    )
    report = ssi_dask.run(job, client=local_client, echo=None)
    assert report.shape == (1, 12, 32, 32) and not report.ome_zarr
    out = zarr.open_array(str(tmp_path / "out.zarr"))
    assert out.attrs["ssi_dask"]["complete"] is True
    expected = richardson_lucy(data[1], psf3d, num_iter=3)
    np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)
