"""Zarr-to-Zarr runs with one task per working chunk, submitted in waves.

The ``map_overlap`` graph of :func:`ssi_dask.deconvolve` costs about 25 tasks per working
chunk (reads, halo slices, concatenation, trim, write) and is built whole before anything
runs, so its planning time and the scheduler's memory grow with the volume. For a run from an
on-disk Zarr array into a Zarr output (``ssi_dask.run``) this module gives each working chunk
a single task that

1. reads its region plus halo straight from the input store, with the same boundary treatment
   as the ``map_overlap`` path (LR: the true edges stay edges, an axis held in one chunk gets
   no halo; SSI: the volume's edges are mirrored by the halo, as ``dask.array.overlap``'s
   ``reflect`` does);
2. runs the same pure per-chunk kernel (:func:`ssi_dask.blockwise._lr_chunk` or
   :func:`ssi_dask.blockwise._ssi_chunk`) on it, cropped to the chunk;
3. writes the whole output chunks (shards) it covers and its completion record
   (:func:`ssi_dask.store.write_chunk`), so resume, verify and repair see the same output.

The result is bit-identical to the ``map_overlap`` path (tests/test_storegraph.py). The PSF
(or the model) is one shared task every chunk task depends on, so it crosses to each worker
once and is recomputed if its worker is lost. :func:`ssi_dask.store.write_zarr` submits the
tasks in waves: at most :meth:`ChunkTasks.in_flight` at a time, the next as earlier ones
finish, from a lazy iterator over block indices, so nothing per chunk is ever held for the
whole volume (benchmarks/bench_graph.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Chunk tasks in flight per worker thread (and at least :data:`MIN_IN_FLIGHT`): enough that
#: no thread waits for the client to submit its next task, few enough that the scheduler
#: holds only a wave, never the volume.
IN_FLIGHT_PER_THREAD = 4
MIN_IN_FLIGHT = 16


@dataclass(frozen=True)
class PyramidLevel:
    """A coarser resolution level of the input's OME-Zarr pyramid, seen from the input level.

    Attributes
    ----------
    path : str
        The level's array folder.
    level : int
        Its index in the pyramid.
    factors : tuple of float
        Per spatial axis, the size of one of its voxels in input voxels (from the levels'
        ``scale``; 2.0 for a level that halves the input's size).
    shape : tuple of int
        Its spatial shape.
    """

    path: str
    level: int
    factors: tuple[float, ...]
    shape: tuple[int, ...]

    def cells(self, bounds: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
        """The coarse voxels overlapping the input box ``bounds`` (start, stop per spatial
        axis): the box is rounded outwards, so no input voxel of it is left out."""
        return tuple(
            slice(
                min(n - 1, max(0, math.floor(start / f))),
                max(1, min(n, math.ceil(stop / f))),
            )
            for (start, stop), f, n in zip(bounds, self.factors, self.shape)
        )

    def covers(self, bounds: Sequence[tuple[int, int]]) -> bool:
        """Whether the level's voxels reach over the whole input box ``bounds``: a level cut
        to whole blocks (``floor(n / f)`` voxels) has none over the input's last voxels, so it
        cannot decide a chunk that holds them. Half a voxel of slack absorbs factors read from
        rounded ``scale`` values (1.9999999 for 2)."""
        return all(stop <= n * f + 0.5 for (_, stop), f, n in zip(bounds, self.factors, self.shape))


@dataclass(frozen=True)
class ChunkSource:
    """What every chunk task needs to read its input: small, pickled with each task.

    Attributes
    ----------
    input_path : str
        The input Zarr array's folder (an OME-Zarr level's array).
    lead : tuple of (tuple of int or None)
        Per leading (time, channel) axis: the input index of each output index (channels
        selected), or None when they are the same.
    shape : tuple of int
        The spatial shape of one volume.
    working_chunks, depth : tuple of int
        The plan's working chunk shape and halo (0 along an LR axis held in one chunk).
    boundary : {"none", "reflect"}
        ``"none"`` (LR) or ``"reflect"`` (SSI: the volume's edges mirrored, edge included).
    background_level : PyramidLevel, optional
        A coarser level of the input's OME pyramid that decides which chunks are background
        before their full-resolution input is read (``skip_background_level``).
    """

    input_path: str
    lead: tuple[tuple[int, ...] | None, ...]
    shape: tuple[int, ...]
    working_chunks: tuple[int, ...]
    depth: tuple[int, ...]
    boundary: str
    background_level: PyramidLevel | None = None

    def region(self, index: Sequence[int]) -> tuple[slice, ...]:
        """The output region of the working chunk at block ``index`` (leading axes first)."""
        n_lead = len(self.lead)
        lead = [slice(int(i), int(i) + 1) for i in index[:n_lead]]
        spatial = [
            slice(int(i) * c, min((int(i) + 1) * c, n))
            for i, c, n in zip(index[n_lead:], self.working_chunks, self.shape)
        ]
        return (*lead, *spatial)

    def _lead_selection(self, index: Sequence[int]) -> list[Any]:
        """The input indices of the leading (time, channel) axes of block ``index``."""
        selection: list[Any] = []
        for axis, i in enumerate(index[: len(self.lead)]):
            mapping = self.lead[axis]
            selection.append(int(mapping[int(i)]) if mapping is not None else int(i))
        return selection

    def read_background_level(self, index: Sequence[int]) -> np.ndarray | None:
        """The values of :attr:`background_level` under the chunk's region plus halo (every
        coarse voxel that overlaps it), or None where the level does not cover all of it."""
        from .chunkfiles import _zarr_array  # noqa: PLC0415

        level = self.background_level
        assert level is not None
        n_lead = len(self.lead)
        grown = [
            (max(0, s.start - d), min(n, s.stop + d))
            for s, d, n in zip(self.region(index)[n_lead:], self.depth, self.shape)
        ]
        if not level.covers(grown):
            return None
        selection = self._lead_selection(index) + list(level.cells(grown))
        return np.asarray(_zarr_array(level.path)[tuple(selection)])

    def outside(self, index: Sequence[int]) -> list[tuple[int, int]]:
        """Per spatial axis, how many voxels of the block :meth:`read` gives lie past the
        volume's edges (before, after): the mirrored part of the halo; none with ``"none"``."""
        if self.boundary != "reflect":
            return [(0, 0)] * len(self.shape)
        n_lead = len(self.lead)
        return [
            (max(0, d - s.start), max(0, s.stop + d - n))
            for s, d, n in zip(self.region(index)[n_lead:], self.depth, self.shape)
        ]

    def read(self, index: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
        """The chunk's input with its halo, as the ``map_overlap`` path gives it to the kernel,
        and where the chunk lies inside it."""
        from .chunkfiles import _zarr_array  # noqa: PLC0415

        n_lead = len(self.lead)
        selection = self._lead_selection(index)
        pad, crop = [], []
        for s, d, n in zip(self.region(index)[n_lead:], self.depth, self.shape):
            start, stop = max(0, s.start - d), min(n, s.stop + d)
            selection.append(slice(start, stop))
            if self.boundary == "reflect":  # mirrored to the full halo at the volume's edges
                pad.append((d - (s.start - start), d - (stop - s.stop)))
                crop.append(slice(d, d + s.stop - s.start))
            else:
                crop.append(slice(s.start - start, s.stop - start))
        block = np.asarray(_zarr_array(self.input_path)[tuple(selection)])
        if any(p != (0, 0) for p in pad):
            block = np.pad(block, pad, mode="symmetric")
        return block, tuple(crop)


@dataclass(frozen=True)
class ChunkKernel:
    """The per-chunk computation: method, its shared objects (per channel) and options."""

    method: str
    shared: tuple[Any, ...]  # LR: a PreparedPSF per channel; SSI: the model
    num_iter: int = 0
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    offset: float = 0.0
    channel_axis: int | None = None
    margin: tuple[int, ...] = ()
    skip_background: float | None = None

    def background(self, block: np.ndarray, rounding: float = 0.0) -> float | None:
        """The value a background chunk is written as, or None when it must be computed.

        A chunk is background when every input value it reads (region and halo) is at most
        ``skip_background`` (a max-based decision: a chunk with any voxel above it is always
        computed). It is written as the mean of its input after the offset, negative values
        counted as 0 (as Lucy-Richardson treats them): 0 for an all-zero chunk, which is
        exactly what computing it gives. ``rounding`` is added to every value for the
        decision only: a coarse pyramid level stored as integers holds rounded (or truncated)
        block means, each of which may stand for a mean up to one unit higher.
        """
        if self.skip_background is None or self.method != "lr" or not block.size:
            return None
        if not np.isfinite(block).all() or float(block.max()) + rounding > self.skip_background:
            return None
        values = block.astype(np.float64) - self.offset
        return float(np.maximum(values, 0).mean())

    def __call__(
        self,
        block: np.ndarray,
        index: Sequence[int],
        outside: Sequence[tuple[int, int]] | None = None,
    ) -> np.ndarray:
        from .blockwise import _call_on_float32, _lr_chunk, _ssi_chunk  # noqa: PLC0415

        shared = self.shared[0]
        if len(self.shared) > 1 and self.channel_axis is not None:
            shared = self.shared[int(index[self.channel_axis])]
        if self.method == "ssi":
            return _call_on_float32(
                _ssi_chunk,
                block,
                model=shared,
                device=self.device,
                margin=self.margin,
                tta=self.options.get("tta"),
                outside=outside,
            )
        return _call_on_float32(
            _lr_chunk,
            block,
            psf=shared,
            num_iter=self.num_iter,
            options=self.options,
            device=self.device,
            offset=self.offset,
        )


def _run_chunk(
    kernel: ChunkKernel,
    source: ChunkSource,
    index: tuple[int, ...],
    output: str,
    fingerprint: str,
    run: str,
    input_reference: Any,
) -> int:
    """One chunk task: read with halo, compute, crop, write whole output chunks, record."""
    background = None
    if kernel.skip_background is not None and source.background_level is not None:
        # decided from the coarse level: a background chunk's full-resolution input is not read
        coarse = source.read_background_level(index)
        if coarse is not None:  # None: the level does not cover the chunk's edge voxels
            rounding = 1.0 if np.issubdtype(coarse.dtype, np.integer) else 0.0
            background = kernel.background(coarse, rounding)
        if background is not None:
            result = np.full(
                [s.stop - s.start for s in source.region(index)[len(source.lead) :]],
                background,
                dtype=np.float32,
            )
            return _write_result(
                result, source, index, output, fingerprint, run, input_reference, "pyramid"
            )
    block, crop = source.read(index)
    background = kernel.background(block)
    if background is not None:  # uniform background: written without computing
        from .blockwise import _report_negative  # noqa: PLC0415

        _report_negative(block.astype(np.float32) - np.float32(kernel.offset))
        result = np.full(block.shape, background, dtype=np.float32)[crop]
    else:
        result = kernel(block, index, source.outside(index))
        if hasattr(result, "get"):  # CuPy -> NumPy
            result = result.get()
        result = np.asarray(result)[crop]
    return _write_result(
        result,
        source,
        index,
        output,
        fingerprint,
        run,
        input_reference,
        "input" if background is not None else None,
    )


def _write_result(
    result: np.ndarray,
    source: ChunkSource,
    index: tuple[int, ...],
    output: str,
    fingerprint: str,
    run: str,
    input_reference: Any,
    skipped: str | None,
) -> int:
    """Write a chunk's result (spatial axes only) and its record; ``skipped`` says what decided
    that it is background (``"input"``: its full-resolution input, ``"pyramid"``: a coarse
    level, the input then left unread) or None for a computed chunk."""
    from .store import write_chunk  # noqa: PLC0415

    n_lead = len(source.lead)
    result = result.reshape((1,) * n_lead + result.shape)
    write_chunk(
        result,
        output,
        index,
        source.region(index),
        fingerprint,
        run,
        input_reference,
        skipped=skipped,
    )
    return 1


def _shared(kernel: ChunkKernel) -> ChunkKernel:
    """The shared task: returns the kernel (PSFs or model) so each worker receives it once."""
    return kernel


@dataclass
class ChunkTasks:
    """Submits chunk tasks for :func:`ssi_dask.store.write_zarr` (see its wave loop)."""

    kernel: ChunkKernel
    source: ChunkSource
    output: str
    fingerprint: str
    run: str
    input_reference: Any
    _shared_future: Any = None

    def in_flight(self, client: Any) -> int:
        """Chunk tasks kept in flight: ``max(16, 4 x the cluster's worker threads)``."""
        try:
            threads = sum(client.nthreads().values())
        except Exception:
            threads = 1
        return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * threads)

    def start(self, client: Any) -> None:
        """Submit the shared task (the kernel with its PSFs or model)."""
        self._shared_future = client.submit(
            _shared, self.kernel, key=f"ssi-dask-shared-{self.run}", pure=False
        )

    def submit(self, client: Any, index: tuple[int, ...]) -> Any:
        """Submit the task of the working chunk at block ``index``; returns its future."""
        return client.submit(
            _run_chunk,
            self._shared_future,
            self.source,
            tuple(int(i) for i in index),
            self.output,
            self.fingerprint,
            self.run,
            self.input_reference,
            key=f"ssi-dask-chunk-{self.run}-" + ".".join(str(int(i)) for i in index),
            pure=False,
        )

    def stop(self, client: Any) -> None:
        """Release the shared task."""
        if self._shared_future is not None:
            try:
                self._shared_future.release()
            except Exception:
                pass
            self._shared_future = None


@dataclass
class StoreResult:
    """A Zarr-to-Zarr computation that :func:`ssi_dask.store.write_zarr` runs chunk by chunk.

    Stands where a lazy Dask result stands in the ``map_overlap`` path: it has the result's
    ``shape``, ``chunks`` (the working-chunk grid, leading axes in ones), ``dtype`` and the
    attributes ``write_zarr`` fingerprints (``ssi_dask_provenance``, ``ssi_dask_input``),
    but no graph: :meth:`chunk_tasks` makes the tasks when the write starts.
    """

    source: ChunkSource
    kernel: ChunkKernel
    lead_shape: tuple[int, ...]
    ssi_dask_provenance: dict | None = None
    ssi_dask_input: Any = None
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead_shape, *self.source.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        from .blockwise import chunk_grid  # noqa: PLC0415

        lead = tuple((1,) * n for n in self.lead_shape)
        return lead + chunk_grid(self.source.shape, self.source.working_chunks)

    @property
    def numblocks(self) -> tuple[int, ...]:
        return (
            *self.lead_shape,
            *(-(-n // c) for n, c in zip(self.source.shape, self.source.working_chunks)),
        )

    @property
    def n_chunks(self) -> int:
        return math.prod(self.numblocks)

    def chunk_tasks(self, output: str, fingerprint: str, run: str) -> ChunkTasks:
        """The task maker for one write of this result into ``output``."""
        return ChunkTasks(
            kernel=self.kernel,
            source=self.source,
            output=output,
            fingerprint=fingerprint,
            run=run,
            input_reference=self.ssi_dask_input,
        )


def store_result(
    input_path: str,
    lead_shape: Sequence[int],
    lead: Sequence[Sequence[int] | None],
    channel_axis: int | None,
    psfs: Sequence[np.ndarray],
    plan: Any,
    *,
    method: str,
    num_iter: int,
    kernel_options: dict,
    model: Any = None,
    device: str = "cpu",
    offset: float = 0.0,
    skip_background: float | None = None,
    background_level: PyramidLevel | None = None,
) -> StoreResult:
    """The :class:`StoreResult` of a run from the Zarr array at ``input_path``.

    Parameters
    ----------
    input_path : str
        The input array's folder.
    lead_shape : sequence of int
        The output's leading (time, channel) axes.
    lead : sequence
        Per leading axis, the input index of each output index (selected channels) or None.
    channel_axis : int, optional
        The leading axis that selects the PSF when there is one per channel.
    psfs : list of numpy.ndarray
        One PSF, or one per channel (LR); normalised and prepared here, once.
    plan : ssi_dask.blockwise.BlockPlan
    method : {"lr", "ssi"}
    num_iter : int
        LR iterations.
    kernel_options : dict
        LR kernel options (back projector and its parameters, ``eps``...); SSI: ``tta``, the
        test-time transforms averaged.
    model : SSIModel, optional
        SSI: the trained model.
    device : {"cpu", "gpu"}
    offset : float
        LR background subtracted first.
    skip_background : float, optional
        LR: chunks whose input (with halo) is at most this everywhere are written as their
        background value without computing (:meth:`ChunkKernel.background`).
    background_level : PyramidLevel, optional
        With ``skip_background``: decide from this coarse level of the input's pyramid first,
        without reading a background chunk's full-resolution input (a chunk the level does not
        call background is still decided from its own input).

    Returns
    -------
    StoreResult
    """
    from .blockwise import METHOD_BOUNDARY  # noqa: PLC0415

    ndim = len(plan.shape)
    if method == "ssi":
        kernel = ChunkKernel(
            method="ssi",
            shared=(model,),
            options={"tta": kernel_options.get("tta")},
            device=device,
            margin=tuple(plan.depth),
        )
    else:
        from .lr import prepare_psf  # noqa: PLC0415
        from .psf import normalize_psf  # noqa: PLC0415

        bp_keys = ("back_projector", "wiener_alpha", "butterworth_order", "cutoff")
        bp = {k: kernel_options[k] for k in bp_keys if k in kernel_options}
        prepared = tuple(prepare_psf(normalize_psf(p), ndim, **bp) for p in psfs)
        kernel = ChunkKernel(
            method="lr",
            shared=prepared,
            num_iter=int(num_iter),
            options={k: v for k, v in kernel_options.items() if k not in bp_keys},
            device=device,
            offset=float(offset),
            channel_axis=channel_axis,
            skip_background=None if skip_background is None else float(skip_background),
        )
    source = ChunkSource(
        input_path=str(input_path),
        lead=tuple(tuple(int(i) for i in m) if m is not None else None for m in lead),
        shape=tuple(int(s) for s in plan.shape),
        working_chunks=tuple(int(c) for c in plan.working_chunks),
        depth=tuple(int(d) for d in plan.depth),
        boundary=METHOD_BOUNDARY[method],
        background_level=background_level if skip_background is not None else None,
    )
    return StoreResult(source=source, kernel=kernel, lead_shape=tuple(int(s) for s in lead_shape))
