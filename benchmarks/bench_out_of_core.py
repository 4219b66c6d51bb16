"""A real out-of-core run (issue 15, item 5): >= 20 GiB uint16 Zarr v3 sharded input, LR.

Generates the input on disk cheaply (one smooth base shard, written shifted by a different
offset for every shard, zstd-compressed), then runs ``ssi_dask.run`` (Zarr to Zarr, the store
graph) with Lucy-Richardson, 1 iteration, on a fresh LocalCluster of 2 single-threaded worker
processes with a 1 GiB memory limit each, output uint16 sharded. The same run on a volume
1/16 the size comes first. Recorded per size: wall time and throughput, the workers' peak RSS
(VmHWM), this (client) process's peak RSS increase, tasks on the scheduler per working chunk;
and the ratio large/small of the peak memory figures. The data are deleted afterwards.

Usage::

    nice -n 19 python benchmarks/bench_out_of_core.py --folder /tmp/ooc --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np

LARGE = (512, 4608, 4608)  # 20.25 GiB uint16
SMALL = (128, 2304, 2304)  # 1/16
SHARD = (32, 256, 256)
INNER = (32, 64, 64)
WORKING = (32, 256, 256)  # one input shard; ~235 MiB per task by the plan


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_input(path: Path, shape: tuple[int, ...]) -> float:
    """A uint16 sharded Zarr v3 array: a smooth base shard plus a per-shard offset."""
    import zarr
    from scipy.ndimage import gaussian_filter

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    base = gaussian_filter(rng.random(SHARD, dtype=np.float32), 2.0)
    base = (base - base.min()) / (base.max() - base.min()) * 3000 + 100
    array = zarr.create_array(
        store=str(path), shape=shape, chunks=INNER, shards=SHARD, dtype="uint16"
    )
    counts = [s // c for s, c in zip(shape, SHARD)]
    for number, index in enumerate(np.ndindex(*counts)):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, SHARD))
        array[region] = (base + 50 * (number % 11)).astype(np.uint16)
    return time.perf_counter() - started


def run_one(folder: Path, shape: tuple[int, ...], label: str) -> dict:
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    import ssi_dask
    from ssi_dask.psf import widefield_psf

    class CountTasks(SchedulerPlugin):
        name = "count-tasks"

        def __init__(self):
            self.keys = set()

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "processing":
                self.keys.add(key)

    source = folder / f"input-{label}.zarr"
    generate_s = make_input(source, shape)
    psf_file = folder / "psf.tif"
    if not psf_file.exists():
        import tifffile

        tifffile.imwrite(
            psf_file, widefield_psf((5, 7, 7), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)
        )
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        memory_limit="1GiB",
        processes=True,
        silence_logs=logging.ERROR,
        dashboard_address=None,
    )
    client = Client(cluster, set_as_default=False)
    plugin = CountTasks()
    client.register_plugin(plugin)
    client_before = _rss()
    job = ssi_dask.Job(
        input=source,
        output=folder / f"out-{label}.zarr",
        psf=ssi_dask.PSFSettings(files=(str(psf_file),)),
        lr=ssi_dask.LRSettings(num_iter=1),
        layout=ssi_dask.LayoutSettings(
            chunks=WORKING, output_chunks=(32, 128, 128), shards=True, output_dtype="uint16"
        ),
        progress=False,
    )
    started = time.perf_counter()
    stop = threading.Event()
    total = math.prod(-(-s // c) for s, c in zip(shape, WORKING))

    def monitor() -> None:  # a line a minute: a run cut short still leaves its figures
        records = folder / f"out-{label}.zarr" / ".ssi_dask_progress"
        while not stop.wait(60):
            try:
                done = sum(1 for p in records.iterdir() if not p.name.startswith("."))
                peaks = client.run(_peak_rss)
            except Exception:
                continue
            elapsed = time.perf_counter() - started
            voxels = math.prod(shape) * done / total
            print(
                json.dumps(
                    {
                        "progress": label,
                        "chunks_done": done,
                        "chunks": total,
                        "elapsed_s": round(elapsed, 1),
                        "mvoxels_per_s": round(voxels / elapsed / 1e6, 3),
                        "worker_peak_mib": round(max(peaks.values()) / 2**20, 1),
                        "client_peak_mib": round(_peak_rss() / 2**20, 1),
                    }
                ),
                flush=True,
            )

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    try:
        report = ssi_dask.run(job, client=client, echo=None)
    finally:
        stop.set()
    seconds = time.perf_counter() - started
    tasks = client.run_on_scheduler(
        lambda dask_scheduler: len(dask_scheduler.plugins["count-tasks"].keys)
    )
    workers = client.run(_peak_rss)
    client_peak = _peak_rss()
    client.close()
    cluster.close()
    voxels = math.prod(shape)
    row = {
        "size": label,
        "shape": list(shape),
        "input_gib": 2 * voxels / 2**30,
        "input_on_disk_gib": sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        / 2**30,
        "generate_s": generate_s,
        "seconds": seconds,
        "mvoxels_per_s": voxels / seconds / 1e6,
        "chunks": report.chunks,
        "tasks": tasks,
        "tasks_per_chunk": tasks / report.chunks,
        "worker_peak_mib": max(workers.values()) / 2**20,
        "client_peak_mib": client_peak / 2**20,  # this process, in-process scheduler included
        "client_rss_before_mib": client_before / 2**20,
        "clipped": report.clipped,
    }
    shutil.rmtree(source)
    shutil.rmtree(folder / f"out-{label}.zarr")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--json")
    parser.add_argument("--scale", type=int, default=1, help="divide both sizes' y, x by this")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for label, shape in (("1/16", SMALL), ("full", LARGE)):
            if args.scale > 1:
                shape = (shape[0], shape[1] // args.scale, shape[2] // args.scale)
            rows.append(run_one(folder, shape, label.replace("/", "_")))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    small, large = rows
    ratios = {
        key: large[key] / small[key] for key in ("worker_peak_mib", "client_peak_mib", "seconds")
    }
    print("ratio large/small:", json.dumps(ratios), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
