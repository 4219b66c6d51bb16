"""The CLI's progress bar (chunks done / total, throughput) and end-of-run summary."""

from __future__ import annotations

import io
import re

from ssi_dask.summary import ChunkProgress, format_rate, run_summary


def test_progress_bar_shows_chunks_and_voxel_throughput():
    stream = io.StringIO()
    progress = ChunkProgress(4_000_000, file=stream)
    for done in range(1, 5):
        progress(done, 4)
    text = stream.getvalue()
    assert "1/4 chunks" in text and "4/4 chunks" in text
    assert "chunk/s" not in text and "it/s" not in text  # one rate only, in voxels/s
    rates = re.findall(r"([\d.]+) ([kMG]?)voxel/s", text)
    assert rates  # throughput shown next to the chunk count
    assert progress.bar is None  # closed after the last chunk
    # the summary quotes the bar's rate: the same voxels over the same seconds
    summary = run_summary(
        output="o.zarr", shape=(2000, 2000), seconds=99.0, method="lr", chunks=4,
        ome_zarr=False, write_seconds=progress.seconds, written_voxels=progress.voxels,
    )  # fmt: skip
    assert progress.voxels == 4_000_000
    assert format_rate(progress.rate) in summary
    assert f"{format_rate(progress.rate)} (as on the progress bar" in summary


def test_progress_bar_counts_resumed_runs_and_shows_tiles():
    stream = io.StringIO()
    progress = ChunkProgress(8_000_000, file=stream, total_chunks=8)  # 4 of 8 already written
    progress(0, 4)
    progress.tile_event((0.0, {"chunk": "a", "done": 3, "total": 10}))
    progress.tile_event((0.0, {"chunk": "b", "done": 5, "total": 10}))
    assert "tiles 8/20 in 2 running chunks" in stream.getvalue()
    progress.tile_event((0.0, {"chunk": "a", "done": 10, "total": 10}))
    progress(1, 4)
    assert progress.voxels == 1_000_000  # one chunk of 8 in the whole output
    assert "tiles 5/10 in 1 running chunk" in stream.getvalue()
    for done in (2, 3, 4):
        progress(done, 4)
    assert progress.voxels == 4_000_000 and progress.bar is None


def test_format_rate_units():
    assert format_rate(12.0) == "12.0 voxel/s"
    assert format_rate(2_500) == "2.50 kvoxel/s"
    assert format_rate(3_210_000) == "3.21 Mvoxel/s"
    assert format_rate(4.5e9) == "4.50 Gvoxel/s"


def test_run_summary_fits_one_screen_and_says_how_to_view():
    text = run_summary(
        output="/data/out.ome.zarr",
        shape=(2, 10, 100, 100),
        seconds=4.0,
        method="lr",
        chunks=8,
        ome_zarr=True,
        levels=3,
        volumes=2,
    )
    lines = text.splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 100
    assert "done in 4.0 s (lr): /data/out.ome.zarr" in text
    assert "200,000 in 8 chunks, 2 volumes" in text
    assert "50.00 kvoxel/s" in text  # 200,000 voxels / 4 s
    assert "(OME-Zarr, 3 resolution levels)" in text
    assert "napari --plugin napari-ome-zarr /data/out.ome.zarr" in text
    plain = run_summary(
        output="/data/out.zarr", shape=(5, 5), seconds=1, method="ssi", chunks=1, ome_zarr=False
    )
    assert "napari.view_image(zarr.open('/data/out.zarr'))" in plain
