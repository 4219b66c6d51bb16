"""Lost workers and a lost scheduler, against real ``dask scheduler``/``dask worker`` processes."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import zarr
from _processes import DaskProcesses, records_written, start_cli, wait_for_records
from conftest import smooth_volume, tree_digest
from test_cli import run_cli

from ssi_dask import deconvolve

SHAPE = (24, 128, 256)
CHUNKS = (24, 32, 32)
TOTAL = 4 * 8
ITERATIONS = 20


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The input volume on disk, its PSF file and the uninterrupted result (computed once)."""
    import tifffile

    from ssi_dask.psf import widefield_psf

    folder = tmp_path_factory.mktemp("lost")
    volume = smooth_volume(SHAPE, seed=7)
    source = folder / "input.zarr"
    zarr.create_array(store=str(source), shape=SHAPE, chunks=CHUNKS, dtype="float32")[...] = volume
    psf = widefield_psf((7, 9, 9), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)
    psf_file = folder / "psf.tif"
    tifffile.imwrite(psf_file, psf)
    reference = deconvolve(volume, psf, num_iter=ITERATIONS, chunks=CHUNKS).compute()
    return source, psf_file, reference


def _args(source, out, psf_file, *extra):
    return (
        "run", source, out, "--psf", psf_file, "--iterations", ITERATIONS,
        "--chunks", ",".join(map(str, CHUNKS)), "--no-progress", *extra,
    )  # fmt: skip


def _one_line_error(tmp_path) -> str:
    stderr = (tmp_path / "cli.err").read_text()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("ssi-dask: error: ")
    return lines[0]


def test_killed_worker_tasks_are_retried(tmp_path, case):
    source, psf_file, reference = case
    before = tree_digest(source)
    cluster = DaskProcesses(tmp_path, n_workers=2)
    try:
        out = tmp_path / "out.zarr"
        process = start_cli(
            *_args(source, out, psf_file, "--scheduler", cluster.address), folder=tmp_path
        )
        wait_for_records(out, 3, process)
        cluster.workers[0].send_signal(signal.SIGKILL)
        assert process.wait(timeout=300) == 0, (tmp_path / "cli.err").read_text()
        assert cluster.workers[0].wait(timeout=10) == -signal.SIGKILL
    finally:
        cluster.close()
    assert "dask: 2 workers" in (tmp_path / "cli.out").read_text()
    output = zarr.open_array(str(out), mode="r")
    np.testing.assert_array_equal(output[...], reference)
    assert output.attrs["ssi_dask"]["complete"] is True
    assert records_written(out) == TOTAL
    assert tree_digest(source) == before


def test_all_workers_gone_keeps_progress_for_resume(tmp_path, case):
    source, psf_file, reference = case
    before = tree_digest(source)
    cluster = DaskProcesses(tmp_path, n_workers=2)
    out = tmp_path / "out.zarr"
    try:
        process = start_cli(
            *_args(source, out, psf_file, "--scheduler", cluster.address, "--worker-timeout", 2),
            folder=tmp_path,
        )
        wait_for_records(out, 2, process)
        for worker in cluster.workers:
            worker.send_signal(signal.SIGKILL)
        assert process.wait(timeout=120) == 2
        kept = records_written(out)
        message = _one_line_error(tmp_path)
        assert "no Dask worker left for 2 s (all workers gone)" in message
        assert f"{kept} of {TOTAL} chunks of '{out}' are written and kept" in message
        assert "start workers and re-run with --resume" in message
        assert 2 <= kept < TOTAL
        assert zarr.open_array(str(out), mode="r").attrs["ssi_dask"]["complete"] is False

        cluster.workers.append(cluster.start_worker())  # new workers join the same scheduler
        cluster.wait_for_workers(1)
        resumed = run_cli(*_args(source, out, psf_file, "--scheduler", cluster.address, "--resume"))
    finally:
        cluster.close()
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} of {TOTAL} chunks already written, computing {TOTAL - kept}" in resumed.stdout
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], reference)
    assert tree_digest(source) == before


def test_lost_scheduler_mid_run(tmp_path, case):
    source, psf_file, _ = case
    before = tree_digest(source)
    cluster = DaskProcesses(tmp_path, n_workers=1)
    out = tmp_path / "out.zarr"
    try:
        process = start_cli(
            *_args(source, out, psf_file, "--scheduler", cluster.address), folder=tmp_path
        )
        wait_for_records(out, 2, process)
        cluster.scheduler.send_signal(signal.SIGKILL)
        status = process.wait(timeout=180)
    finally:
        cluster.close()
    message = _one_line_error(tmp_path)
    assert status == 2
    assert "lost the Dask scheduler during the run" in message
    assert f"the chunks written to '{out}' so far are kept" in message
    assert zarr.open_array(str(out), mode="r").attrs["ssi_dask"]["complete"] is False
    assert records_written(out) >= 2
    assert tree_digest(source) == before
