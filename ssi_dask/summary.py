"""What the command line shows while and after it runs: a progress bar with throughput and
a one-screen end-of-run summary."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any


class ChunkProgress:
    """A progress callback for :func:`ssi_dask.store.write_zarr`: chunks done / total and
    throughput in voxels per second (tqdm bar on stderr).

    The bar shows one rate, in voxels per second: the voxels of the chunks written by this
    run divided by the seconds since the write started. The end-of-run summary quotes the
    same number (:attr:`rate`), so the two agree. With SSI, tiles finished inside the chunks
    still running (reported by the workers, :meth:`tile_event`) are shown too, so a run of a
    few long chunks moves.

    Parameters
    ----------
    total_voxels : int
        Voxels of the whole output.
    description : str
        Label in front of the bar.
    file : file-like, optional
        Where the bar goes (stderr by default).
    total_chunks : int, optional
        Chunks of the whole output (default: the ``total`` of the first call); with
        ``resume`` only the remaining chunks are written, each still counts
        ``total_voxels / total_chunks`` voxels.
    show : bool
        Draw the bar; False only measures (for the summary).
    """

    def __init__(
        self,
        total_voxels: int,
        description: str = "deconvolving",
        file: Any = None,
        *,
        total_chunks: int | None = None,
        show: bool = True,
    ):
        self.total_voxels = int(total_voxels)
        self.total_chunks = total_chunks
        self.description = description
        self.file = file
        self.show = show
        self.bar = None
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.done = 0
        self.tiles: dict[str, tuple[int, int]] = {}

    @property
    def voxels_per_chunk(self) -> float:
        return self.total_voxels / max(int(self.total_chunks or 1), 1)

    @property
    def seconds(self) -> float:
        """Seconds from the start of the write to the last chunk (or now)."""
        end = self.finished if self.finished is not None else time.perf_counter()
        return max(end - self.started, 1e-9)

    @property
    def voxels(self) -> float:
        """Voxels written by this run so far."""
        return self.done * self.voxels_per_chunk

    @property
    def rate(self) -> float:
        """Voxels per second written by this run: the bar's rate and the summary's."""
        return self.voxels / self.seconds

    def __call__(self, done: int, total: int) -> None:
        if self.total_chunks is None:
            self.total_chunks = total
        if not self.done and not done:
            self.started = time.perf_counter()  # the write starts now
        if self.bar is None and self.show:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(
                total=total,
                desc=self.description,
                dynamic_ncols=True,
                file=self.file,
                # one rate only (voxels/s, as the summary); tqdm's own chunk/s is left out
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} chunks "
                "[{elapsed}<{remaining}{postfix}]",
            )
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        if done >= total:
            self.finished = time.perf_counter()
            self.tiles.clear()
        self._refresh()
        if done >= total:
            self.close()

    def tile_event(self, event: Any) -> None:
        """Handler of the workers' tile events (``(timestamp, {"chunk", "done", "total"})``)."""
        message = event[1] if isinstance(event, tuple) else event
        try:
            chunk, done, total = message["chunk"], int(message["done"]), int(message["total"])
        except (KeyError, TypeError, ValueError):
            return
        if done >= total:
            self.tiles.pop(chunk, None)
        else:
            self.tiles[chunk] = (done, total)
        self._refresh()

    def _refresh(self) -> None:
        if self.bar is None:
            return
        text = format_rate(self.rate) if self.done else ""
        if self.tiles:
            done = sum(d for d, _ in self.tiles.values())
            total = sum(t for _, t in self.tiles.values())
            running = len(self.tiles)
            text += (", " if text else "") + (
                f"tiles {done}/{total} in {running} running chunk{'s' if running > 1 else ''}"
            )
        self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: a duration for progress lines."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StageProgress:
    """Progress of one long phase as plain lines (readable in logs and job outputs):
    ``label: k/N unit (p %), elapsed 12s, ETA 40s``, at most one line per ``interval``
    seconds, plus the first and the last.

    Parameters
    ----------
    label : str
        The phase, e.g. ``"sampling training regions"``.
    total : int
        Units of work in the phase.
    unit : str
        What is counted (plural), e.g. ``"regions"``.
    file : file-like, optional
        Where the lines go (stderr by default).
    interval : float
        Least seconds between two lines.
    """

    def __init__(
        self, label: str, total: int, unit: str, *, file: Any = None, interval: float = 5.0
    ):
        self.label, self.total, self.unit = label, int(total), unit
        self.file = file
        self.interval = float(interval)
        self.started = time.perf_counter()
        self.last_line = -math.inf
        self.done = self.shown = 0

    def update(self, done: int) -> None:
        """Record ``done`` units finished; print a line when due."""
        import sys  # noqa: PLC0415

        self.done = int(done)
        now = time.perf_counter()
        first_done = self.done and not self.shown  # the first line with an ETA
        if self.done < self.total and not first_done and now - self.last_line < self.interval:
            return
        self.last_line, self.shown = now, self.done
        elapsed = now - self.started
        line = f"{self.label}: {self.done}/{self.total} {self.unit}"
        if self.total:
            line += f" ({100 * self.done / self.total:.0f} %)"
        line += f", elapsed {format_duration(elapsed)}"
        if 0 < self.done < self.total:
            line += f", ETA {format_duration(elapsed / self.done * (self.total - self.done))}"
        print(line, file=self.file or sys.stderr, flush=True)


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
    write_seconds: float | None = None,
    written_voxels: float | None = None,
) -> str:
    """A one-screen summary of a finished run: time, throughput, output, how to view it.

    ``throughput`` is the rate of the progress bar (:attr:`ChunkProgress.rate`): the voxels
    this run wrote over the seconds of the write, when ``write_seconds`` and
    ``written_voxels`` are given; else all voxels over the whole run's ``seconds``.
    """
    voxels = 1
    for size in shape:
        voxels *= int(size)
    if write_seconds is not None and written_voxels is not None:
        throughput = (
            f"  throughput  {format_rate(written_voxels / max(write_seconds, 1e-9))} "
            f"(as on the progress bar: {written_voxels:,.0f} voxels written in "
            f"{write_seconds:.1f} s)"
        )
    else:
        throughput = f"  throughput  {format_rate(voxels / max(seconds, 1e-9))}"
    lines = [
        "-" * 64,
        f"done in {seconds:.1f} s ({method}): {output}",
        f"  voxels      {voxels:,} in {chunks} chunks"
        + (f", {volumes} volumes" if volumes > 1 else ""),
        throughput,
        f"  output      {output}"
        + (f" (OME-Zarr, {levels} resolution levels)" if ome_zarr else " (Zarr array)"),
        "  view it     " + napari_command(output, ome_zarr=ome_zarr),
        "-" * 64,
    ]
    return "\n".join(lines)
