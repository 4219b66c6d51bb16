"""What the command line shows while and after it runs: a progress bar with throughput and
a one-screen end-of-run summary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


class ChunkProgress:
    """A progress callback for :func:`ssi_dask.store.write_zarr`: chunks done / total and
    throughput in voxels per second (tqdm bar on stderr).

    Parameters
    ----------
    total_voxels : int
        Voxels of the whole output (the throughput counts ``total_voxels / total`` per chunk).
    description : str
        Label in front of the bar.
    file : file-like, optional
        Where the bar goes (stderr by default).
    """

    def __init__(self, total_voxels: int, description: str = "deconvolving", file: Any = None):
        self.total_voxels = int(total_voxels)
        self.description = description
        self.file = file
        self.bar = None
        self.started = time.perf_counter()
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm  # noqa: PLC0415

        if self.bar is None:
            self.bar = tqdm(
                total=total,
                unit="chunk",
                desc=self.description,
                dynamic_ncols=True,
                file=self.file,
            )
        self.bar.update(done - self.done)
        self.done = done
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.total_voxels * done / max(total, 1) / elapsed
        self.bar.set_postfix_str(f"{format_rate(rate)}", refresh=True)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_rate(voxels_per_second: float) -> str:
    """``12.3 Mvoxel/s`` style throughput."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if voxels_per_second >= factor:
            return f"{voxels_per_second / factor:.2f} {prefix}voxel/s"
    return f"{voxels_per_second:.1f} voxel/s"


def napari_command(output: str, *, ome_zarr: bool) -> str:
    """The command that opens ``output`` in napari."""
    if ome_zarr:
        return f"napari --plugin napari-ome-zarr {output}"
    script = f"import napari, zarr; napari.view_image(zarr.open('{output}')); napari.run()"
    return f'python -c "{script}"'


def run_summary(
    *,
    output: str,
    shape: Sequence[int],
    seconds: float,
    method: str,
    chunks: int,
    ome_zarr: bool,
    levels: int = 1,
    volumes: int = 1,
) -> str:
    """A one-screen summary of a finished run: time, throughput, output, how to view it."""
    voxels = 1
    for size in shape:
        voxels *= int(size)
    lines = [
        "-" * 64,
        f"done in {seconds:.1f} s ({method}): {output}",
        f"  voxels      {voxels:,} in {chunks} chunks"
        + (f", {volumes} volumes" if volumes > 1 else ""),
        f"  throughput  {format_rate(voxels / max(seconds, 1e-9))}",
        f"  output      {output}"
        + (f" (OME-Zarr, {levels} resolution levels)" if ome_zarr else " (Zarr array)"),
        "  view it     " + napari_command(output, ome_zarr=ome_zarr),
        "-" * 64,
    ]
    return "\n".join(lines)
