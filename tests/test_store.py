"""Writing: whole shards for sharded Zarr v3, completion records, the SSI model in the resume
fingerprint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from test_bad_input import _checkpoint

from ssi_dask import deconvolve, write_zarr
from ssi_dask.cli import main
from ssi_dask.errors import OutputError
from ssi_dask.progress import describe_differences, fingerprint, parameters_of
from ssi_dask.verify import verify_output


def test_sharded_output_is_written_in_whole_shards(tmp_path, volume3d, psf3d):
    lazy = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 32))
    out = write_zarr(
        lazy, tmp_path / "s.zarr", output_chunks=(24, 16, 16), output_shards=(24, 32, 32)
    )
    assert out.chunks == (24, 16, 16) and out.shards == (24, 32, 32)
    np.testing.assert_array_equal(out[...], lazy.compute())
    shard_files = [p for p in (tmp_path / "s.zarr" / "c").rglob("*") if p.is_file()]
    assert len(shard_files) == 2 * 3  # one file per shard, each written by one task
    report = verify_output(tmp_path / "s.zarr", check_data=True)
    assert report.ok and report.total == 6 and report.recorded == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"output_shards": (24, 64, 32)}, "are not multiples of the shard size 64"),
        ({"output_shards": (24, 24, 32)}, "shard size 24 along axis 1 is not a multiple of the"),
        ({"output_shards": (24, 32, 32), "zarr_format": 2}, "sharding needs a Zarr v3 output"),
        ({"output_chunks": (24, 24, 32)}, "not multiples of the output chunk size 24"),
    ],
)
def test_misaligned_writes_are_refused_before_any_work(tmp_path, volume3d, psf3d, options, message):
    lazy = deconvolve(volume3d, psf3d, num_iter=1, chunks=(24, 32, 32))
    options = {"output_chunks": (24, 16, 16), **options}
    with pytest.raises(OutputError, match=message):
        write_zarr(lazy, tmp_path / "bad.zarr", **options)
    assert not (tmp_path / "bad.zarr").exists()


def test_damaged_chunk_data_is_found_by_check_data(tmp_path, volume3d, psf3d):
    lazy = deconvolve(volume3d, psf3d, num_iter=1, chunks=(24, 32, 32))
    out = tmp_path / "o.zarr"
    write_zarr(lazy, out)
    array = zarr.open_array(str(out), mode="r+")
    array[3, 40, 70] = -1.0  # changed after it was recorded
    report = verify_output(out, check_data=True)
    assert (
        report.damaged == ["[0:24, 32:64, 64:96] (checksum differs from its record)"]
        and not report.missing
        and not report.ok
    )
    assert verify_output(out).ok  # without reading the data only the records are checked


def test_fingerprint_ignores_run_details_but_not_the_computation():
    first = {"method": "lr", "iterations": 5, "psf": {"sha256": "ab", "source": "/a/psf.tif"},
             "command": "run a b", "started": "t0"}  # fmt: skip
    moved = {
        **first,
        "psf": {"sha256": "ab", "source": "/b/psf.tif"},
        "command": "run a b --resume",
    }
    assert fingerprint(parameters_of(first)) == fingerprint(parameters_of(moved))
    other = {**first, "psf": {"sha256": "cd", "source": "/a/psf.tif"}}
    assert fingerprint(parameters_of(first)) != fingerprint(parameters_of(other))
    assert describe_differences(parameters_of(first), parameters_of(other)) == [
        'psf.sha256: "ab" there, "cd" now'
    ]


def test_resume_refuses_another_model(tmp_path, capsys):
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    source = tmp_path / "image.zarr"
    zarr.create_array(store=str(source), shape=image.shape, chunks=(32, 32), dtype="f4")[...] = (
        image
    )
    from ssi_dask.psf import protocol_psf

    psf = tmp_path / "psf.npy"
    np.save(psf, protocol_psf(2))
    model_a = _checkpoint(tmp_path / "a.pt", 2)
    model_b = _checkpoint(tmp_path / "b.pt", 2)  # another random initialisation
    out = tmp_path / "out.zarr"
    args = ("run", source, out, "--psf", psf, "--method", "ssi", "--chunks", "32,32")
    # in this process (torch is loaded once); main() is what the ssi-dask command runs
    assert main([*map(str, args), "--model", str(model_a), "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*map(str, args), "--model", str(model_b), "--resume"]) == 2
    refused = capsys.readouterr().err
    assert "was made with different parameters (computation.model_sha256: " in refused
    assert "; model.sha256: " in refused
    copy = tmp_path / "copy_of_a.pt"
    shutil.copy(model_a, copy)  # the same model from another path may resume
    assert main([*map(str, args), "--model", str(copy), "--resume", "--dry-run"]) == 0
    assert "resume          4 of 4 chunks already written" in capsys.readouterr().out


def test_dry_run_prints_the_whole_plan_and_writes_nothing(tmp_path, zarr3d, psf3d_file, capsys):
    out = tmp_path / "planned.zarr"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["run", str(zarr3d), str(out), "--psf", str(psf3d_file), "--chunks", "24,32,32",
            "--output-shards", "24,32,32", "--dry-run"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    for line in [
        "input           (24, 64, 96) float32, stored in chunks (24, 16, 16)",
        "output          (24, 64, 96) float32, Zarr v3, chunks (24, 16, 16), shards (24, 32, 32)",
        "working chunks  (24, 32, 32) -> 6 chunks",
        "halo (depth)    (0, 12, 12)",  # measured reach of 10 iterations (lr_measured_depth)
        "tasks in graph  ",
        "memory per task ~",
        "output size     576.0 KiB (uncompressed)",
        "dry run: nothing computed or written",
    ]:
        assert line in text, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
