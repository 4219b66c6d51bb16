"""Write a lazy result into a Zarr array, one task per working chunk, with progress.

Each task computes one working chunk and writes it into the output region it covers; the plan
guarantees that region is made of whole output chunks, so no two tasks touch the same chunk.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np

from .blockwise import check_write_alignment
from .errors import OutputError, SchedulerError
from .io import check_output_path, create_output_array


def block_regions(chunks: tuple[tuple[int, ...], ...]) -> list[tuple[tuple[int, ...], tuple]]:
    """List ``(block_index, region)`` for every block of a Dask chunk grid, in C order."""
    offsets = [np.concatenate([[0], np.cumsum(sizes)]).astype(int) for sizes in chunks]
    regions = []
    for index in itertools.product(*(range(len(sizes)) for sizes in chunks)):
        region = tuple(
            slice(int(offsets[axis][i]), int(offsets[axis][i + 1])) for axis, i in enumerate(index)
        )
        regions.append((index, region))
    return regions


def _write_block(block: np.ndarray, path: str, region: tuple) -> int:
    """Task: write one computed block into its region of the output array."""
    import zarr  # noqa: PLC0415

    if hasattr(block, "get"):  # CuPy -> NumPy before touching the store
        block = block.get()
    array = zarr.open_array(path, mode="r+")
    array[region] = np.asarray(block, dtype=array.dtype)
    return int(np.prod(block.shape))


def write_zarr(
    result: da.Array,
    output: str | os.PathLike,
    *,
    output_chunks: tuple[int, ...] | None = None,
    zarr_format: int = 3,
    attrs: dict | None = None,
    input_path: str | None = None,
    overwrite: bool = False,
    client: Any = None,
    progress: bool | Callable[[int, int], None] = False,
    shards: tuple[int, ...] | None = None,
    dimension_names: tuple[str, ...] | None = None,
):
    """Compute ``result`` and store it as a new Zarr array at ``output``.

    Parameters
    ----------
    result : dask.array.Array
        Lazy result, e.g. from :func:`ssi_dask.deconvolve`.
    output : str or path-like
        Path of the Zarr array to create.
    output_chunks : tuple of int, optional
        Chunk shape on disk; defaults to the result's (first) chunk shape. Every working
        chunk must be made of whole output chunks.
    zarr_format : {2, 3}
        Zarr format of the output.
    attrs : dict, optional
        Attributes to store (provenance); ``{"ssi_dask": {"complete": True}}`` is added once
        every chunk is written.
    input_path : str, optional
        Path of the input, to refuse writing over it.
    overwrite : bool
        Replace an existing output Zarr store.
    client : distributed.Client, optional
        Compute on this cluster; otherwise the current Dask scheduler is used.
    progress : bool or callable
        Show a progress bar (tqdm) or call ``progress(done, total)`` after each chunk.
    shards : tuple of int, optional
        Zarr v3 shard shape (a multiple of ``output_chunks``); give the working chunk shape
        so that every task writes whole shards.
    dimension_names : tuple of str, optional
        Axis names stored with a Zarr v3 array.

    Returns
    -------
    zarr.Array
        The output array, opened read-only.
    """
    import zarr  # noqa: PLC0415

    path = check_output_path(output, input_path=input_path, overwrite=overwrite)
    shape = tuple(int(s) for s in result.shape)
    output_chunks = tuple(output_chunks or (c[0] for c in result.chunks))
    check_write_alignment(result.chunks, output_chunks, shape)
    if shards is not None:  # concurrent writes into one shard would lose data
        check_write_alignment(result.chunks, shards, shape)
    metadata = dict(attrs or {})
    provenance = dict(metadata.get("ssi_dask", {}))
    provenance.update(complete=False, started=_now())
    metadata["ssi_dask"] = provenance
    create_output_array(
        path,
        shape=shape,
        chunks=output_chunks,
        dtype=np.float32,
        zarr_format=zarr_format,
        attrs=metadata,
        overwrite=overwrite,
        shards=shards,
        dimension_names=dimension_names,
    )
    blocks = result.to_delayed().ravel()
    regions = block_regions(result.chunks)
    writes = [
        dask.delayed(_write_block, pure=False)(block, str(path), region)
        for block, (_, region) in zip(blocks, regions)
    ]
    _run_with_progress(writes, client=client, progress=progress)
    array = zarr.open_array(str(path), mode="r+")
    provenance.update(complete=True, finished=_now(), chunks_written=len(writes))
    array.attrs["ssi_dask"] = provenance
    return zarr.open_array(str(path), mode="r")


def _run_with_progress(writes: list, *, client: Any, progress: bool | Callable) -> None:
    total = len(writes)
    callback = progress if callable(progress) else None
    bar = None
    if progress is True:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=total, unit="chunk", desc="deconvolving", dynamic_ncols=True)
    try:
        if client is None:
            try:
                from distributed import default_client  # noqa: PLC0415

                client = default_client()
            except (ImportError, ValueError):
                client = None
        if client is None:
            _compute_locally(writes, bar, callback)
            return
        from distributed import as_completed  # noqa: PLC0415

        futures = client.compute(writes)
        for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
            future.result()
            _tick(bar, callback, done, total)
    except OSError as exc:
        # A lost scheduler surfaces as a connection error; any other OSError comes from a
        # task's own write (disk full, read-only store) and must not be reported as the former.
        if isinstance(exc, (ConnectionError, TimeoutError)):
            raise SchedulerError(f"lost the Dask scheduler during the run: {exc}") from None
        raise OutputError(f"writing the output failed: {exc.strerror or exc}") from None
    finally:
        if bar is not None:
            bar.close()


def _compute_locally(writes: list, bar, callback) -> None:
    """Run every write on the local threaded scheduler, counting finished chunk writes."""
    from dask.callbacks import Callback  # noqa: PLC0415

    total = len(writes)
    done = 0

    class _CountWrites(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            nonlocal done
            name = key[0] if isinstance(key, tuple) else key
            if str(name).startswith("_write_block"):
                done += 1
                _tick(bar, callback, done, total)

    with _CountWrites():
        dask.compute(*writes)


def _tick(bar, callback, done: int, total: int) -> None:
    if bar is not None:
        bar.update(1)
    if callback is not None:
        callback(done, total)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
