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
    assert "1/4" in text and "4/4" in text and "chunk/s" in text
    rates = re.findall(r"([\d.]+) ([kMG]?)voxel/s", text)
    assert rates  # throughput shown next to the chunk count
    assert progress.bar is None  # closed after the last chunk


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
