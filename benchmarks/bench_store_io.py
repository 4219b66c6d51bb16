"""Store bandwidth per thread and scheduler cost per task (issue 15, item 7: the scale plan).

1. Zarr v3 on the local disk, zstd (Zarr's default codec), shards of 32x256x256 with inner
   chunks of 32x64x64, as a chunk task reads and writes them: write uint16 / float32 shards
   from 1 and 2 threads (each thread its own shards), then read them back (page cache
   dropped where allowed, otherwise noted). Bandwidth in decoded MB/s per thread.
2. The scheduler's cost per task: 2000 no-op tasks submitted in waves as
   :mod:`ssi_dask.storegraph` does (at most 16 in flight) to a LocalCluster of 2 single-threaded
   worker processes; wall time per task.

Usage::

    python benchmarks/bench_store_io.py --folder /tmp/io --json io.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SHARD = (32, 256, 256)
INNER = (32, 64, 64)
SHARDS_PER_THREAD = 24


def _drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def store_bandwidth(folder: Path, dtype: str, threads: int) -> dict:
    import zarr

    path = folder / f"io-{dtype}-{threads}.zarr"
    n = SHARDS_PER_THREAD * threads
    shape = (SHARD[0] * n, SHARD[1], SHARD[2])
    array = zarr.create_array(store=str(path), shape=shape, chunks=INNER, shards=SHARD, dtype=dtype)
    rng = np.random.default_rng(0)
    # smooth, noisy data: compresses about as a microscope's does (neither zeros nor noise)
    base = (rng.poisson(200, SHARD) + np.linspace(0, 3000, SHARD[2])).astype(dtype)
    nbytes = base.nbytes

    def write(i: int) -> None:
        array[i * SHARD[0] : (i + 1) * SHARD[0]] = base + (i % 7)

    def read(i: int) -> None:
        np.asarray(array[i * SHARD[0] : (i + 1) * SHARD[0]])

    result = {"dtype": dtype, "threads": threads, "shard_mb": nbytes / 1e6}
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(write, range(n)))
        seconds = time.perf_counter() - started
        result["write_mb_per_s_per_thread"] = n * nbytes / seconds / 1e6 / threads
        result["cold_read"] = _drop_caches()
        started = time.perf_counter()
        list(pool.map(read, range(n)))
        seconds = time.perf_counter() - started
        result["read_mb_per_s_per_thread"] = n * nbytes / seconds / 1e6 / threads
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    result["compression_ratio"] = n * nbytes / on_disk
    shutil.rmtree(path)
    return result


def _noop(i: int) -> int:
    return i


def scheduler_cost(tasks: int = 2000, in_flight: int = 16) -> dict:
    from distributed import Client, LocalCluster, as_completed

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            silence_logs=logging.ERROR,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.submit(_noop, -1).result()  # warm
        todo = iter(range(tasks))
        started = time.perf_counter()
        waiting = as_completed(
            [client.submit(_noop, i, pure=False) for i in itertools.islice(todo, in_flight)]
        )
        for future in waiting:
            future.release()
            for i in itertools.islice(todo, 1):
                waiting.add(client.submit(_noop, i, pure=False))
        seconds = time.perf_counter() - started
    return {"tasks": tasks, "in_flight": in_flight, "ms_per_task": 1e3 * seconds / tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for dtype, threads in itertools.product(("uint16", "float32"), (1, 2)):
            rows.append(store_bandwidth(folder, dtype, threads))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cost = scheduler_cost()
    print(json.dumps(cost), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"store": rows, "scheduler": cost}, indent=2))


if __name__ == "__main__":
    main()
