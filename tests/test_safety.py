"""Trust: the input is never written or deleted, --overwrite deletes only what ssi-dask made,
and one run at a time writes an output (issue 13, items 1 and 2).

Every refusal is checked for its one-line message, exit status 2, the input's checksum before
and after, and that nothing was created or removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from _processes import DaskProcesses, kill_group, start_cli
from conftest import run_cli, smooth_volume, tree_digest
from test_ome import write_ome_input

from ssi_dask import deconvolve, write_zarr
from ssi_dask.cli import main
from ssi_dask.errors import OutputError
from ssi_dask.psf import widefield_psf
from ssi_dask.safety import LOCK_FILE, MARKER_FILE, output_lock


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A folder with a small 3D Zarr input and its PSF; the tests run inside it."""
    monkeypatch.chdir(tmp_path)
    array = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=(12, 48, 48), chunks=(12, 24, 24), dtype="float32"
    )
    array[...] = smooth_volume((12, 48, 48), seed=3)
    np.save(
        tmp_path / "psf.npy", widefield_psf((5, 7, 7), (0.3, 0.15, 0.15), na=1.0, wavelength=0.5)
    )
    return tmp_path


def refused(capsys, argv: list[str], *protected: Path) -> str:
    """Run the CLI in-process; assert exit 2, one stderr line, the protected trees unchanged."""
    before = {p: tree_digest(p) for p in protected}
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ssi-dask: error: ")
    for path, digest in before.items():
        assert path.exists() and tree_digest(path) == digest, path
    return err


def run_ok(ws: Path, output: str, *extra: str) -> None:
    result = run_cli(
        "run",
        "in.zarr",
        output,
        "--psf",
        "psf.npy",
        "--iterations",
        "2",
        "--workers",
        "1",
        "--no-progress",
        *extra,
        cwd=ws,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------
# Item 1: nothing inside or above the input


def test_output_inside_the_input_store_is_refused(ws, capsys):
    err = refused(
        capsys, ["run", "in.zarr", "in.zarr/out.zarr", "--psf", "psf.npy"], ws / "in.zarr"
    )
    assert f"output '{ws}/in.zarr/out.zarr' is inside the input '{ws}/in.zarr'" in err
    assert "choose an output path outside it" in err
    assert not (ws / "in.zarr" / "out.zarr").exists()


def test_output_equal_to_the_input_with_overwrite_is_refused(ws, capsys):
    err = refused(
        capsys, ["run", "in.zarr", "in.zarr", "--psf", "psf.npy", "--overwrite"], ws / "in.zarr"
    )
    assert f"output '{ws}/in.zarr' is the input" in err


def test_output_that_contains_the_input_is_refused(ws, capsys):
    (ws / "sub").mkdir()
    (ws / "in.zarr").rename(ws / "sub" / "in.zarr")
    err = refused(
        capsys, ["run", "sub/in.zarr", "sub", "--psf", "psf.npy", "--overwrite"], ws / "sub"
    )
    assert f"output '{ws}/sub' contains the input '{ws}/sub/in.zarr'" in err


def test_symbolic_links_are_resolved(ws, capsys):
    (ws / "alias.zarr").symlink_to(ws / "in.zarr")
    (ws / "elsewhere").symlink_to(ws / "in.zarr", target_is_directory=True)
    err = refused(
        capsys, ["run", "in.zarr", "alias.zarr", "--psf", "psf.npy", "--overwrite"], ws / "in.zarr"
    )
    assert f"output '{ws}/in.zarr' is the input" in err
    err = refused(
        capsys, ["run", "alias.zarr", "elsewhere/new.zarr", "--psf", "psf.npy"], ws / "in.zarr"
    )
    assert "is inside the input" in err


def test_array_inside_a_group_protects_the_whole_group(ws, capsys):
    group = zarr.open_group(str(ws / "group.zarr"), mode="w")
    data = group.create_array("raw", shape=(12, 48, 48), chunks=(12, 24, 24), dtype="float32")
    data[...] = smooth_volume((12, 48, 48), seed=4)
    err = refused(
        capsys,
        ["run", "group.zarr/raw", "group.zarr/deconvolved", "--psf", "psf.npy"],
        ws / "group.zarr",
    )
    assert f"is inside the input '{ws}/group.zarr'" in err


def test_ome_zarr_level_as_output_is_refused(ws, capsys):
    write_ome_input(ws / "img.ome.zarr", "0.5")
    psf = ws / "psf3.npy"
    np.save(psf, widefield_psf((5, 7, 7), (0.3, 0.15, 0.15), na=1.0, wavelength=0.5))
    for output in ("img.ome.zarr/0", "img.ome.zarr", "img.ome.zarr/new"):
        err = refused(
            capsys,
            ["run", "img.ome.zarr", output, "--psf", psf, "--overwrite"],
            ws / "img.ome.zarr",
        )
        assert "the input is never written or deleted" in err


def test_tiff_input_and_psf_are_protected(ws, capsys):
    tifffile.imwrite(ws / "in.tif", smooth_volume((12, 48, 48), seed=5))
    err = refused(
        capsys, ["run", "in.tif", "in.tif", "--psf", "psf.npy", "--overwrite"], ws / "in.tif"
    )
    assert f"output '{ws}/in.tif' is the input" in err
    err = refused(capsys, ["run", "in.tif", ".", "--psf", "psf.npy", "--overwrite"], ws / "in.tif")
    assert f"contains the input '{ws}/in.tif'" in err
    err = refused(
        capsys, ["run", "in.zarr", "psf.npy", "--psf", "psf.npy", "--overwrite"], ws / "psf.npy"
    )
    assert f"output '{ws}/psf.npy' is the input" in err
    err = refused(
        capsys,
        ["train", "in.tif", "--psf", "psf.npy", "--out", "in.tif", "--overwrite"],
        ws / "in.tif",
    )
    assert "is the input" in err


def test_python_api_finds_the_input_in_the_graph(ws):
    """write_zarr protects what the lazy result reads, without being told the input path."""
    before = tree_digest(ws / "in.zarr")
    psf = np.load(ws / "psf.npy")
    lazy = deconvolve(str(ws / "in.zarr"), psf, num_iter=1)
    with pytest.raises(OutputError, match="is inside the input"):
        write_zarr(lazy, ws / "in.zarr" / "out.zarr")
    with pytest.raises(OutputError, match="is the input"):
        write_zarr(lazy, ws / "in.zarr", overwrite=True)
    plain = zarr.open_array(str(ws / "in.zarr"), mode="r")
    import dask.array as da

    with pytest.raises(OutputError, match="is inside the input"):
        write_zarr(da.from_array(plain, chunks=(12, 24, 24)) * 2, ws / "in.zarr" / "x")
    assert tree_digest(ws / "in.zarr") == before


# ------------------------------------------------------------------------------------------
# Item 2: --overwrite deletes only what this tool made


def test_overwrite_refuses_what_ssi_dask_did_not_make(ws, capsys):
    (ws / "notes").mkdir()
    (ws / "notes" / "thesis.txt").write_text("years of work")
    err = refused(
        capsys, ["run", "in.zarr", "notes", "--psf", "psf.npy", "--overwrite"], ws / "notes"
    )
    assert "exists and is not a Zarr store; refusing to delete it with --overwrite" in err

    foreign = zarr.create_array(store=str(ws / "theirs.zarr"), shape=(4,), dtype="f4")
    foreign[...] = 1
    err = refused(
        capsys,
        ["run", "in.zarr", "theirs.zarr", "--psf", "psf.npy", "--overwrite"],
        ws / "theirs.zarr",
    )
    assert "is a Zarr store that ssi-dask did not make; refusing to delete it" in err


def test_overwrite_refuses_extra_files_and_symlinks(ws, capsys):
    run_ok(ws, "out.zarr")
    assert (ws / "out.zarr" / MARKER_FILE).is_file()
    assert not (ws / "out.zarr" / LOCK_FILE).exists()  # released at the end of the run
    (ws / "out.zarr" / "analysis.csv").write_text("1,2,3")
    err = refused(
        capsys, ["run", "in.zarr", "out.zarr", "--psf", "psf.npy", "--overwrite"], ws / "out.zarr"
    )
    assert "holds files that are not part of a Zarr store ('analysis.csv')" in err
    (ws / "out.zarr" / "analysis.csv").unlink()
    (ws / "link.zarr").symlink_to(ws / "out.zarr")
    err = refused(
        capsys, ["run", "in.zarr", "link.zarr", "--psf", "psf.npy", "--overwrite"], ws / "out.zarr"
    )
    assert f"output '{ws}/link.zarr' is a symbolic link (to '{ws}/out.zarr')" in err
    # what ssi-dask made, with only Zarr files in it, is replaced
    first = np.asarray(zarr.open_array(str(ws / "out.zarr"))[...])
    run_ok(ws, "out.zarr", "--overwrite", "--iterations", "3")
    second = zarr.open_array(str(ws / "out.zarr"))
    assert second.attrs["ssi_dask"]["iterations"] == 3 and second.attrs["ssi_dask"]["complete"]
    assert not np.array_equal(first, second[...])
    assert not [p for p in ws.iterdir() if "deleting" in p.name]  # the old store is gone


def test_make_example_overwrite_follows_the_same_rule(tmp_path, capsys):
    (tmp_path / "ex" / "volume.zarr").mkdir(parents=True)
    (tmp_path / "ex" / "volume.zarr" / "data.txt").write_text("keep me")
    err = refused(
        capsys,
        ["make-example", tmp_path / "ex", "--shape", "17,32,32", "--overwrite"],
        tmp_path / "ex",
    )
    assert "volume.zarr' exists and is not a Zarr store; refusing to delete it" in err
    (tmp_path / "ex" / "volume.zarr" / "data.txt").unlink()
    (tmp_path / "ex" / "volume.zarr").rmdir()
    (tmp_path / "real.zarr").mkdir()
    (tmp_path / "ex" / "volume.zarr").symlink_to(tmp_path / "real.zarr")
    err = refused(
        capsys,
        ["make-example", tmp_path / "ex", "--shape", "17,32,32", "--overwrite"],
        tmp_path / "ex",
    )
    assert "volume.zarr' is a symbolic link" in err
    (tmp_path / "ex" / "volume.zarr").unlink()
    assert main(["make-example", str(tmp_path / "ex"), "--shape", "17,32,32"]) == 0
    first = np.asarray(zarr.open_array(str(tmp_path / "ex" / "volume.zarr"))[...])
    capsys.readouterr()
    assert (
        main(
            [
                "make-example",
                str(tmp_path / "ex"),
                "--shape",
                "17,32,32",
                "--seed",
                "1",
                "--overwrite",
            ]
        )
        == 0
    )
    second = np.asarray(zarr.open_array(str(tmp_path / "ex" / "volume.zarr"))[...])
    assert not np.array_equal(first, second)


# ------------------------------------------------------------------------------------------
# Item 2: one run per output (the lock)


def test_a_second_run_on_a_locked_output_is_refused(ws, capsys):
    run_ok(ws, "out.zarr")
    before = tree_digest(ws / "out.zarr")
    with output_lock(ws / "out.zarr"):  # this (live) process holds the output
        for flag in ("--resume", "--overwrite"):
            result = run_cli(
                "run",
                "in.zarr",
                "out.zarr",
                "--psf",
                "psf.npy",
                "--iterations",
                "2",
                flag,
                cwd=ws,
            )
            assert result.returncode == 2
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert (
                f"output '{ws}/out.zarr' is being written by another ssi-dask run (pid "
                f"{os.getpid()}" in lines[0]
            )
            assert "wait for it to finish or choose another output" in lines[0]
        lock = json.loads((ws / "out.zarr" / LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid()
    assert not (ws / "out.zarr" / LOCK_FILE).exists()
    assert tree_digest(ws / "out.zarr") == before


def test_a_stale_lock_is_taken_over(ws):
    run_ok(ws, "out.zarr")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (ws / "out.zarr" / LOCK_FILE).write_text(
        json.dumps({"host": os.uname().nodename, "pid": pid, "process_start": 1.0})
    )
    run_ok(ws, "out.zarr", "--overwrite")
    assert not (ws / "out.zarr" / LOCK_FILE).exists()
    assert zarr.open_array(str(ws / "out.zarr")).attrs["ssi_dask"]["complete"] is True


def test_two_runs_at_once(ws):
    """Two real processes on one output: the second is refused in one line while the first
    holds the output, and the first ends complete with every record.

    The first run is held at its writing stage deterministically: it connects to a real
    ``dask scheduler`` that has no worker yet, so it waits with the lock taken.
    """
    cluster = DaskProcesses(ws, n_workers=0)
    first = start_cli(
        "run",
        "in.zarr",
        "out.zarr",
        "--psf",
        "psf.npy",
        "--iterations",
        "2",
        "--scheduler",
        cluster.address,
        "--no-progress",
        folder=ws,
    )
    try:
        deadline = time.monotonic() + 120
        while not (ws / "out.zarr" / LOCK_FILE).exists():
            assert first.poll() is None, (ws / "cli.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for flag in ("--resume", "--overwrite"):
            second = run_cli(
                "run",
                "in.zarr",
                "out.zarr",
                "--psf",
                "psf.npy",
                "--iterations",
                "2",
                flag,
                cwd=ws,
            )
            assert second.returncode == 2
            assert len(second.stderr.strip().splitlines()) == 1, second.stderr
            assert "is being written by another ssi-dask run (pid " in second.stderr
        cluster.workers.append(cluster.start_worker())
        assert first.wait(timeout=180) == 0, (ws / "cli.err").read_text()
    finally:
        if first.poll() is None:
            kill_group(first)
        cluster.close()
    attrs = zarr.open_array(str(ws / "out.zarr")).attrs["ssi_dask"]
    assert attrs["complete"] is True and attrs["chunks_written"] == attrs["layout"]["chunks_total"]
    assert not (ws / "out.zarr" / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------
# Cases found by trying to break the rules above


def test_symlink_then_dotdot_is_resolved_like_the_system_does(ws, capsys):
    """``lnk/../x`` names the folder above the link's target, not the one beside the link."""
    (ws / "far").mkdir()
    (ws / "far" / "sub").mkdir()
    (ws / "in.zarr").rename(ws / "far" / "in.zarr")
    (ws / "psf.npy").rename(ws / "far" / "psf.npy")
    (ws / "lnk").symlink_to(ws / "far" / "sub", target_is_directory=True)
    err = refused(
        capsys,
        ["run", "far/in.zarr", "lnk/../in.zarr/x", "--psf", "far/psf.npy"],
        ws / "far",
    )
    assert f"is inside the input '{ws}/far/in.zarr'" in err
    err = refused(
        capsys,
        [
            "psf",
            "lnk/../psf.npy",
            "--shape",
            "5,7,7",
            "--voxel-size",
            "0.3,0.15,0.15",
            "--na",
            "1.0",
            "--wavelength",
            "0.5",
        ],
        ws / "far",
    )
    assert f"'{ws}/far/psf.npy' already exists" in err
    err = refused(
        capsys,
        ["train", "far/in.zarr", "--psf", "far/psf.npy", "--out", "lnk/../psf.npy", "--overwrite"],
        ws / "far",
    )
    assert f"'{ws}/far/psf.npy' is the input" in err


def test_python_api_sources_of_every_kind(ws):
    import dask.array as da
    import xarray as xr

    from ssi_dask.safety import source_paths

    assert source_paths(da.from_zarr(str(ws / "in.zarr"))) == [ws / "in.zarr"]
    assert source_paths(da.from_zarr(str(ws / "in.zarr"), inline_array=True)) == [ws / "in.zarr"]
    xr.Dataset({"img": (("y", "x"), np.ones((8, 8), "f4"))}).to_zarr(ws / "ds.zarr")
    lazy = xr.open_zarr(ws / "ds.zarr")["img"].data * 2
    assert source_paths(lazy) == [ws / "ds.zarr" / "img"]
    before = tree_digest(ws / "ds.zarr")
    with pytest.raises(OutputError, match="is inside the input"):
        write_zarr(lazy, ws / "ds.zarr" / "img_deconvolved")
    assert tree_digest(ws / "ds.zarr") == before
    # a relative store path is not mistaken for the current folder
    psf = np.load(ws / "psf.npy")
    result = deconvolve(da.from_zarr("in.zarr"), psf, num_iter=1)
    write_zarr(result, "new.zarr")
    assert zarr.open_array(str(ws / "new.zarr")).attrs["ssi_dask"]["complete"] is True


def test_the_lock_holds_within_one_process(ws):
    (ws / "out.zarr").mkdir()
    with output_lock(ws / "out.zarr"):
        with pytest.raises(OutputError, match="by another ssi-dask run in this process"):
            with output_lock(ws / "out.zarr"):
                pass
    (ws / "out.zarr" / LOCK_FILE).mkdir()
    with pytest.raises(OutputError, match="is a folder or a symbolic link, not an ssi-dask lock"):
        with output_lock(ws / "out.zarr"):
            pass


def test_overwrite_keeps_user_groups_and_accepts_own_leftovers(ws, capsys):
    run_ok(ws, "out.zarr")
    # the tool's own leftovers of a killed run do not block --overwrite
    chunk_folder = next(p for p in (ws / "out.zarr" / "c").rglob("*") if p.is_dir())
    (chunk_folder / "0.3f9a2c.partial").write_bytes(b"half a chunk")
    (ws / "out.zarr" / ".ssi_dask_progress" / ".0.0.0.abc.tmp").write_text("{")
    (ws / "out.zarr" / "..ssi_dask.lock.123.tmp").write_text("{}")
    run_ok(ws, "out.zarr", "--overwrite")
    # a user's group nested in an ssi-dask output is not the tool's to delete
    zarr.open_group(str(ws / "out.zarr" / "labels"), mode="w").create_array(
        "cells", shape=(4,), dtype="u2"
    )
    err = refused(
        capsys, ["run", "in.zarr", "out.zarr", "--psf", "psf.npy", "--overwrite"], ws / "out.zarr"
    )
    assert "holds files that are not part of a Zarr store ('labels/')" in err
    # a user's store that merely carries ssi_dask attributes is not the tool's either
    theirs = zarr.create_array(store=str(ws / "theirs.zarr"), shape=(4,), dtype="f4")
    theirs.attrs["ssi_dask"] = {"fingerprint": "x", "method": "lr"}
    refused(
        capsys,
        ["run", "in.zarr", "theirs.zarr", "--psf", "psf.npy", "--overwrite"],
        ws / "theirs.zarr",
    )


def test_make_example_in_a_new_folder_and_a_users_psf(tmp_path, capsys):
    assert main(["make-example", str(tmp_path / "new"), "--shape", "17,32,32"]) == 0
    assert (tmp_path / "new" / "volume.zarr" / MARKER_FILE).is_file()
    (tmp_path / "mine").mkdir()
    tifffile.imwrite(tmp_path / "mine" / "psf.tif", np.ones((5, 5), "f4"))
    err = refused(
        capsys,
        ["make-example", tmp_path / "mine", "--shape", "17,32,32", "--overwrite"],
        tmp_path / "mine",
    )
    assert "psf.tif' was not written by ssi-dask; refusing to replace it" in err
    assert not (tmp_path / "mine" / "volume.zarr").exists()
