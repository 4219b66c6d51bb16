"""Working chunks sized from the cluster actually used (issue 15, item 3), on this machine.

A metadata-only uint16 Zarr v3 input of 2048x16384x16384 (1.1 TB, store chunks 64x256x256)
is planned with ``ssi_dask.run(job, dry_run=True)`` for LR-10 with a 17^3 widefield PSF:

* with a real LocalCluster (2 single-threaded workers on 127.0.0.1, memory limit 1, 4 and
  16 GiB) passed as ``client=``: the chunks come from the workers' memory limit;
* with no client and ``memory_limit="16GiB"`` (the local rule, no cluster started);
* with no client and no limit (the default).

Printed per case: the dry run's "chunk size" line, the working chunks, chunks and tasks,
the plan's memory per task and the "per task" line. Nothing is computed or written.

Usage::

    python benchmarks/bench_sizing.py [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import zarr
from distributed import Client, LocalCluster

import ssi_dask
from ssi_dask.psf import widefield_psf


def _case(job, name, client=None):
    lines: list[str] = []
    report = ssi_dask.run(job, client=client, echo=lines.append)
    plan = report.plan
    pick = [
        x.strip()
        for x in lines
        if x.strip().startswith(("chunk size", "per task", "warning: one task"))
    ]
    row = {
        "case": name,
        "working_chunks": list(plan.working_chunks),
        "chunks": plan.n_chunks,
        "memory_per_task_mib": round(plan.memory_per_task / 2**20, 1),
        "lines": pick,
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "in.zarr"
        zarr.create_array(
            store=str(source), shape=(2048, 16384, 16384), chunks=(64, 256, 256), dtype="u2"
        )
        psf = widefield_psf((17, 17, 17), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)
        tifffile.imwrite(tmp / "psf.tif", psf.astype(np.float32))
        job = ssi_dask.Job(
            input=source,
            output=tmp / "out.zarr",
            psf=ssi_dask.PSFSettings(files=(str(tmp / "psf.tif"),)),
            lr=ssi_dask.LRSettings(num_iter=10),
            dry_run=True,
            progress=False,
        )
        for limit in ("1GiB", "4GiB", "16GiB"):
            with (
                LocalCluster(
                    n_workers=2,
                    threads_per_worker=1,
                    memory_limit=limit,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.ERROR,
                ) as cluster,
                Client(cluster, set_as_default=False) as client,
            ):
                rows.append(_case(job, f"client, 2 workers x {limit}", client))
        local = dataclasses.replace(job, cluster=ssi_dask.ClusterSettings(memory_limit="16GiB"))
        rows.append(_case(local, "no client, --memory-limit 16GiB"))
        rows.append(_case(job, "no client, no limit"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
