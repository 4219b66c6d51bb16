"""Per-chunk completion records: what a resumed run may skip and what ``verify`` checks.

Each working chunk of an output gets one small JSON record in ``OUTPUT/.ssi_dask_progress/``,
written by the task *after* the chunk's data is in the store. A record is written to a private
temporary file, flushed to disk and renamed into place, so a reader sees either no record or
a whole one; a task killed half-way through its data write leaves no record and the chunk is
recomputed. Records carry the run's parameter fingerprint (a record from another computation
never counts) and a checksum of the chunk's data as written (``verify --check-data`` re-reads
the data and compares).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .safety import write_atomically

#: Folder of the records, inside the output array's directory (removed with it by
#: ``--overwrite``; ignored by Zarr, which only reads its own metadata and chunk keys).
PROGRESS_FOLDER = ".ssi_dask_progress"

#: Provenance entries that describe one run rather than the computation: they may differ
#: between the first run and a resumed one.
RUN_SPECIFIC_KEYS = frozenset(
    {
        "command",
        "started",
        "finished",
        "resumed",
        "complete",
        "chunks_written",
        "source",
        "fingerprint",
        "input",  # the input's path: a resume checks the input's content instead
        # what a finished run counted (see ssi_dask.store._finish): results, not parameters
        "clipped_values",
        "skipped_chunks",
        "skipped_unread",
    }
)

BlockIndex = tuple[int, ...]


def progress_folder(output: str | os.PathLike) -> Path:
    """The folder holding the completion records of ``output``."""
    return Path(output) / PROGRESS_FOLDER


def record_name(index: Sequence[int]) -> str:
    """File name of the record of the working chunk at grid position ``index``."""
    return ".".join(str(int(i)) for i in index)


def parameters_of(provenance: dict[str, Any]) -> dict[str, Any]:
    """The entries of a provenance dict that identify the computation (recursively).

    Drops run-specific entries (command line, timestamps, file paths of the PSF and model,
    whose content hashes stay), so the same computation started again compares equal.
    """
    result = {}
    for key, value in provenance.items():
        if key in RUN_SPECIFIC_KEYS:
            continue
        result[key] = parameters_of(value) if isinstance(value, dict) else value
    return result


def fingerprint(parameters: dict[str, Any]) -> str:
    """A short content hash of a parameter dict (canonical JSON)."""
    text = json.dumps(parameters, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def describe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old there, new now`` for every leaf that differs between two parameter dicts."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines.extend(describe_differences(a, b, prefix=f"{name}."))
        elif _normalise(a) != _normalise(b):
            lines.append(f"{name}: {_short(a)} there, {_short(b)} now")
    return lines


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def region_text(region: Sequence[slice]) -> str:
    """A region as ``[z0:z1, y0:y1, x0:x1]`` for messages."""
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def data_checksum(block: np.ndarray) -> str:
    """Checksum of a chunk's data exactly as stored (C-ordered bytes of its dtype)."""
    contiguous = np.ascontiguousarray(block)
    return hashlib.blake2b(memoryview(contiguous).cast("B"), digest_size=16).hexdigest()


def write_record(
    output: str | os.PathLike,
    index: Sequence[int],
    region: Sequence[slice],
    *,
    run_fingerprint: str,
    checksum: str,
    run_id: str,
    input_signature: dict[str, str] | None = None,
    clipped: int = 0,
    skipped: str | None = None,
) -> Path:
    """Record that the working chunk at ``index`` is written; atomic and safe to repeat.

    The record goes to a temporary file unique to this writer, is flushed and fsynced, and is
    then renamed over the final name. ``input_signature`` (see
    :meth:`ssi_dask.chunkfiles.InputReference.signature`) says what input the chunk was made
    from, so that a resume can detect a changed input; ``clipped`` counts the values clipped
    to the output dtype's range. Two writers of the same chunk (a task
    retried while its first attempt still runs) each leave a whole record, and a crash leaves
    no record at all.
    """
    folder = progress_folder(output)
    folder.mkdir(exist_ok=True)
    final = folder / record_name(index)
    record = {
        "index": [int(i) for i in index],
        "region": [[int(s.start), int(s.stop)] for s in region],
        "fingerprint": run_fingerprint,
        "checksum": checksum,
        "run": run_id,
    }
    if input_signature is not None:
        record["input"] = dict(input_signature)
    if clipped:  # values outside the output dtype's range (see ssi_dask.store.encode_values)
        record["clipped"] = int(clipped)
    if skipped:  # written as background without computing: what decided it (skip_background)
        record["skipped"] = skipped
    write_atomically(final, json.dumps(record))
    return final


def iter_records(
    output: str | os.PathLike,
    *,
    run_fingerprint: str,
    regions: Mapping[BlockIndex, tuple[slice, ...]],
) -> Iterator[tuple[BlockIndex, dict[str, Any]]]:
    """The valid completion records of ``output``, one ``(block index, record)`` at a time.

    A record counts only when it parses as a whole, carries ``run_fingerprint`` and names a
    block of the grid with exactly the expected region; anything else (a leftover temporary
    file, a record of another computation) is ignored, so that chunk is treated as missing.
    Nothing is held between records: a volume's millions of records stream through.
    """
    folder = progress_folder(output)
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                with open(entry.path, encoding="utf-8") as handle:
                    record = json.load(handle)
                index = tuple(int(i) for i in record["index"])
                expected = regions.get(index)
                region = [tuple(pair) for pair in record["region"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (
                expected is None
                or entry.name != record_name(index)
                or record.get("fingerprint") != run_fingerprint
                or region != [(s.start, s.stop) for s in expected]
            ):
                continue
            yield index, record


def read_records(
    output: str | os.PathLike,
    *,
    run_fingerprint: str,
    regions: Mapping[BlockIndex, tuple[slice, ...]],
) -> dict[BlockIndex, dict[str, Any]]:
    """Valid completion records of ``output``, by block index (see :func:`iter_records`).

    Holds every record: for what needs their contents (a repair's checksums, ``verify``);
    :func:`tally_records` counts them in one byte per chunk.
    """
    return dict(iter_records(output, run_fingerprint=run_fingerprint, regions=regions))


@dataclass
class RecordTally:
    """Which working chunks are recorded as written, one byte per chunk, and the records' sums.

    Stands where the dict of :func:`read_records` stands when only the set of finished chunks
    and the totals are needed (finishing a run, resuming one): its memory is one byte per
    working chunk (1.5 MB for the 1.5 M chunks of 100 TB), not a parsed record each.
    Iterating it gives the recorded block indices in C order.
    """

    done: np.ndarray
    clipped: int = 0
    skipped: int = 0
    skipped_unread: int = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self.done))

    def __contains__(self, index: object) -> bool:
        try:
            return bool(self.done[tuple(index)])  # type: ignore[arg-type]
        except (IndexError, TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[BlockIndex]:
        shape = self.done.shape
        for flat in np.flatnonzero(self.done):
            yield tuple(int(i) for i in np.unravel_index(flat, shape))

    def discard(self, indices: Iterable[BlockIndex]) -> None:
        """Forget the chunks ``indices`` (lost, about to be recomputed)."""
        for index in indices:
            self.done[tuple(index)] = False

    def first_missing(self) -> BlockIndex | None:
        """The first block index (C order) without a record, or None."""
        missing = np.flatnonzero(~self.done)
        if not missing.size:
            return None
        return tuple(int(i) for i in np.unravel_index(missing[0], self.done.shape))


def tally_records(
    output: str | os.PathLike,
    *,
    run_fingerprint: str,
    regions: Any,
) -> RecordTally:
    """The :class:`RecordTally` of ``output``'s valid records over the grid of ``regions`` (a
    :class:`ssi_dask.chunkfiles.GridRegions`), streamed with :func:`iter_records`."""
    tally = RecordTally(done=np.zeros(tuple(len(sizes) for sizes in regions.chunks), dtype=bool))
    for index, record in iter_records(output, run_fingerprint=run_fingerprint, regions=regions):
        tally.done[index] = True
        tally.clipped += int(record.get("clipped", 0))
        if record.get("skipped"):
            tally.skipped += 1
            tally.skipped_unread += record["skipped"] == "pyramid"
    return tally


def remove_records(output: str | os.PathLike, indices: Iterable[BlockIndex]) -> None:
    """Delete the records of ``indices`` (chunks about to be recomputed by a repair)."""
    folder = progress_folder(output)
    for index in indices:
        (folder / record_name(index)).unlink(missing_ok=True)


def missing_blocks(
    regions: dict[BlockIndex, tuple[slice, ...]], records: Iterable[BlockIndex]
) -> list[BlockIndex]:
    """Block indices of ``regions`` without a record, in C order."""
    done = set(records)
    return [index for index in sorted(regions) if index not in done]


def new_run_id() -> str:
    """A short identifier of one run attempt (stored in the records it writes)."""
    return uuid.uuid4().hex[:12]
