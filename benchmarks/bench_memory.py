"""Bounded memory: LR on a volume several times larger than the workers' total memory.

Runs ``ssi-dask``'s pipeline (``deconvolve`` + ``write_zarr``, Zarr on disk to Zarr on disk)
on a LocalCluster of ``--workers`` single-threaded workers with ``--memory-limit`` each, twice
in one run with the same working chunks:

* small: a volume of ``--small-fraction`` of the large one's lateral size (the reference);
* large: ``--shape``, at least 4x the total memory limit of the workers.

Reported: each worker's peak resident memory (``VmHWM`` of the worker process, read on the
worker after the run, so nothing is missed between samples), the workers' memory right
before the run (imports done), throughput, and the ratios large/small. Peak memory that does
not grow with the volume (ratio ~1) is the goal; throughput should not drop either.

Usage: ``python benchmarks/bench_memory.py [--shape 64,4096,5120] [--workers 2]
[--memory-limit 640MiB] [--iterations 2] [--folder DIR] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (run on a worker).

    ``VmHWM`` of /proc/self/status, not ``ru_maxrss``: the latter survives fork + exec, so a
    spawned worker would report its parent's size at spawn time if that was larger.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss() -> int:
    import psutil  # noqa: PLC0415

    return psutil.Process().memory_info().rss


def _warm_up() -> int:
    """Import what a chunk task imports, so the baseline includes it."""
    import scipy.fft  # noqa: F401, PLC0415
    import zarr  # noqa: F401, PLC0415

    import ssi_dask.lr  # noqa: F401, PLC0415

    return 0


def make_input(path: Path, shape: tuple[int, ...], store_chunks: tuple[int, ...]) -> None:
    """A uint16 volume on disk, written slab by slab (never whole in memory)."""
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    rng = np.random.default_rng(0)
    tile_shape = (shape[0], store_chunks[1] * 2, store_chunks[2] * 2)
    tile = gaussian_filter(rng.random(tile_shape), 2.0)
    tile = (200 + 3000 * (tile - tile.min()) / np.ptp(tile)).astype(np.uint16)
    array = zarr.create_array(
        store=str(path), shape=shape, chunks=store_chunks, dtype="uint16", fill_value=0
    )
    ty, tx = tile_shape[1:]
    for y in range(0, shape[1], ty):
        row = np.tile(tile, (1, 1, math.ceil(shape[2] / tx)))[:, :, : shape[2]]
        array[:, y : y + ty, :] = row[:, : min(ty, shape[1] - y), :]


def run_case(shape, chunks, store_chunks, iterations, workers, memory_limit, folder) -> dict:
    """Deconvolve one volume on a fresh LocalCluster; return memory and throughput figures."""
    from distributed import Client  # noqa: PLC0415

    from ssi_dask import deconvolve, write_zarr  # noqa: PLC0415
    from ssi_dask.blockwise import plan_blocks  # noqa: PLC0415
    from ssi_dask.cluster import _local_cluster  # noqa: PLC0415
    from ssi_dask.psf import protocol_psf  # noqa: PLC0415

    source, output = folder / "input.zarr", folder / "output.zarr"
    started = time.perf_counter()
    make_input(source, shape, store_chunks)
    made = time.perf_counter() - started
    psf = protocol_psf(3)
    plan = plan_blocks(shape, "uint16", psf.shape, num_iter=iterations, chunks=chunks)
    cluster = _local_cluster(workers, 1, memory_limit, False)
    client = Client(cluster)
    try:
        client.run(_warm_up)
        before = client.run(_rss)
        started = time.perf_counter()
        lazy = deconvolve(str(source), psf, num_iter=iterations, chunks=chunks)
        write_zarr(lazy, output, client=client)
        elapsed = time.perf_counter() - started
        peaks = client.run(_peak_rss)
        worker_names = sorted(peaks)
        restarted = len(client.scheduler_info()["workers"]) != workers
    finally:
        client.close()
        cluster.close()
    voxels = math.prod(shape)
    figures = {
        "shape": list(shape),
        "working_chunks": list(chunks),
        "volume_gib": voxels * 4 / 2**30,
        "input_written_s": made,
        "seconds": elapsed,
        "mvoxel_per_s": voxels / elapsed / 1e6,
        "peak_rss_mib": [peaks[w] / 2**20 for w in worker_names],
        "rss_before_mib": [before[w] / 2**20 for w in sorted(before)],
        "plan_memory_per_task_mib": plan.memory_per_task / 2**20,
        "workers_lost": restarted,
    }
    shutil.rmtree(source)
    shutil.rmtree(output)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,4096,5120", help="the large volume")
    parser.add_argument("--chunks", default="64,128,128", help="working chunks")
    parser.add_argument("--store-chunks", default="64,128,128")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="640MiB", help="per worker")
    parser.add_argument(
        "--small-fraction", type=int, default=4, help="the reference is 1/N laterally"
    )
    parser.add_argument("--folder", help="where the volumes go (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)

    from dask.utils import parse_bytes  # noqa: PLC0415

    shape = tuple(int(v) for v in args.shape.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    store_chunks = tuple(int(v) for v in args.store_chunks.split(","))
    small = (shape[0], shape[1] // args.small_fraction, shape[2] // args.small_fraction)
    total_limit = parse_bytes(args.memory_limit) * args.workers
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, case_shape in (("small", small), ("large", shape)):
        case_folder = folder / name
        case_folder.mkdir(exist_ok=True)
        results[name] = run_case(
            case_shape, chunks, store_chunks, args.iterations, args.workers, args.memory_limit,
            case_folder,
        )  # fmt: skip
        figures = results[name]
        print(
            f"{name:5s} {tuple(case_shape)} {figures['volume_gib']:.2f} GiB float32: "
            f"{figures['seconds']:.1f} s, {figures['mvoxel_per_s']:.2f} Mvoxel/s, peak worker "
            f"memory {', '.join(f'{m:.0f}' for m in figures['peak_rss_mib'])} MiB (before "
            f"{', '.join(f'{m:.0f}' for m in figures['rss_before_mib'])} MiB)",
            flush=True,
        )
    large, reference = results["large"], results["small"]
    summary = {
        "workers": args.workers,
        "memory_limit_per_worker": args.memory_limit,
        "iterations": args.iterations,
        "volume_over_total_memory": large["volume_gib"] * 2**30 / total_limit,
        "peak_ratio_large_over_small": max(large["peak_rss_mib"]) / max(reference["peak_rss_mib"]),
        "throughput_ratio_large_over_small": large["mvoxel_per_s"] / reference["mvoxel_per_s"],
        "peak_over_limit": max(large["peak_rss_mib"]) * 2**20 / parse_bytes(args.memory_limit),
        "cases": results,
    }
    print(
        f"volume / total worker memory = {summary['volume_over_total_memory']:.1f}; "
        f"peak memory large/small = {summary['peak_ratio_large_over_small']:.2f}; "
        f"throughput large/small = {summary['throughput_ratio_large_over_small']:.2f}; "
        f"peak / limit = {summary['peak_over_limit']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if not args.folder:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
