"""Write a lazy result into a Zarr array, one task per working chunk, with progress and resume.

Each task computes one working chunk, writes it into the output region it covers and then
records it as finished (:mod:`ssi_dask.progress`); the plan guarantees that region is made of
whole output chunks (whole shards for sharded Zarr v3), so no two tasks touch the same chunk.
A resumed run computes only the chunks without a record (or whose chunk files are gone; with
``repair`` also those whose data no longer match their checksum), and the output is marked
complete only when every chunk has one.

What is fingerprinted is the computation itself: :func:`ssi_dask.deconvolve` attaches its
provenance (method, iterations, back projector, PSF and model hashes, halo, chunks, the input's
shape and dtype) to the lazy result, and each chunk's record also says what input data it read
(:mod:`ssi_dask.chunkfiles`); a resume after the input's data changed is refused. The input's
path is not part of the fingerprint: moved or copied identical data resumes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as _dt
import errno
import itertools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from . import progress as records
from . import safety
from .blockwise import check_write_alignment
from .chunkfiles import GridRegions
from .errors import OutputError, RunError, SchedulerError, SsiDaskError
from .io import create_output_array, is_zarr_path

#: Seconds between checks of the cluster while waiting for chunks.
POLL_SECONDS = 0.2

#: errno values that mean "no room left" for a write.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _write_block(
    block: np.ndarray,
    path: str,
    fingerprint: str,
    run: str,
    input_reference: Any = None,
    block_info: dict | None = None,
) -> np.ndarray:
    """Per-block function: write one computed block into its region, then record it done.

    Applied with ``map_blocks`` on the result, so Dask fuses it into the task that computes
    the block: a computed block is never held in memory waiting for a separate write task.
    Every output chunk gets a file, even an all-zero one (``write_empty_chunks``), so that a
    missing file always means a lost chunk. With an ``input_reference`` the record also holds
    the signature of the input region the block was computed from. Returns a one-element
    array per block.
    """
    info = block_info[0]
    region = tuple(slice(int(a), int(b)) for a, b in info["array-location"])
    write_chunk(block, path, info["chunk-location"], region, fingerprint, run, input_reference)
    return np.ones((1,) * block.ndim, dtype=np.int8)


def write_chunk(
    block: np.ndarray,
    path: str,
    index: tuple[int, ...],
    region: tuple[slice, ...],
    fingerprint: str,
    run: str,
    input_reference: Any = None,
    skipped: str | None = None,
) -> None:
    """Write one computed working chunk into ``region`` of the output, then record it done.

    Shared by both graphs (``map_overlap`` and :mod:`ssi_dask.storegraph`): refuses a
    non-finite result (nothing written, no record), writes every output chunk even when all
    zero, and only then writes the completion record with the input signature. ``skipped``
    marks a chunk written as background without computing: ``"input"`` when its input decided
    it, ``"pyramid"`` when a coarse pyramid level did and the input was never read (its record
    then holds only the quick signature of the input files, see
    :meth:`ssi_dask.chunkfiles.InputReference.signature`).
    """
    import zarr  # noqa: PLC0415

    if hasattr(block, "get"):  # CuPy -> NumPy before touching the store
        block = block.get()
    array = zarr.open_array(path, mode="r+").with_config({"write_empty_chunks": True})
    data = np.ascontiguousarray(block, dtype=np.float32)
    if not np.isfinite(data).all():  # never store (nor record) garbage: the run must stop
        from .errors import NonFiniteResultError  # noqa: PLC0415

        raise NonFiniteResultError(non_finite_message(data, region))
    clipped = 0
    if array.dtype != np.float32:
        data, clipped = encode_values(
            data,
            array.dtype,
            float(array.attrs.get("scale_factor", 1.0)),
            float(array.attrs.get("add_offset", 0.0)),
        )
    array[region] = data
    signature = None
    if input_reference is not None:
        signature = input_reference.signature(region, read=skipped != "pyramid")
    # Only now, with the data in the store, may the chunk count as finished.
    records.write_record(
        path,
        index,
        region,
        run_fingerprint=fingerprint,
        checksum=records.data_checksum(data),
        run_id=run,
        input_signature=signature,
        clipped=clipped,
        skipped=skipped,
    )


#: Output dtypes :func:`write_zarr` can store (``output_dtype``).
STORED_DTYPES = ("float32", "float16", "uint16", "uint8")


def encode_values(
    data: np.ndarray, dtype: Any, scale_factor: float = 1.0, add_offset: float = 0.0
) -> tuple[np.ndarray, int]:
    """Float32 results as stored in ``dtype``, and how many values were clipped to its range.

    Integer types hold ``round((value - add_offset) / scale_factor)`` (CF conventions: a
    reader gets ``stored * scale_factor + add_offset`` back, as xarray does by itself);
    float16 holds the values, those beyond +-65504 clipped there instead of becoming Inf.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.rint((data.astype(np.float64) - add_offset) / scale_factor)
    else:
        info = np.finfo(dtype)
        values = data
    low, high = float(info.min), float(info.max)
    clipped = int(np.count_nonzero(values < low) + np.count_nonzero(values > high))
    if clipped:
        values = np.clip(values, low, high)
    return np.ascontiguousarray(values.astype(dtype)), clipped


def output_attributes(dtype: Any) -> dict:
    """CF attributes that map an integer output's stored values back (none for floats)."""
    if np.dtype(dtype).kind in "iu":
        return {"scale_factor": 1.0, "add_offset": 0.0}
    return {}


def non_finite_message(data: np.ndarray, region: tuple[slice, ...]) -> str:
    """The one-line error for a chunk whose result holds NaN or Inf (nothing of it written)."""
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    return (
        f"the result of chunk {records.region_text(region)} is not finite ({bad} of {data.size} "
        "values NaN or Inf) and was not written; likely cause: negative input values (subtract "
        "the background, e.g. with offset=) or values too large for float32, or with "
        "method='ssi' a model that does not fit this data"
    )


def check_shard_alignment(
    working_chunks: tuple[tuple[int, ...], ...],
    output_chunks: tuple[int, ...],
    output_shards: tuple[int, ...] | None,
    shape: tuple[int, ...],
    zarr_format: int,
) -> None:
    """Refuse shards that Zarr cannot make or that two tasks would share.

    A shard is the unit Zarr rewrites as a whole, so with sharding every working chunk must be
    made of whole shards (not just whole chunks).
    """
    if output_shards is None:
        return
    if zarr_format != 3:
        raise OutputError(
            "sharding needs a Zarr v3 output; drop output_shards or use zarr_format=3"
        )
    if len(output_shards) != len(shape):
        raise OutputError(f"invalid output shards {output_shards} for shape {shape}")
    for axis, (shard, chunk) in enumerate(zip(output_shards, output_chunks)):
        if shard % chunk:
            raise OutputError(
                f"shard size {shard} along axis {axis} is not a multiple of the output chunk "
                f"size {chunk}; choose output_shards as multiples of {tuple(output_chunks)}"
            )
    for axis, (sizes, shard) in enumerate(zip(working_chunks, output_shards)):
        bad = [int(e) for e in np.cumsum(sizes)[:-1] if e % shard]
        if bad:
            raise OutputError(
                f"working chunks along axis {axis} end at {bad[:3]} which are not multiples of the "
                f"shard size {shard}: two tasks would rewrite the same shard; choose chunks= as "
                f"multiples of the shards {tuple(output_shards)}"
            )


def write_zarr(
    result: da.Array,
    output: str | os.PathLike,
    *,
    output_chunks: tuple[int, ...] | None = None,
    zarr_format: int = 3,
    attrs: dict | None = None,
    input_path: str | os.PathLike | list | None = None,
    overwrite: bool = False,
    client: Any = None,
    progress: bool | Callable[[int, int], None] = False,
    resume: bool = False,
    output_shards: tuple[int, ...] | None = None,
    worker_timeout: float = 120.0,
    dimension_names: tuple[str, ...] | None = None,
    repair: bool = False,
    output_dtype: str = "float32",
):
    """Compute ``result`` and store it as a Zarr array at ``output``, chunk by chunk.

    Parameters
    ----------
    result : dask.array.Array or ssi_dask.storegraph.StoreResult
        Lazy result, e.g. from :func:`ssi_dask.deconvolve`; or a run from the store
        (``ssi_dask.run``), computed one task per chunk in waves with a distributed client.
    output : str or path-like
        Path of the Zarr array to create (or to complete, with ``resume``).
    output_chunks : tuple of int, optional
        Chunk shape on disk; defaults to the result's (first) chunk shape. Every working
        chunk must be made of whole output chunks.
    zarr_format : {2, 3}
        Zarr format of the output.
    attrs : dict, optional
        Attributes to store (provenance). Under ``"ssi_dask"`` this adds ``complete`` (True
        once every chunk is recorded), ``fingerprint``, ``layout`` and ``computation`` (the
        provenance :func:`ssi_dask.deconvolve` attached to ``result``). The fingerprint
        hashes ``computation``, the layout and the ``"ssi_dask"`` entries other than
        run-specific ones (command, times, file paths): a resume refuses an output whose
        fingerprint differs.
    input_path : path-like or list of path-like, optional
        The input(s) (image, PSF and model files). The output may not be, lie inside or
        contain any of them, nor any file or Zarr store that ``result`` reads (found in its
        graph, so this holds even when ``input_path`` is not given).
    overwrite : bool
        Replace an existing output, only when it is a store ssi-dask made that holds nothing
        but its Zarr files (see :mod:`ssi_dask.safety`). The output is locked while written:
        a second run on the same output is refused.
    client : distributed.Client, optional
        Compute on this cluster; otherwise the current Dask scheduler is used.
    progress : bool or callable
        Show a progress bar (tqdm) or call ``progress(done, total)`` after each chunk.
    resume : bool
        When ``output`` exists, keep every chunk recorded as finished whose chunk files are
        all in the store, and compute the others, after checking that the output was made by
        the same computation from the same input data (each chunk's record holds a signature
        of the input it read: a cheap one of the input files' names, sizes and modification
        times, and a checksum of the decoded input region, re-read only where the cheap one
        differs). Needs a ``result`` from :func:`ssi_dask.deconvolve` (any other Dask array
        carries nothing that identifies its computation, so resuming into it is refused). When
        ``output`` does not exist, start a new output.
    output_shards : tuple of int, optional
        Zarr v3 shard shape (multiples of ``output_chunks``); every working chunk must then be
        made of whole shards.
    worker_timeout : float
        With a cluster: give up (keeping the progress) when no worker has been connected for
        this many seconds.
    dimension_names : tuple of str, optional
        Axis names stored with a Zarr v3 array (OME-Zarr 0.5 needs them).
    repair : bool
        With ``resume``: also re-read every recorded chunk and recompute those that do not
        decode or whose data differ from the checksum in their record.
    output_dtype : {"float32", "float16", "uint16", "uint8"}
        The stored type (see :func:`encode_values`): integer outputs get CF ``scale_factor``
        and ``add_offset`` attributes; the values clipped to the type's range are counted in
        the records and stored as ``ssi_dask.clipped_values`` at the end.

    Returns
    -------
    zarr.Array
        The output array, opened read-only.

    Raises
    ------
    OutputError
        Bad output path, misaligned chunks or shards, a resume of a different computation or
        of changed input data, a failed write (e.g. disk full), or chunks missing at the end.
    SchedulerError
        The scheduler or every worker was lost; the chunks written so far are kept.
    """
    import zarr  # noqa: PLC0415

    shape = tuple(int(s) for s in result.shape)
    output_chunks = tuple(int(c) for c in (output_chunks or (c[0] for c in result.chunks)))
    if output_shards is not None:
        output_shards = tuple(int(s) for s in output_shards)
    check_write_alignment(result.chunks, output_chunks, shape)
    check_shard_alignment(result.chunks, output_chunks, output_shards, shape, zarr_format)
    regions = GridRegions(result.chunks)
    metadata = dict(attrs or {})
    computation = getattr(result, "ssi_dask_provenance", None)
    input_reference = getattr(result, "ssi_dask_input", None)
    if output_dtype not in STORED_DTYPES:
        raise OutputError(
            f"output_dtype must be one of {', '.join(STORED_DTYPES)}, got {output_dtype!r}"
        )
    provenance = output_provenance(
        metadata,
        shape=shape,
        grid=result.chunks,
        output_chunks=output_chunks,
        output_shards=output_shards,
        zarr_format=zarr_format,
        computation=computation,
        dtype=output_dtype,
    )
    if resume and overwrite:
        raise OutputError(
            "resume=True keeps the output and overwrite=True deletes it; give only one"
        )
    if repair and not resume:
        raise OutputError(
            "repair=True checks an existing output; give it together with resume=True"
        )
    given = input_path if isinstance(input_path, (list, tuple)) else [input_path]
    inputs = [*given, *safety.source_paths(result)]
    with contextlib.ExitStack() as claim:
        if resume and Path(output).exists():
            path = safety.check_not_input(output, inputs)
            if computation is None:
                raise OutputError(
                    f"cannot resume {str(path)!r} with this result: only a result of "
                    "ssi_dask.deconvolve carries what identifies its computation; pass that "
                    "result, or overwrite=True to start again"
                )
            claim.enter_context(safety.output_lock(path))  # one run at a time
            provenance = check_resume(
                path, provenance, input_path=inputs, input_reference=input_reference
            )
            provenance["resumed"] = [*provenance.get("resumed", []), _now()]
            provenance["complete"] = False
            zarr.open_array(str(path), mode="r+").attrs["ssi_dask"] = provenance
        else:
            path = claim.enter_context(
                safety.claim_output(output, inputs=inputs, overwrite=overwrite)
            )
            provenance["started"] = _now()
            metadata["ssi_dask"] = provenance
            metadata.update(output_attributes(output_dtype))
            create_output_array(
                path,
                shape=shape,
                chunks=output_chunks,
                dtype=output_dtype,
                zarr_format=zarr_format,
                attrs=metadata,
                shards=output_shards,
                dimension_names=dimension_names,
            )
        return _compute_into(
            result,
            path,
            provenance=provenance,
            regions=regions,
            resume=resume,
            repair=repair,
            input_reference=input_reference,
            client=client,
            progress=progress,
            worker_timeout=worker_timeout,
        )


def _compute_into(
    result: da.Array,
    path: Path,
    *,
    provenance: dict,
    regions: dict,
    resume: bool,
    repair: bool,
    input_reference: Any,
    client: Any,
    progress: bool | Callable[[int, int], None],
    worker_timeout: float,
):
    """Compute the chunks of ``result`` that ``path`` has no record of; mark it complete."""

    run_fingerprint = provenance["fingerprint"]
    if repair:  # the repair compares every chunk with the checksum its record holds
        done = records.read_records(path, run_fingerprint=run_fingerprint, regions=regions)
    else:  # one byte per chunk, however many chunks
        done = records.tally_records(path, run_fingerprint=run_fingerprint, regions=regions)
    if resume and done:
        done = _drop_lost_chunks(path, regions, done, repair=repair)
    if resume and done:
        print(
            f"resuming {path}: {len(done)} of {len(regions)} chunks already written, "
            f"computing {len(regions) - len(done)}",
            flush=True,
        )
    run_id = records.new_run_id()
    if hasattr(result, "chunk_tasks"):  # ssi_dask.storegraph: one task per chunk, in waves
        if len(regions) > len(done):
            tasks = result.chunk_tasks(str(path), run_fingerprint, run_id)
            _run_with_progress(
                {},
                client=client,
                progress=progress,
                output=path,
                regions=regions,
                worker_timeout=worker_timeout,
                waves=(tasks, (i for i in regions if i not in done), len(regions) - len(done)),
            )
        return _finish(path, provenance, regions)
    todo = records.missing_blocks(regions, done)
    written = result.map_blocks(
        _write_block,
        str(path),
        run_fingerprint,
        run_id,
        input_reference,
        chunks=tuple((1,) * len(sizes) for sizes in result.chunks),
        dtype=np.int8,
        meta=np.empty((0,) * result.ndim, dtype=np.int8),
        name=f"_write_block-{run_id}",
    )
    blocks = written.to_delayed()  # the graph is optimised (write fused with the kernel)
    writes = {index: blocks[index] for index in todo}
    if writes:
        _run_with_progress(
            writes,
            client=client,
            progress=progress,
            output=path,
            regions=regions,
            worker_timeout=worker_timeout,
        )
    return _finish(path, provenance, regions)


def _finish(path: Path, provenance: dict, regions: Any):
    """Check that every chunk is recorded with its files; mark the output complete.

    The records are streamed into a :class:`ssi_dask.progress.RecordTally` (one byte per
    chunk), so finishing a run of millions of chunks holds no record in memory.
    """
    import zarr  # noqa: PLC0415

    run_fingerprint = provenance["fingerprint"]
    finished = records.tally_records(path, run_fingerprint=run_fingerprint, regions=regions)
    finished = _drop_lost_chunks(path, regions, finished, repair=False, quiet=True)
    missing = finished.first_missing()
    if missing is not None:
        raise OutputError(
            f"only {len(finished)} of {len(regions)} chunks of {str(path)!r} are recorded as "
            f"written (first missing: {records.region_text(regions[missing])}); the output is "
            "incomplete: re-run with resume=True"
        )
    array = zarr.open_array(str(path), mode="r+")
    provenance.update(complete=True, finished=_now(), chunks_written=len(finished))
    if finished.clipped or provenance.get("layout", {}).get("dtype", "float32") != "float32":
        provenance["clipped_values"] = finished.clipped
    if "skip_background" in provenance:
        provenance["skipped_chunks"] = finished.skipped
    if "skip_background_level" in provenance:  # decided from the pyramid, input left unread
        provenance["skipped_unread"] = finished.skipped_unread
    array.attrs["ssi_dask"] = provenance
    return zarr.open_array(str(path), mode="r")


def _drop_lost_chunks(
    path: Path,
    regions: dict,
    done: dict,
    *,
    repair: bool,
    quiet: bool = False,
) -> dict:
    """The records of ``done`` whose chunks are intact; the others' records are removed.

    A chunk is lost when one of its chunk (shard) files is missing from the store (one
    listing); with ``repair`` also when it does not decode or its checksum differs (its chunk
    files are then removed too, before it is recomputed).
    """
    import zarr  # noqa: PLC0415

    from .verify import inspect_chunks  # noqa: PLC0415

    array = zarr.open_array(str(path), mode="r")
    lost, damaged = inspect_chunks(path, array, regions, done, check_data=repair)
    bad = sorted(set(lost) | set(damaged))
    if not bad:
        return done
    if not quiet:
        first = records.region_text(regions[bad[0]])
        print(
            f"recomputing {len(lost)} chunks whose files are missing"
            + (f" and {len(damaged)} damaged chunks" if repair else "")
            + f" (first: {first})",
            flush=True,
        )
    records.remove_records(path, bad)
    # A damaged chunk's files go too: Zarr may read a shard before rewriting it, and a shard
    # that does not decode would fail the recomputation's write.
    from .chunkfiles import keys_for_region  # noqa: PLC0415

    for index in damaged:
        for key in keys_for_region(array, regions[index]):
            (path / key).unlink(missing_ok=True)
    if isinstance(done, records.RecordTally):
        done.discard(bad)
        return done
    lost_or_damaged = set(bad)
    return {index: record for index, record in done.items() if index not in lost_or_damaged}


def output_provenance(
    attrs: dict | None,
    *,
    shape: tuple[int, ...],
    grid: tuple[tuple[int, ...], ...],
    output_chunks: tuple[int, ...],
    output_shards: tuple[int, ...] | None,
    zarr_format: int,
    computation: dict | None = None,
    dtype: str = "float32",
) -> dict:
    """The ``ssi_dask`` attributes of a new output: provenance, layout, fingerprint.

    The fingerprint hashes every entry that identifies the computation (see
    :func:`ssi_dask.progress.parameters_of`), the ``computation`` that
    :func:`ssi_dask.deconvolve` attached to its result (stored as ``computation``), and the
    layout of the working chunks and of the store; records of other computations never count
    for this output.
    """
    provenance = {
        key: value
        for key, value in dict((attrs or {}).get("ssi_dask", {})).items()
        if key not in ("fingerprint", "complete")
    }
    provenance["layout"] = {
        "shape": [int(s) for s in shape],
        "grid": [[int(s) for s in sizes] for sizes in grid],
        "chunks_total": int(np.prod([len(sizes) for sizes in grid])),
        "output_chunks": [int(c) for c in output_chunks],
        "output_shards": [int(s) for s in output_shards] if output_shards else None,
        "zarr_format": int(zarr_format),
        "dtype": str(dtype),
    }
    if computation is not None:
        provenance["computation"] = computation
    provenance["fingerprint"] = records.fingerprint(records.parameters_of(provenance))
    provenance["complete"] = False
    return provenance


def check_resume(
    output: str | os.PathLike,
    provenance: dict,
    *,
    input_path: str | os.PathLike | list | None = None,
    input_reference: Any = None,
) -> dict:
    """Check, without changing anything, that ``output`` can be resumed by this computation.

    Parameters
    ----------
    output : str or path-like
        The existing output.
    provenance : dict
        The new run's attributes, from :func:`output_provenance`.
    input_path : path-like or list of path-like, optional
        The input(s), to refuse an output that overlaps one.
    input_reference : ssi_dask.chunkfiles.InputReference, optional
        The on-disk input: the chunks already written must have been made from the data it
        holds now (see :func:`ssi_dask.chunkfiles.changed_input_chunks`).

    Returns
    -------
    dict
        The existing output's ``ssi_dask`` attributes.

    Raises
    ------
    OutputError
        When ``output`` is not an ssi-dask output, was made by a different computation
        (parameters, PSF, model, chunk layout; the message names the differences), or from
        input data that has changed since.
    """
    import zarr  # noqa: PLC0415

    path = Path(output).resolve()
    if not is_zarr_path(path):
        raise OutputError(
            f"output {str(path)!r} exists and is not a Zarr store; cannot resume into it, "
            "choose another output"
        )
    inputs = input_path if isinstance(input_path, list) else [input_path]
    safety.check_not_input(path, inputs)
    safety.check_unlocked(path)
    try:
        existing = dict(zarr.open_array(str(path), mode="r").attrs.get("ssi_dask") or {})
    except Exception as exc:
        raise OutputError(
            f"output {str(path)!r} cannot be opened as a Zarr array ({type(exc).__name__}); "
            "cannot resume it, choose a new output or pass overwrite=True"
        ) from None
    if "fingerprint" not in existing:
        raise OutputError(
            f"output {str(path)!r} has no ssi-dask progress records; cannot resume it, choose a "
            "new output or pass overwrite=True"
        )
    if existing["fingerprint"] != provenance["fingerprint"]:
        old = records.parameters_of(existing)
        new = records.parameters_of(provenance)
        differences = records.describe_differences(old, new) or ["stored fingerprint"]
        raise OutputError(
            f"output {str(path)!r} was made with different parameters "
            f"({'; '.join(differences[:4])}); resume with the same parameters, PSF and model, "
            "or pass overwrite=True to start again"
        )
    if input_reference is not None:
        _check_input_unchanged(path, existing, input_reference)
    return existing


def _check_input_unchanged(path: Path, existing: dict, input_reference: Any) -> None:
    """Refuse a resume when chunks already written were made from other input data."""
    from .chunkfiles import changed_input_chunks  # noqa: PLC0415

    grid = tuple(tuple(sizes) for sizes in existing["layout"]["grid"])
    regions = GridRegions(grid)
    done = records.iter_records(path, run_fingerprint=existing["fingerprint"], regions=regions)
    unread: list = []
    changed, _, checked = changed_input_chunks(input_reference, done, regions, unread=unread)
    if changed:
        first = ", ".join(records.region_text(regions[index]) for index in changed[:3])
        if len(unread) == len(changed):
            # their records hold no content signature: the files changed, maybe not the data
            raise OutputError(
                f"the input changed since {str(path)!r} was written (the names, sizes or times "
                f"of its files): {len(changed)} of {checked} chunks already written were "
                "decided from its pyramid level without reading it (skip_background_level), "
                "so nothing proves that they hold this input's data "
                f"(first: {first}); pass overwrite=True to start again"
            )
        raise OutputError(
            f"the input changed since {str(path)!r} was written: {len(changed)} of {checked} "
            f"chunks already written were made from other input data (first: {first}); "
            "resuming would mix old and new input: pass overwrite=True to start again"
        )


def recorded_chunks(output: str | os.PathLike, provenance: dict) -> int:
    """How many working chunks of ``output`` are recorded as written for this computation."""
    grid = tuple(tuple(sizes) for sizes in provenance["layout"]["grid"])
    regions = GridRegions(grid)
    return len(
        records.tally_records(output, run_fingerprint=provenance["fingerprint"], regions=regions)
    )


def _run_with_progress(
    writes: dict,
    *,
    client: Any,
    progress: bool | Callable,
    output: Path,
    regions: dict,
    worker_timeout: float,
    waves: tuple | None = None,
) -> None:
    total = len(writes) if waves is None else waves[2]
    callback = progress if callable(progress) else None
    bar = None
    if progress is True:  # the command line's bar: chunks and one rate, in voxels/s
        from .summary import ChunkProgress  # noqa: PLC0415

        sizes = [math.prod(s.stop - s.start for s in region) for region in regions.values()]
        callback = ChunkProgress(sum(sizes), total_chunks=len(regions))
    if callback is not None:
        callback(0, total)  # the bar appears (and the clock starts) before the first chunk ends
    try:
        if client is None:
            try:
                from distributed import default_client  # noqa: PLC0415

                client = default_client()
            except (ImportError, ValueError):
                client = None
        if waves is not None:
            tasks, todo, _ = waves
            if client is None:
                raise SchedulerError(
                    "a run from the store needs a Dask distributed client: pass client="
                )
            _compute_in_waves(
                client, tasks, todo, total, bar, callback, output, regions, worker_timeout
            )
            return
        if client is None:
            try:
                _compute_locally(list(writes.values()), bar, callback)
            except Exception as exc:
                raise _task_failure(exc, output, regions, None) from None
            return
        _compute_on_cluster(client, writes, bar, callback, output, regions, worker_timeout)
    finally:
        if bar is not None:
            bar.close()
        if progress is True and callback is not None:
            callback.close()


def _compute_on_cluster(client, writes, bar, callback, output, regions, worker_timeout) -> None:
    """Submit every chunk write and wait, watching for lost workers and a lost scheduler."""
    from distributed import as_completed  # noqa: PLC0415

    indices = list(writes)
    try:
        futures = client.compute([writes[index] for index in indices])
    except OSError as exc:
        raise _lost_scheduler(exc, output) from None
    index_of = {future.key: index for future, index in zip(futures, indices)}
    waiting = as_completed(futures, loop=client.loop)
    total = len(futures)
    del futures
    _wait_for_writes(
        client, waiting, index_of, total, bar, callback, output, regions, worker_timeout
    )


def _compute_in_waves(
    client, tasks, todo, total, bar, callback, output, regions, worker_timeout
) -> None:
    """Submit one task per chunk, a bounded number in flight, the next as earlier ones finish.

    ``tasks`` (a :class:`ssi_dask.storegraph.ChunkTasks`) submits the task of one block index;
    ``todo`` is a lazy iterator over the block indices still to compute, so neither this
    process nor the scheduler ever holds more than ``tasks.in_flight(client)`` chunk tasks:
    their memory stays flat whatever the volume's size. Lost workers, a lost scheduler and
    failed chunks are handled as by :func:`_compute_on_cluster`.
    """
    from distributed import as_completed  # noqa: PLC0415

    limit = tasks.in_flight(client)
    index_of: dict = {}
    try:
        tasks.start(client)
        waiting = as_completed([], loop=client.loop)
        for index in itertools.islice(todo, limit):
            future = tasks.submit(client, index)
            index_of[future.key] = index
            waiting.add(future)
    except OSError as exc:
        raise _lost_scheduler(exc, output) from None
    try:
        _wait_for_writes(
            client, waiting, index_of, total, bar, callback, output, regions, worker_timeout,
            next_wave=lambda: _submit_next(client, tasks, todo, waiting, index_of, output),
        )  # fmt: skip
    finally:
        tasks.stop(client)


def _submit_next(client, tasks, todo, waiting, index_of, output) -> None:
    """Submit the task of the next block index in ``todo``, if any (one wave step)."""
    for following in itertools.islice(todo, 1):
        try:
            submitted = tasks.submit(client, following)
        except OSError as exc:
            raise _lost_scheduler(exc, output) from None
        index_of[submitted.key] = following
        waiting.add(submitted)


def _wait_for_writes(
    client, waiting, index_of, total, bar, callback, output, regions, worker_timeout, next_wave=None
) -> None:
    """Wait for the chunk writes in ``waiting`` (``as_completed``), ticking the progress; a
    failed chunk, a lost scheduler or no worker left for ``worker_timeout`` seconds stops the
    run (cancelling what is still waiting). ``next_wave()`` is called after each finished
    write (the waves submit their next task there)."""
    done = 0
    alone_since = None
    try:
        while not waiting.is_empty():
            finished = waiting.next_batch(block=False) if waiting.has_ready() else []
            for future in finished:
                # Never gather: a finished write's small result may sit on a worker that has
                # since died, and gathering it would wait for a recomputation.
                index = index_of.pop(future.key, None)
                if future.status == "error":
                    raise _task_failure(future.exception(), output, regions, index)
                if future.status == "cancelled":  # cancelled with the scheduler connection
                    raise _lost_scheduler(ConnectionError("cancelled"), output)
                future.release()  # a lost worker must not make the scheduler redo this write
                done += 1
                _tick(bar, callback, done, total)
                if next_wave is not None:
                    next_wave()
            if finished:
                continue
            time.sleep(POLL_SECONDS)
            if _worker_count(client, output):
                alone_since = None
                continue
            alone_since = alone_since or time.monotonic()
            if time.monotonic() - alone_since > worker_timeout:
                raise SchedulerError(
                    f"no Dask worker left for {worker_timeout:g} s (all workers gone); "
                    f"{_kept(output, regions)}: start workers and re-run with resume=True"
                )
    except BaseException:
        try:
            client.cancel(list(waiting.futures))
        except Exception:
            pass
        raise


def _worker_count(client: Any, output: Path) -> int:
    """Workers connected to the scheduler now; a failure to ask means the scheduler is gone."""
    if client.status not in ("running", "newly-created"):
        raise _lost_scheduler(ConnectionError(f"client status {client.status}"), output)
    try:
        return len(client.nthreads())
    except (OSError, RuntimeError) as exc:
        raise _lost_scheduler(exc, output) from None


def _lost_scheduler(exc: BaseException, output: Path) -> SchedulerError:
    return SchedulerError(
        f"lost the Dask scheduler during the run ({type(exc).__name__}); the chunks written to "
        f"{str(output)!r} so far are kept: restart the scheduler and workers and re-run with "
        "resume=True"
    )


def _kept(output: Path, regions: dict) -> str:
    """``N of M chunks of OUTPUT are kept`` from the records on disk."""
    fingerprint = _stored_fingerprint(output)
    done = records.tally_records(output, run_fingerprint=fingerprint, regions=regions)
    return f"{len(done)} of {len(regions)} chunks of {str(output)!r} are written and kept"


def _stored_fingerprint(output: Path) -> str:
    import zarr  # noqa: PLC0415

    try:
        return zarr.open_array(str(output), mode="r").attrs["ssi_dask"]["fingerprint"]
    except Exception:
        return ""


def _task_failure(
    exc: BaseException, output: Path, regions: dict, index: tuple | None
) -> SsiDaskError:
    """Turn the exception of a chunk task into a one-line error that keeps the progress."""
    from .errors import NonFiniteResultError  # noqa: PLC0415

    region = records.region_text(regions[index]) if index in regions else ""
    where = f" (chunk {region})" if region and region not in str(exc) else ""
    if isinstance(exc, NonFiniteResultError):
        return NonFiniteResultError(
            f"{exc}; fix that, then re-run with resume=True (same parameters) or overwrite=True "
            f"({_kept(output, regions)})"
        )
    if isinstance(exc, SsiDaskError):
        return type(exc)(f"{exc}{where}")
    if type(exc).__name__ == "KilledWorker":
        return SchedulerError(
            f"a chunk{where} was lost with its worker too many times (the worker died: out of "
            f"memory?); use smaller chunks= or a larger memory_limit, then re-run with "
            f"resume=True ({_kept(output, regions)})"
        )
    if isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return _lost_scheduler(exc, output)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return _lost_scheduler(exc, output)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        filename = str(exc.filename or "")
        if exc.errno in DISK_FULL_ERRNOS:
            return OutputError(
                f"the disk is full writing {str(output)!r} ({reason}); free space or choose "
                f"another output, then re-run with resume=True ({_kept(output, regions)})"
            )
        if filename and not filename.startswith(str(output)):
            return RunError(
                f"reading {filename!r} failed{where} ({reason}); check the input, then re-run "
                f"with resume=True ({_kept(output, regions)})"
            )
        return OutputError(
            f"writing the output failed{where} ({reason}); re-run with resume=True once fixed "
            f"({_kept(output, regions)})"
        )
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return RunError(
        f"computing the chunk {region} failed ({type(exc).__name__}: {detail}); check the input "
        f"there (a corrupt or unreadable file?), then re-run with resume=True "
        f"({_kept(output, regions)})"
    )


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
