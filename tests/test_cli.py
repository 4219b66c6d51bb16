"""The ``ssi-dask`` command end to end: real processes, a real LocalCluster, real Zarr stores."""

from __future__ import annotations

import argparse
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import run_cli, tree_digest

from ssi_dask import deconvolve
from ssi_dask.cli import build_parser
from ssi_dask.safety import write_marker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_lr_end_to_end(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    before = tree_digest(zarr3d)
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run",
        zarr3d,
        out,
        "--psf",
        psf3d_file,
        "--iterations",
        6,
        "--chunks",
        "24,32,32",
        "--workers",
        2,
        "--threads-per-worker",
        1,
    )
    assert result.returncode == 0, result.stderr
    assert "dashboard at http" in result.stdout
    assert "done in" in result.stdout
    output = zarr.open_array(str(out), mode="r")
    expected = deconvolve(volume3d, psf3d, num_iter=6, chunks=(24, 32, 32)).compute()
    assert output.shape == volume3d.shape and output.dtype == np.float32
    np.testing.assert_allclose(output[...], expected, rtol=1e-5, atol=1e-6)
    provenance = output.attrs["ssi_dask"]
    assert provenance["method"] == "lr" and provenance["iterations"] == 6
    assert provenance["psf"]["shape"] == list(psf3d.shape)
    assert provenance["input"] == str(zarr3d.resolve())
    assert provenance["version"] and provenance["complete"] is True
    assert output.chunks == (24, 16, 16)  # the input's chunks
    assert tree_digest(zarr3d) == before


def test_overwrite_replaces_and_dry_run_writes_nothing(tmp_path, zarr3d, psf3d_file):
    out = tmp_path / "out.zarr"
    zarr.create_array(store=str(out), shape=(3, 3), dtype="float32")[...] = 5
    write_marker(out)  # a store ssi-dask made (only those are replaced: tests/test_safety.py)
    dry = run_cli("run", zarr3d, tmp_path / "dry.zarr", "--psf", psf3d_file, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "halo (depth)" in dry.stdout and "tasks in graph" in dry.stdout
    assert not (tmp_path / "dry.zarr").exists()
    result = run_cli(
        "run",
        zarr3d,
        out,
        "--psf",
        psf3d_file,
        "--iterations",
        2,
        "--overwrite",
        "--workers",
        1,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert zarr.open_array(str(out), mode="r").shape == (24, 64, 96)


def _write_psf(path: Path, array: np.ndarray) -> Path:
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        tifffile.imwrite(path, array)
    return path


BAD_PSFS = {
    "nan": (np.full((3, 5, 5), np.nan, np.float32), "contains NaN or Inf"),
    "negative": (-np.ones((3, 5, 5), np.float32), "has negative values"),
    "zero": (np.zeros((3, 5, 5), np.float32), "sums to zero"),
    "wrong-ndim": (np.ones((5, 5), np.float32), "has 2 dimensions but the image has 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_PSFS))
def test_bad_psf_gets_one_line(tmp_path, zarr3d, case):
    array, message = BAD_PSFS[case]
    psf = _write_psf(tmp_path / f"{case}.npy", array)
    before = tree_digest(zarr3d)
    result = run_cli("run", zarr3d, tmp_path / "out.zarr", "--psf", psf)
    _assert_clean_failure(result, message)
    assert tree_digest(zarr3d) == before
    assert not (tmp_path / "out.zarr").exists()


def _assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ssi-dask: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_input(tmp_path, psf3d_file):
    result = run_cli("run", tmp_path / "nope.zarr", tmp_path / "out.zarr", "--psf", psf3d_file)
    _assert_clean_failure(result, "does not exist; check the path")


def test_input_is_not_an_array(tmp_path, psf3d_file):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    result = run_cli("run", plain, tmp_path / "out.zarr", "--psf", psf3d_file)
    _assert_clean_failure(result, "is not a Zarr array")
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("0", shape=(8, 8, 8), dtype="float32")
    result = run_cli("run", tmp_path / "group.zarr", tmp_path / "out.zarr", "--psf", psf3d_file)
    _assert_clean_failure(result, "is a Zarr group, not an array")
    assert "group.zarr/0" in result.stderr


def test_missing_psf(tmp_path, zarr3d):
    result = run_cli("run", zarr3d, tmp_path / "out.zarr", "--psf", tmp_path / "none.tif")
    _assert_clean_failure(result, "does not exist; check the path given to --psf")


def test_existing_output_is_left_untouched(tmp_path, zarr3d, psf3d_file):
    out = tmp_path / "out.zarr"
    zarr.create_array(store=str(out), shape=(3, 3), dtype="float32")[...] = 5
    before = tree_digest(out)
    result = run_cli("run", zarr3d, out, "--psf", psf3d_file)
    _assert_clean_failure(result, "already exists; choose a new path or pass --overwrite")
    assert tree_digest(out) == before


def test_output_equal_to_input(zarr3d, psf3d_file):
    before = tree_digest(zarr3d)
    result = run_cli("run", zarr3d, zarr3d, "--psf", psf3d_file, "--overwrite")
    _assert_clean_failure(result, "is the input")
    assert tree_digest(zarr3d) == before


def test_overwrite_refuses_non_zarr_directory(tmp_path, zarr3d, psf3d_file):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    result = run_cli("run", zarr3d, precious, "--psf", psf3d_file, "--overwrite")
    _assert_clean_failure(result, "is not a Zarr store; refusing to delete it")
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_unreachable_scheduler_fails_fast(tmp_path, zarr3d, psf3d_file):
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli(
        "run",
        zarr3d,
        tmp_path / "out.zarr",
        "--psf",
        psf3d_file,
        "--scheduler",
        address,
        "--connect-timeout",
        2,
    )
    _assert_clean_failure(result, f"cannot reach the Dask scheduler at {address}")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out.zarr").exists()


def test_invalid_chunk_spec(tmp_path, zarr3d, psf3d_file):
    result = run_cli("run", zarr3d, tmp_path / "o.zarr", "--psf", psf3d_file, "--chunks", "a,b")
    _assert_clean_failure(result, "invalid chunk spec")


def test_psf_command_writes_normalised_kernel(tmp_path):
    out = tmp_path / "psf.tif"
    result = run_cli(
        "psf",
        out,
        "--na",
        0.8,
        "--wavelength",
        0.6,
        "--voxel-size",
        "0.406,0.406,0.406",
        "--shape",
        "17,17,17",
    )
    assert result.returncode == 0, result.stderr
    psf = tifffile.imread(out)
    assert psf.shape == (17, 17, 17)
    assert abs(float(psf.sum()) - 1) < 1e-5
    assert np.unravel_index(psf.argmax(), psf.shape) == (8, 8, 8)
    again = run_cli(
        "psf", out, "--na", 0.8, "--wavelength", 0.6, "--voxel-size", "0.4,0.4", "--shape", "9,9"
    )
    _assert_clean_failure(again, "already exists")


def test_help_documents_every_option():
    parser = build_parser()
    top = run_cli("--help")
    assert top.returncode == 0
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        assert name in top.stdout
        text = run_cli(name, "--help").stdout
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:  # a hidden alias of an old flag name
                assert all(option not in text for option in action.option_strings)
                continue
            for option in action.option_strings:
                assert option in text, (name, option)
            if action.option_strings and action.help is not None:
                assert action.help.split()[0] in text


def test_run_zarr_v2_input_gives_v2_output(tmp_path, volume3d, psf3d_file, psf3d):
    source = tmp_path / "v2.zarr"
    array = zarr.create_array(
        store=str(source),
        shape=volume3d.shape,
        chunks=(24, 32, 32),
        dtype="uint16",
        zarr_format=2,
    )
    array[...] = np.round(volume3d * 1000).astype(np.uint16)
    out = tmp_path / "out_v2.zarr"
    result = run_cli(
        "run",
        source,
        out,
        "--psf",
        psf3d_file,
        "--iterations",
        4,
        "--workers",
        1,
        "--chunks",
        "24,32,32",
    )
    assert result.returncode == 0, result.stderr
    assert (out / ".zarray").exists()
    expected = deconvolve(array[...], psf3d, num_iter=4, chunks=(24, 32, 32)).compute()
    output = zarr.open_array(str(out), mode="r")
    assert output.dtype == np.float32
    np.testing.assert_allclose(output[...], expected, rtol=1e-5, atol=1e-3)


def test_input_with_wrong_dimensionality(tmp_path, psf3d_file):
    path = tmp_path / "4d.zarr"
    zarr.create_array(store=str(path), shape=(2, 8, 8, 8), dtype="float32")
    result = run_cli("run", path, tmp_path / "o.zarr", "--psf", psf3d_file)
    _assert_clean_failure(result, "has 4 dimensions (2, 8, 8, 8); give a 2D (y, x) or 3D")


def test_run_reads_tiff_lazily(tmp_path, volume3d, psf3d_file, psf3d):
    source = tmp_path / "stack.tif"
    tifffile.imwrite(source, volume3d, tile=(32, 32))
    out = tmp_path / "from_tiff.zarr"
    result = run_cli(
        "run",
        source,
        out,
        "--psf",
        psf3d_file,
        "--iterations",
        3,
        "--chunks",
        "24,32,32",
        "--workers",
        1,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    expected = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 32)).compute()
    output = zarr.open_array(str(out), mode="r")
    np.testing.assert_allclose(output[...], expected, rtol=1e-5, atol=1e-6)
    assert output.attrs["ssi_dask"]["input"] == str(source.resolve())
