"""Issue 13, items 3 and 4 (and the missing input chunks of item 5): resume is keyed on content,
``verify`` finds lost and damaged chunks, ``--resume --repair`` mends them."""

from __future__ import annotations

import json
import shutil

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from conftest import run_cli, tree_digest
from test_bad_input import _checkpoint

from ssi_dask import deconvolve, write_zarr
from ssi_dask.errors import CheckpointError, OutputError
from ssi_dask.progress import progress_folder
from ssi_dask.ssi import load_checkpoint
from ssi_dask.verify import verify_output

CHUNKS = (24, 32, 32)
ITERATIONS = 2


def _run(source, out, psf_file, *extra):
    return run_cli(
        "run", source, out, "--psf", psf_file, "--iterations", ITERATIONS,
        "--chunks", ",".join(map(str, CHUNKS)), "--workers", 1, "--no-progress", *extra,
    )  # fmt: skip


def _one_line_error(result, status=2):
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_verify_finds_lost_and_undecodable_chunks_and_repair_restores_them(
    tmp_path, zarr3d, volume3d, psf3d, psf3d_file
):
    before = tree_digest(zarr3d)
    out = tmp_path / "out.zarr"
    assert _run(zarr3d, out, psf3d_file).returncode == 0
    # output chunks (24, 16, 16): working chunk (0, 0, 0) owns c/0/0/0, (0, 1, 1) owns c/0/2/2
    (out / "c" / "0" / "0" / "0").unlink()
    (out / "c" / "0" / "2" / "2").write_bytes(b"\x00garbage, not zstd" * 8)

    plain = run_cli("verify", out)
    assert plain.returncode == 1
    assert plain.stdout.splitlines() == [
        f"{out}: INCOMPLETE: 5 of 6 chunks recorded as written, 1 missing; completion flag set",
        "  missing chunk [0:24, 0:32, 0:32] (recorded, but its file 'c/0/0/0' is gone)",
        "  re-run the same `ssi-dask run` command with --resume to finish it",
    ]
    checked = run_cli("verify", out, "--check-data")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[0] == (
        f"{out}: INCOMPLETE: 5 of 6 chunks recorded as written, 1 missing, 1 damaged; "
        "completion flag set"
    )
    assert (
        lines[1] == "  missing chunk [0:24, 0:32, 0:32] (recorded, but its file 'c/0/0/0' is gone)"
    )
    assert lines[2].startswith("  damaged chunk [0:24, 32:64, 32:64] (does not decode: ")
    assert lines[3] == (
        "  re-run the same `ssi-dask run` command with --resume --repair to recompute the "
        "damaged and missing chunks"
    )

    resumed = _run(zarr3d, out, psf3d_file, "--resume")  # recomputes the lost file only
    assert resumed.returncode == 0, resumed.stderr
    assert "recomputing 1 chunks whose files are missing (first: [0:24, 0:32, 0:32])" in (
        resumed.stdout
    )
    assert "5 of 6 chunks already written, computing 1" in resumed.stdout
    assert run_cli("verify", out).returncode == 0  # every file is there again
    assert run_cli("verify", out, "--check-data").returncode == 1  # still undecodable

    repaired = _run(zarr3d, out, psf3d_file, "--resume", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert (
        "recomputing 0 chunks whose files are missing and 1 damaged chunks "
        "(first: [0:24, 32:64, 32:64])" in repaired.stdout
    )
    uninterrupted = deconvolve(volume3d, psf3d, num_iter=ITERATIONS, chunks=CHUNKS).compute()
    assert np.array_equal(zarr.open_array(str(out), mode="r")[...], uninterrupted)
    final = run_cli("verify", out, "--check-data")
    assert final.returncode == 0, final.stdout
    assert "complete: 6 of 6 chunks recorded as written, 0 missing, 0 damaged" in final.stdout
    assert tree_digest(zarr3d) == before


def test_repair_needs_resume(tmp_path, zarr3d, psf3d_file):
    line = _one_line_error(_run(zarr3d, tmp_path / "out.zarr", psf3d_file, "--repair"))
    assert line == (
        "ssi-dask: error: --repair checks an existing output; give it together with --resume"
    )


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_every_chunk_has_a_file_even_all_zero(tmp_path, zarr_format):
    out = tmp_path / "zeros.zarr"
    write_zarr(da.zeros((8, 12), chunks=(4, 4), dtype="f4"), out, zarr_format=zarr_format)
    files = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and progress_folder(out) not in p.parents and not p.name.startswith(".")
    }
    keys = {"0.0", "0.1", "0.2", "1.0", "1.1", "1.2"}
    if zarr_format == 3:
        keys = {"c/" + key.replace(".", "/") for key in keys}
    assert files - {"zarr.json"} == keys
    (out / ("c/1/2" if zarr_format == 3 else "1.2")).unlink()
    report = verify_output(out)
    assert report.missing == [
        "[4:8, 8:12] (recorded, but its file " + repr("c/1/2" if zarr_format == 3 else "1.2")
        + " is gone)"
    ]  # fmt: skip


def test_resume_refuses_changed_input_and_accepts_moved_input(
    tmp_path, zarr3d, volume3d, psf3d, psf3d_file
):
    out = tmp_path / "out.zarr"
    assert _run(zarr3d, out, psf3d_file).returncode == 0
    finished = tree_digest(out)

    # identical data in another place, with new modification times: re-hashed, accepted
    moved = tmp_path / "moved.zarr"
    shutil.copytree(zarr3d, moved, copy_function=shutil.copy)
    shutil.rmtree(zarr3d)
    (out / "c" / "0" / "1" / "4").unlink()  # lost output chunk of working chunk (0, 0, 2)
    resumed = _run(moved, out, psf3d_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "5 of 6 chunks already written, computing 1" in resumed.stdout
    uninterrupted = deconvolve(volume3d, psf3d, num_iter=ITERATIONS, chunks=CHUNKS).compute()
    assert np.array_equal(zarr.open_array(str(out), mode="r")[...], uninterrupted)
    assert tree_digest(out) != finished  # new records, the same data

    # one value changes: both working chunks that read it (its own and, through the halo, the
    # one above it) are found
    changed = zarr.open_array(str(moved), mode="r+")
    changed[0, 40, 90] = changed[0, 40, 90] + 1.0
    kept = tree_digest(out)
    for extra in ((), ("--dry-run",)):
        line = _one_line_error(_run(moved, out, psf3d_file, "--resume", *extra))
        assert line == (
            f"ssi-dask: error: the input changed since '{out}' was written: 2 of 6 chunks "
            "already written were made from other input data (first: [0:24, 0:32, 64:96], "
            "[0:24, 32:64, 64:96]); "
            "resuming would mix old and new input: pass --overwrite to start again"
        )
    assert tree_digest(out) == kept


def test_write_zarr_resume_fingerprints_the_computation(tmp_path, volume3d, psf3d):
    out = tmp_path / "out.zarr"
    write_zarr(deconvolve(volume3d, psf3d, num_iter=1, chunks=CHUNKS), out)
    kept = tree_digest(out)
    with pytest.raises(OutputError) as refused:
        write_zarr(deconvolve(volume3d, psf3d, num_iter=50, chunks=CHUNKS), out, resume=True)
    assert "was made with different parameters (" in str(refused.value)
    assert "computation.iterations: 1 there, 50 now" in str(refused.value)
    other = volume3d.copy()
    other[0, 0, 0] += 1  # in memory: the data's token is part of the fingerprint
    with pytest.raises(OutputError, match=r"computation\.input_array\.token: "):
        write_zarr(deconvolve(other, psf3d, num_iter=1, chunks=CHUNKS), out, resume=True)
    anonymous = da.from_array(volume3d, chunks=CHUNKS) * 2  # nothing says what it is
    with pytest.raises(OutputError) as refused:
        write_zarr(anonymous, out, resume=True)
    assert str(refused.value) == (
        f"cannot resume {str(out)!r} with this result: only a result of ssi_dask.deconvolve "
        "carries what identifies its computation; pass that result, or overwrite=True to "
        "start again"
    )
    assert tree_digest(out) == kept
    same = write_zarr(deconvolve(volume3d, psf3d, num_iter=1, chunks=CHUNKS), out, resume=True)
    assert same.attrs["ssi_dask"]["complete"] is True


def _edit_checkpoint(source, target, change):
    payload = torch.load(source, map_location="cpu", weights_only=True)
    change(payload)
    torch.save(payload, target)
    return target


def test_checkpoint_hash_covers_normalisation_psf_and_settings(tmp_path, zarr3d, psf3d_file):
    model = _checkpoint(tmp_path / "model.pt", 3)
    load_checkpoint(model)  # intact

    def scaled(payload):
        normalisation = json.loads(payload["normalisation"])
        payload["normalisation"] = json.dumps({**normalisation, "scale": 2.0})

    def shifted_psf(payload):
        payload["psf"] = torch.roll(payload["psf"], 1, dims=-1)

    def settings(payload):
        payload["training"] = json.dumps({"symmetries": [[[0], False]]})

    for name, change in (("scaled", scaled), ("psf", shifted_psf), ("settings", settings)):
        edited = _edit_checkpoint(model, tmp_path / f"{name}.pt", change)
        with pytest.raises(CheckpointError, match="failed its content check"):
            load_checkpoint(edited)
    line = _one_line_error(
        run_cli("run", zarr3d, tmp_path / "o.zarr", "--psf", psf3d_file, "--method", "ssi",
                "--model", tmp_path / "scaled.pt")
    )  # fmt: skip
    assert line == (
        f"ssi-dask: error: checkpoint '{tmp_path / 'scaled.pt'}' failed its content check "
        "(sha256 mismatch): the file is corrupted or edited"
    )
    old = _edit_checkpoint(model, tmp_path / "v1.pt", lambda p: p.update(version=1))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(old)
    assert str(refused.value) == (
        f"checkpoint '{old}' was saved by an older ssi-dask (format 1) whose content hash does "
        "not cover the normalisation and PSF, so it cannot be verified; retrain it "
        "(ssi-dask train)"
    )


def test_missing_input_chunks_are_reported(tmp_path, zarr3d, psf3d_file):
    (zarr3d / "c" / "0" / "1" / "2").unlink()  # [0:24, 16:32, 32:48] reads as 0
    (zarr3d / "c" / "0" / "3" / "5").unlink()
    warning = (
        "warning: 2 of 24 input chunks have no file in INPUT and read as the fill value 0.0 "
        "(first: [0:24, 16:32, 32:48], [0:24, 48:64, 80:96]); expected for a sparse image, "
        "otherwise the input is incomplete"
    )
    dry = _run(zarr3d, tmp_path / "out.zarr", psf3d_file, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"  {warning}" in dry.stdout.splitlines()
    done = _run(zarr3d, tmp_path / "out.zarr", psf3d_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == warning  # after the run's summary


@pytest.mark.parametrize("layout", ["v2", "v3-sharded"])
def test_write_zarr_repair_recomputes_damaged_chunks(tmp_path, volume3d, psf3d, layout):
    out = tmp_path / "out.zarr"
    options = (
        {"zarr_format": 2, "output_chunks": (24, 16, 16)}
        if layout == "v2"
        else {"zarr_format": 3, "output_chunks": (24, 16, 16), "output_shards": (24, 32, 32)}
    )
    lazy = deconvolve(volume3d, psf3d, num_iter=1, chunks=CHUNKS)
    expected = write_zarr(lazy, out, **options)[...]
    damaged = out / ("0.2.2" if layout == "v2" else "c/0/1/1")  # in working chunk (0, 1, 1)
    damaged.write_bytes(b"\x00not a chunk" * 8)
    assert verify_output(out).ok  # the files are all there: only reading finds it
    damaged_text = verify_output(out, check_data=True).damaged
    assert damaged_text[0].startswith("[0:24, 32:64, 32:64] (does not decode: ")
    write_zarr(lazy, out, resume=True, **options)  # plain resume trusts what is recorded
    assert not verify_output(out, check_data=True).ok
    repaired = write_zarr(lazy, out, resume=True, repair=True, **options)
    assert np.array_equal(repaired[...], expected)
    assert verify_output(out, check_data=True).ok


def test_missing_input_chunks_with_slash_separated_zarr_v2_keys(tmp_path):
    from ssi_dask.chunkfiles import missing_input_chunks

    path = tmp_path / "v2.zarr"
    array = zarr.create_array(
        store=str(path), shape=(10, 12), chunks=(4, 4), dtype="u2", zarr_format=2,
        chunk_key_encoding={"name": "v2", "separator": "/"}, fill_value=7,
    )  # fmt: skip
    array[...] = 1
    (path / "2" / "1").unlink()  # rows 8:10, columns 4:8
    report = missing_input_chunks(str(path))
    assert (report.count, report.total, report.first, report.fill_value) == (
        1, 9, ("[8:10, 4:8]",), 7,
    )  # fmt: skip
    assert missing_input_chunks(str(tmp_path / "absent.zarr")) is None


def test_tiff_input_touched_resumes_and_rewritten_is_refused(tmp_path, volume3d, psf3d, psf3d_file):
    import os

    import tifffile

    source = tmp_path / "stack.tif"
    tifffile.imwrite(source, volume3d)
    out = tmp_path / "out.zarr"
    assert _run(source, out, psf3d_file, "--output-chunks", "24,32,32").returncode == 0
    info = source.stat()
    os.utime(source, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # same data, new mtime
    (out / "c" / "0" / "1" / "2").unlink()  # working chunk (0, 1, 2)
    resumed = _run(source, out, psf3d_file, "--output-chunks", "24,32,32", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "5 of 6 chunks already written, computing 1" in resumed.stdout
    expected = deconvolve(volume3d, psf3d, num_iter=ITERATIONS, chunks=CHUNKS).compute()
    assert np.array_equal(zarr.open_array(str(out), mode="r")[...], expected)

    other = volume3d.copy()
    other[12, 10, 10] += 0.5  # only working chunk (0, 0, 0) read it
    tifffile.imwrite(source, other)
    line = _one_line_error(
        _run(source, out, psf3d_file, "--output-chunks", "24,32,32", "--resume", "--dry-run")
    )
    assert "1 of 6 chunks already written were made from other input data " in line
    assert "(first: [0:24, 0:32, 0:32])" in line


def test_missing_input_chunks_of_an_ome_zarr_level_are_reported(tmp_path):
    from test_ome import write_ome_input

    from ssi_dask.psf import widefield_psf

    image = tmp_path / "img.ome.zarr"
    write_ome_input(image, "0.5")
    (image / "s0" / "c" / "1" / "0" / "0" / "0" / "1").unlink()  # t=1, c=0, y 0:24, x 24:48
    psf = tmp_path / "psf.npy"
    np.save(psf, widefield_psf((5, 7, 7), (0.3, 0.15, 0.15), na=1.0, wavelength=0.5))
    dry = run_cli("run", image, tmp_path / "out.ome.zarr", "--psf", psf, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (
        "  warning: 1 of 16 input chunks have no file in INPUT and read as the fill value 0.0 "
        "(first: [1:2, 0:1, 0:12, 0:24, 24:48])" in dry.stdout
    )


@pytest.mark.parametrize("encoding", [None, {"name": "v2", "separator": "."}])
def test_missing_input_chunks_walk_counts_only_chunk_files(tmp_path, encoding):
    from ssi_dask.chunkfiles import missing_input_chunks, store_listing

    path = tmp_path / "in.zarr"
    options = {} if encoding is None else {"chunk_key_encoding": encoding}
    array = zarr.create_array(store=str(path), shape=(10, 12, 7), chunks=(4, 4, 3), dtype="u2",
                              fill_value=3, **options)  # fmt: skip
    array[...] = 1
    key = array.metadata.encode_chunk_key((2, 1, 0))  # rows 8:10, 4:8, 0:3
    (path / key).unlink()
    (path / "notes 12.txt").write_text("x")  # stray files never count as chunks
    (path / "9.9.9").write_text("x")  # a chunk key of a block outside the grid
    walked = missing_input_chunks(str(path))
    assert (walked.count, walked.total, walked.first) == (1, 27, ("[8:10, 4:8, 0:3]",))
    assert walked == missing_input_chunks(str(path), store_listing(path))
