"""Every bad input of the README's table: one line on stderr, exit status 2, the input unchanged
and no existing output damaged. Failures found before any work run the CLI's ``main`` in this
process; failures during a run go through the real command and a real local cluster."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from _processes import free_port
from conftest import run_cli, tree_digest

from ssi_dask.cli import main


@pytest.fixture
def ws(tmp_path, volume3d, psf3d):
    """An input, a PSF and an earlier result that must survive every failure."""
    source = tmp_path / "input.zarr"
    zarr.create_array(store=str(source), shape=volume3d.shape, chunks=(24, 16, 16), dtype="f4")[
        ...
    ] = volume3d
    psf = tmp_path / "psf.tif"
    tifffile.imwrite(psf, psf3d)
    previous = tmp_path / "previous.zarr"
    zarr.create_array(store=str(previous), shape=(4, 4), dtype="f4")[...] = 7
    return {"dir": tmp_path, "input": source, "psf": psf, "previous": previous}


def _digests(ws, *extra: Path) -> dict:
    paths = [ws["input"], ws["psf"], ws["previous"], *extra]
    return {str(p): tree_digest(p) for p in paths if p.exists()}


def _in_process(capsys, *args) -> tuple[int, str]:
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def _as_command(*args, preexec_fn=None) -> tuple[int, str]:
    result = run_cli(*args, timeout=300, preexec_fn=preexec_fn)
    return result.returncode, result.stderr


def _check(status: int, stderr: str, message: str, before: dict, ws, *extra: Path) -> str:
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("ssi-dask: error: ")
    assert message in lines[0], lines[0]
    assert _digests(ws, *extra) == before  # the input, PSF and every existing output untouched
    return lines[0]


def _checkpoint(path: Path, ndim: int) -> Path:
    from ssi_dask.psf import protocol_psf
    from ssi_dask.ssi import DEFAULTS, SSIModel, UNet, save_checkpoint

    network = UNet(ndim, levels=DEFAULTS[ndim]["levels"], base_channels=4)
    save_checkpoint(SSIModel(network, {"offset": 0.0, "scale": 1.0}, protocol_psf(ndim)), path)
    return path


def _zarr(path: Path, shape, dtype) -> Path:
    zarr.create_array(store=str(path), shape=shape, chunks=shape, dtype=dtype)
    return path


# name -> (how to build the arguments and extra paths, expected message)
def _before_work_cases(ws):
    d, src, psf = ws["dir"], ws["input"], ws["psf"]
    out = d / "out.zarr"
    corrupt = d / "corrupt.zarr"
    corrupt.mkdir()
    (corrupt / "zarr.json").write_text("{ not json")
    bigger_psf = d / "big_psf.tif"
    tifffile.imwrite(bigger_psf, np.ones((31, 9, 9), np.float32))
    nan_psf = d / "nan_psf.npy"
    np.save(nan_psf, np.full((3, 5, 5), np.nan, np.float32))
    garbage = d / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    return {
        "missing input": (
            ("run", d / "nope.zarr", out, "--psf", psf),
            "does not exist; check the path",
        ),
        "unreadable input": (
            ("run", corrupt, out, "--psf", psf),
            f"input '{corrupt}' could not be opened as Zarr",
        ),
        "wrong dtype": (
            ("run", _zarr(d / "bool.zarr", (8, 8, 8), bool), out, "--psf", psf),
            "has dtype bool; convert it to an integer or floating-point image first",
        ),
        "wrong dimensionality": (
            ("run", _zarr(d / "4d.zarr", (2, 8, 8, 8), "f4"), out, "--psf", psf),
            "has 4 dimensions (2, 8, 8, 8); give a 2D (y, x) or 3D (z, y, x) image",
        ),
        "PSF with NaN": (("run", src, out, "--psf", nan_psf), "contains NaN or Inf values"),
        "PSF larger than a chunk": (
            ("run", src, out, "--psf", psf, "--chunks", "24,8,8"),
            "halo 12 along axis 1 exceeds the smallest working chunk 8; use larger --chunks "
            "(e.g. --chunks 24,16,16)",
        ),
        "PSF larger than the image": (
            ("run", src, out, "--psf", bigger_psf),
            "the PSF (31 along axis 0) is larger than the image (24); crop the PSF",
        ),
        "invalid chunk spec": (
            ("run", src, out, "--psf", psf, "--chunks", "a,b"),
            "invalid chunk spec 'a,b'; give integers separated by commas, e.g. 256,256,256",
        ),
        "misaligned shards": (
            ("run", src, out, "--psf", psf, "--chunks", "24,32,32", "--output-shards", "24,64,32"),
            "not multiples of the shard size 64: two tasks would rewrite the same shard",
        ),
        "invalid checkpoint": (
            ("run", src, out, "--psf", psf, "--method", "ssi", "--model", garbage),
            "is unreadable or corrupt",
        ),
        "mismatched checkpoint": (
            (
                "run",
                src,
                out,
                "--psf",
                psf,
                "--method",
                "ssi",
                "--model",
                _checkpoint(d / "model2d.pt", 2),
            ),
            "is for 2D images but the input is 3D; train a model on this data",
        ),  # fmt: skip
        "output exists": (
            ("run", src, ws["previous"], "--psf", psf),
            "already exists; choose a new path or pass --overwrite",
        ),
        "output is the input": (
            ("run", src, src, "--psf", psf, "--overwrite"),
            "is the input; the input is never written or deleted: choose an output path outside it",
        ),
        "resume and overwrite": (
            ("run", src, ws["previous"], "--psf", psf, "--resume", "--overwrite"),
            "--resume keeps the output and --overwrite deletes it; give only one",
        ),
        "resume of a foreign output": (
            ("run", src, ws["previous"], "--psf", psf, "--resume"),
            "has no ssi-dask progress records; cannot resume it",
        ),
    }


def test_bad_inputs_found_before_any_work(ws, capsys):
    cases = _before_work_cases(ws)
    extras = [ws["dir"] / name for name in ("corrupt.zarr", "bool.zarr", "4d.zarr")]
    before = _digests(ws, *extras)
    for name, (args, message) in cases.items():
        status, stderr = _in_process(capsys, *args)
        try:
            _check(status, stderr, message, before, ws, *extras)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
        assert not (ws["dir"] / "out.zarr").exists(), name


def test_verify_of_something_else(ws, capsys):
    before = _digests(ws)
    status, stderr = _in_process(capsys, "verify", ws["previous"])
    _check(status, stderr, "has no ssi-dask progress metadata", before, ws)
    status, stderr = _in_process(capsys, "verify", ws["dir"] / "missing.zarr")
    _check(status, stderr, "does not exist; check the path", before, ws)


def test_nan_in_the_data(ws, volume3d):
    source = ws["dir"] / "nan.zarr"
    volume = volume3d.copy()
    volume[5, 48, 80] = np.nan  # farther than the halo (10) from other chunks
    zarr.create_array(store=str(source), shape=volume.shape, chunks=(24, 16, 16), dtype="f4")[
        ...
    ] = volume
    before = _digests(ws, source)
    out = ws["dir"] / "out.zarr"
    status, stderr = _as_command(
        "run", source, out, "--psf", ws["psf"], "--chunks", "24,32,32", "--workers", 1,
        "--iterations", 2, "--no-progress",
    )  # fmt: skip
    line = _check(status, stderr, "the input contains NaN or Inf values", before, ws, source)
    assert "replace them (e.g. numpy.nan_to_num) before deconvolving" in line
    assert "(chunk [0:24, 32:64, 64:96])" in line  # the working chunk holding the NaN
    assert zarr.open_array(str(out), mode="r").attrs["ssi_dask"]["complete"] is False


def test_unreadable_chunk_of_the_input(ws):
    chunk = ws["input"] / "c" / "0" / "1" / "2"
    chunk.write_bytes(b"garbage" * 10)  # a damaged file in the input store
    before = _digests(ws)
    out = ws["dir"] / "out.zarr"
    # one working chunk: no neighbour reads the damaged file first
    status, stderr = _as_command(
        "run", ws["input"], out, "--psf", ws["psf"], "--chunks", "24,64,96", "--workers", 1,
        "--iterations", 2, "--no-progress",
    )  # fmt: skip
    line = _check(status, stderr, "computing the chunk [0:24, 0:64, 0:96] failed", before, ws)
    assert "check the input there (a corrupt or unreadable file?)" in line
    assert "re-run with --resume" in line


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """Mount a tmpfs at ``path`` (needs root); yields False where that is not possible."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_output_on_a_read_only_path(ws, capsys):
    before = _digests(ws)
    with _tmpfs(ws["dir"] / "ro", "ro,size=1m") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("cannot mount a read-only tmpfs, and root ignores chmod")
            (ws["dir"] / "ro").chmod(0o555)
        status, stderr = _in_process(capsys, "run", ws["input"], ws["dir"] / "ro" / "out.zarr",
                                     "--psf", ws["psf"])  # fmt: skip
        _check(status, stderr, f"cannot write to '{ws['dir'] / 'ro'}' (read-only)", before, ws)
        assert not (ws["dir"] / "ro" / "out.zarr").exists()


def test_disk_full_during_the_write(ws):
    before = _digests(ws)
    folder = ws["dir"] / "small"
    args = ("run", ws["input"], folder / "out.zarr", "--psf", ws["psf"], "--chunks", "24,16,16",
            "--workers", 1, "--iterations", 2, "--no-progress")  # fmt: skip
    with _tmpfs(folder, "size=64k") as mounted:
        if mounted:
            status, stderr = _as_command(*args)
        else:  # no tmpfs: a file-size limit for the command and its workers instead
            limit = 8192
            status, stderr = _as_command(
                *args,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
            )
        line = _check(
            status, stderr, f"the disk is full writing '{folder / 'out.zarr'}'", before, ws
        )
        assert "free space or choose another output, then re-run with --resume" in line
        output = zarr.open_array(str(folder / "out.zarr"), mode="r")
        assert output.attrs["ssi_dask"]["complete"] is False


def test_scheduler_unreachable(ws):
    before = _digests(ws)
    address = f"tcp://127.0.0.1:{free_port()}"
    out = ws["dir"] / "out.zarr"
    status, stderr = _as_command(
        "run", ws["input"], out, "--psf", ws["psf"], "--scheduler", address,
        "--connect-timeout", 1,
    )  # fmt: skip
    _check(status, stderr, f"cannot reach the Dask scheduler at {address} within 1 s", before, ws)
    assert not out.exists()
