"""Resume after a crash: SIGKILL a real run, resume it, compare with an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from _processes import kill_group, records_written, start_cli, wait_for_records
from conftest import smooth_volume, tree_digest
from test_cli import run_cli

from ssi_dask import deconvolve, write_zarr
from ssi_dask.progress import progress_folder

SHAPE = (24, 128, 256)
CHUNKS = (24, 32, 32)
TOTAL = 4 * 8  # working chunks
ITERATIONS = 20


@pytest.fixture
def big_input(tmp_path):
    volume = smooth_volume(SHAPE, seed=5)
    path = tmp_path / "big.zarr"
    zarr.create_array(store=str(path), shape=SHAPE, chunks=CHUNKS, dtype="float32")[...] = volume
    return path, volume


def _run_args(source, out, psf_file, *extra):
    return (
        "run",
        source,
        out,
        "--psf",
        psf_file,
        "--iterations",
        ITERATIONS,
        "--chunks",
        ",".join(map(str, CHUNKS)),
        "--no-progress",
        *extra,
    )


def _records(out):
    return {p.name: p.read_text() for p in progress_folder(out).iterdir() if p.name[0] != "."}


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, big_input, psf3d, psf3d_file):
    source, volume = big_input
    before = tree_digest(source)
    out = tmp_path / "out.zarr"
    args = _run_args(source, out, psf3d_file, "--workers", 1)
    process = start_cli(*args, folder=tmp_path)
    wait_for_records(out, 3, process)
    kill_group(process)  # the client and its local cluster, as a scheduler's walltime kill does
    kept = _records(out)
    assert 3 <= len(kept) < TOTAL
    assert zarr.open_array(str(out), mode="r").attrs["ssi_dask"]["complete"] is False

    check = run_cli("verify", out)
    assert check.returncode == 1
    assert f"{len(kept)} of {TOTAL} chunks recorded as written, {TOTAL - len(kept)} missing" in (
        check.stdout
    )
    assert check.stdout.count("missing chunk [") == min(TOTAL - len(kept), 20)

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"{len(kept)} of {TOTAL} chunks already written, computing {TOTAL - len(kept)}"
        in resumed.stdout
    )
    after = _records(out)
    assert len(after) == TOTAL
    # the chunks finished before the kill were not recomputed: their records are untouched
    assert all(after[name] == text for name, text in kept.items())
    assert len({json.loads(text)["run"] for text in after.values()}) == 2

    uninterrupted = deconvolve(volume, psf3d, num_iter=ITERATIONS, chunks=CHUNKS).compute()
    output = zarr.open_array(str(out), mode="r")
    np.testing.assert_array_equal(output[...], uninterrupted)
    assert output.attrs["ssi_dask"]["complete"] is True
    assert output.attrs["ssi_dask"]["resumed"]
    check = run_cli("verify", out, "--check-data")
    assert check.returncode == 0, check.stdout
    assert f"complete: {TOTAL} of {TOTAL} chunks recorded as written, 0 missing, 0 damaged" in (
        check.stdout
    )
    assert tree_digest(source) == before

    finished = tree_digest(out)
    cases = {
        "iterations: 20 there, 21 now": ("--iterations", 21),
        "layout.grid": ("--chunks", "24,64,32"),
        "psf.sha256": ("--psf", _shifted_psf(tmp_path, psf3d)),
    }
    for detail, change in cases.items():
        refused = run_cli(*_run_args(source, out, psf3d_file, "--resume"), *change)
        _assert_refused(refused, detail)
    assert tree_digest(out) == finished
    same = run_cli(*_run_args(source, out, psf3d_file, "--resume", "--dry-run"))
    assert same.returncode == 0, same.stderr
    assert f"resume          {TOTAL} of {TOTAL} chunks already written" in same.stdout


def _shifted_psf(folder, psf):
    path = folder / "other_psf.tif"
    tifffile.imwrite(path, np.roll(psf, 1, axis=2))
    return path


def _assert_refused(result, detail):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "was made with different parameters" in lines[0]
    assert detail in lines[0]
    assert "or pass --overwrite to start again" in lines[0]


def test_torn_or_foreign_records_do_not_count(tmp_path, volume3d, psf3d):
    out = tmp_path / "out.zarr"
    lazy = deconvolve(volume3d, psf3d, num_iter=2, chunks=(24, 32, 32))
    write_zarr(lazy, out, attrs={"ssi_dask": {"method": "lr", "iterations": 2}})
    folder = progress_folder(out)
    (folder / "0.0.0").write_text('{"index": [0, 0, 0], "regi')  # a torn record
    record = json.loads((folder / "0.1.1").read_text())
    (folder / "0.1.1").write_text(json.dumps({**record, "fingerprint": "another-run"}))
    (folder / ".0.1.2.abc.tmp").write_text("{}")  # a writer killed before its rename
    (folder / "0.1.2").unlink()
    check = run_cli("verify", out)
    assert check.returncode == 1
    assert "3 of 6 chunks recorded as written, 3 missing" in check.stdout
    for region in ("[0:24, 0:32, 0:32]", "[0:24, 32:64, 32:64]", "[0:24, 32:64, 64:96]"):
        assert f"missing chunk {region}" in check.stdout
    assert records_written(out) == 5  # the torn and the foreign record are files, not records
