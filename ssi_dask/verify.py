"""Check an output against its completion records: which chunks are missing or damaged.

A working chunk counts as written only when its record is valid *and* every output chunk
file (shard file, when sharded) under its region exists in the store: outputs are written
with ``write_empty_chunks`` on, so an all-zero chunk has a file too and a missing file is a
lost one. ``check_data`` also re-reads every such chunk and compares it with the checksum in
its record; a chunk that does not decode is damaged, like one whose checksum differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import progress as records
from .errors import OutputError


@dataclass
class VerifyReport:
    """What ``ssi-dask verify`` found in an output.

    Attributes
    ----------
    path : str
        The output array.
    total : int
        Number of working chunks the output is made of.
    recorded : int
        Chunks with a valid completion record.
    missing : list of str
        Regions (``[z0:z1, y0:y1, x0:x1]``) of the chunks without a record, or whose record
        is there but whose chunk files are gone (then followed by the first missing key).
    damaged : list of str
        Regions whose data no longer match the checksum of their record or do not decode
        (``check_data``), each followed by the reason.
    complete_flag : bool
        The ``ssi_dask.complete`` flag in the output's attributes.
    """

    path: str
    total: int
    recorded: int
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    complete_flag: bool = False
    data_checked: bool = False

    @property
    def ok(self) -> bool:
        """True when every chunk is recorded (and intact, if checked) and the flag is set."""
        return not self.missing and not self.damaged and self.complete_flag

    def summary(self, limit: int = 20) -> str:
        """Multi-line report: counts, then the missing and damaged chunks (up to ``limit``)."""
        state = "complete" if self.ok else "INCOMPLETE"
        lines = [
            f"{self.path}: {state}: {self.recorded} of {self.total} chunks recorded as written, "
            f"{len(self.missing)} missing"
            + (f", {len(self.damaged)} damaged" if self.data_checked else "")
            + f"; completion flag {'set' if self.complete_flag else 'not set'}"
        ]
        for label, regions in (("missing", self.missing), ("damaged", self.damaged)):
            lines.extend(f"  {label} chunk {region}" for region in regions[:limit])
            if len(regions) > limit:
                lines.append(f"  ... and {len(regions) - limit} more {label} chunks")
        if self.damaged:
            lines.append(
                "  re-run the same `ssi-dask run` command with --resume --repair to recompute "
                "the damaged and missing chunks"
            )
        elif not self.ok:
            lines.append("  re-run the same `ssi-dask run` command with --resume to finish it")
        return "\n".join(lines)


def verify_output(output: str | os.PathLike, *, check_data: bool = False) -> VerifyReport:
    """List the chunks of an ssi-dask output that are not recorded as written.

    Parameters
    ----------
    output : str or path-like
        An output array written by :func:`ssi_dask.write_zarr` / ``ssi-dask run``.
    check_data : bool
        Also re-read every recorded chunk and compare it with the checksum in its record.

    Returns
    -------
    VerifyReport

    Raises
    ------
    OutputError
        When ``output`` does not exist or was not written by ssi-dask.
    """
    import zarr  # noqa: PLC0415

    from .chunkfiles import block_regions  # noqa: PLC0415

    path = Path(output).resolve()
    if not path.exists():
        raise OutputError(f"output {str(path)!r} does not exist; check the path")
    try:
        array = zarr.open_array(str(path), mode="r")
        provenance = dict(array.attrs.get("ssi_dask") or {})
    except Exception as exc:
        raise OutputError(
            f"{str(path)!r} is not a readable Zarr array ({type(exc).__name__}); give the path "
            "of an output written by ssi-dask run"
        ) from None
    layout = provenance.get("layout") or {}
    if "fingerprint" not in provenance or "grid" not in layout:
        raise OutputError(
            f"{str(path)!r} has no ssi-dask progress metadata; give the path of an output "
            "written by ssi-dask run"
        )
    grid = tuple(tuple(int(s) for s in sizes) for sizes in layout["grid"])
    regions = dict(block_regions(grid))
    done = records.read_records(path, run_fingerprint=provenance["fingerprint"], regions=regions)
    lost, broken = inspect_chunks(path, array, regions, done, check_data=check_data)
    missing = records.missing_blocks(regions, done)
    texts = {index: records.region_text(regions[index]) for index in regions}
    missing_text = [texts[index] for index in missing]
    missing_text += [
        f"{texts[index]} (recorded, but its file {keys[0]!r} is gone)"
        for index, keys in lost.items()
    ]
    return VerifyReport(
        path=str(path),
        total=len(regions),
        recorded=len(done) - len(lost),
        missing=missing_text,
        damaged=[f"{texts[index]} ({reason})" for index, reason in broken.items()],
        complete_flag=bool(provenance.get("complete")),
        data_checked=check_data,
    )


def inspect_chunks(
    path: str | os.PathLike,
    array: Any,
    regions: dict[tuple[int, ...], tuple[slice, ...]],
    done: dict[tuple[int, ...], dict[str, Any]] | records.RecordTally,
    *,
    check_data: bool,
) -> tuple[dict[tuple[int, ...], list[str]], dict[tuple[int, ...], str]]:
    """Recorded chunks whose files are gone, and (``check_data``) those that are damaged.

    Parameters
    ----------
    path : str or path-like
        The output array's folder (listed once).
    array : zarr.Array
        The output array, open for reading.
    regions : dict
        Region of every working chunk, by block index.
    done : dict or ssi_dask.progress.RecordTally
        The valid completion records, by block index (a dict: needed with ``check_data``), or
        the tally of the recorded chunks.
    check_data : bool
        Re-read every recorded chunk that has its files and compare with its checksum.

    Returns
    -------
    lost : dict
        ``{index: missing keys}`` for recorded chunks with a missing chunk (shard) file.
    damaged : dict
        ``{index: reason}`` for recorded chunks that do not decode or whose checksum differs.
    """
    from .chunkfiles import missing_chunk_files, store_listing  # noqa: PLC0415

    listing = store_listing(path)
    # a RecordTally iterates in C order already, without a list of every index
    ordered = iter(done) if isinstance(done, records.RecordTally) else sorted(done)
    lost = missing_chunk_files(array, ((index, regions[index]) for index in ordered), listing)
    damaged: dict[tuple[int, ...], str] = {}
    if check_data:
        for index in sorted(done):
            if index in lost:
                continue
            try:
                data = np.asarray(array[regions[index]])
            except Exception as exc:
                damaged[index] = f"does not decode: {type(exc).__name__}"
                continue
            if records.data_checksum(data) != done[index].get("checksum"):
                damaged[index] = "checksum differs from its record"
    return lost, damaged
