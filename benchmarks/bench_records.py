"""Finishing and resuming a run of many chunks: memory of the completion records (issue 15).

A run ends (and a resume starts) by reading every chunk's completion record. Holding them as
parsed dicts (:func:`ssi_dask.progress.read_records`) costs memory per chunk; the tally
(:func:`ssi_dask.progress.tally_records`, what ``write_zarr`` uses since 2026-12-05) keeps
one byte per chunk and the sums. This script writes realistic records (what
:func:`ssi_dask.store.write_chunk` writes: index, region, fingerprint, checksum, run id, input
signature) for two grid sizes, then measures both ways in one run: time and peak Python memory
(tracemalloc) of reading them all, and the ratio large/small.

Usage::

    nice -n 19 python benchmarks/bench_records.py --sizes 10000,80000 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
import tracemalloc
from pathlib import Path


def write_records(output: Path, grid: tuple[int, ...]) -> None:
    from ssi_dask import progress

    chunk = (64, 256, 256)
    for index in itertools.product(*(range(n) for n in grid)):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk))
        progress.write_record(
            output,
            index,
            region,
            run_fingerprint="f" * 64,
            checksum="0123456789abcdef" * 2,
            run_id="a1b2c3d4e5f6",
            input_signature={"quick": "9" * 32, "content": "files:" + "8" * 32},
        )


def measure(output: Path, grid: tuple[int, ...], how: str) -> dict:
    from ssi_dask import progress
    from ssi_dask.chunkfiles import GridRegions

    regions = GridRegions(tuple((c,) * n for c, n in zip((64, 256, 256), grid)))
    read = progress.read_records if how == "dict" else progress.tally_records
    tracemalloc.start()
    started = time.perf_counter()
    result = read(output, run_fingerprint="f" * 64, regions=regions)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(result) == math.prod(grid), (len(result), grid)
    return {"how": how, "records": len(result), "seconds": round(seconds, 2), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,80000", help="records, small and large")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in (int(v) for v in args.sizes.split(",")):
            side = round((n / 10) ** 0.5)
            grid = (10, side, side)
            output = Path(folder) / f"out{n}"
            output.mkdir()
            started = time.perf_counter()
            write_records(output, grid)
            print(f"wrote {math.prod(grid)} records in {time.perf_counter() - started:.1f} s")
            for how in ("dict", "tally"):
                rows.append({"grid": list(grid), **measure(output, grid, how)})
                print(json.dumps(rows[-1]), flush=True)
    small, large = rows[:2], rows[2:]
    ratios = {
        row_l["how"]: {
            "records": round(row_l["records"] / row_s["records"], 2),
            "peak_bytes": round(row_l["peak_bytes"] / row_s["peak_bytes"], 2),
            "seconds": round(row_l["seconds"] / max(row_s["seconds"], 1e-9), 2),
        }
        for row_s, row_l in zip(small, large)
    }
    result = {"rows": rows, "ratio_large_to_small": ratios}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
