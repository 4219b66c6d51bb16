"""Check an output against its completion records: which chunks are missing or damaged."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

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
        Regions (``[z0:z1, y0:y1, x0:x1]``) of the chunks without a record.
    damaged : list of str
        Regions whose data no longer match the checksum of their record (``check_data``).
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
        if not self.ok:
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

    from .store import block_regions  # noqa: PLC0415

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
    missing = records.missing_blocks(regions, done)
    damaged = []
    if check_data:
        for index in sorted(done):
            data = np.asarray(array[regions[index]])
            if records.data_checksum(data) != done[index].get("checksum"):
                damaged.append(records.region_text(regions[index]))
    return VerifyReport(
        path=str(path),
        total=len(regions),
        recorded=len(done),
        missing=[records.region_text(regions[index]) for index in missing],
        damaged=damaged,
        complete_flag=bool(provenance.get("complete")),
        data_checked=check_data,
    )
