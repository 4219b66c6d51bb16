"""Pipeline benchmark: Zarr -> LR on a LocalCluster -> Zarr, against the kernel alone.

Measured in one run on the same data and the same working chunks (with their halos):

* serial: ``richardson_lucy`` on every padded working chunk, one after the other, in this
  process with one FFT thread (no Dask, no I/O);
* pipeline: ``ssi_dask.deconvolve`` + ``ssi_dask.write_zarr`` on a LocalCluster of
  ``--workers`` single-threaded workers, reading and writing Zarr on disk.

Parallel efficiency = serial time / (workers x pipeline wall time), each the best of
``--repeat`` runs (a shared or virtual machine's noise otherwise dominates the ratio). Also
reported: tasks per chunk in the graph, and the workers' resident memory sampled every 0.1 s
during the runs (``distributed.diagnostics.MemorySampler``, process memory summed over the
workers).

Usage: ``python benchmarks/bench_pipeline.py [--shape 64,512,512] [--workers 2] [--repeat 3]
[--json F]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def _same_allocator_as_workers(args) -> None:
    """Run this process (the serial reference) with the allocator settings of the workers.

    glibc reads ``MALLOC_*`` at start-up, so the script re-executes itself once with them;
    otherwise the reference would pay page faults the workers do not (RESULTS.md).
    """
    from ssi_dask.cluster import worker_env

    wanted = {} if args.dask_defaults else worker_env(None)
    if wanted and any(os.environ.get(k) != v for k, v in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,1024,1024")
    parser.add_argument("--chunks", default="64,256,256", help="working chunks")
    parser.add_argument("--store-chunks", default="32,128,128")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--gpu", action="store_true", help="CuPy chunks on a LocalCUDACluster (one worker per GPU)"
    )
    parser.add_argument(
        "--dask-defaults",
        action="store_true",
        help="start the workers with Dask's default settings instead of the ones ssi_dask.cluster "
        "applies to a local cluster (allocator environment, no statistical profiler)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="best of N for both the serial kernel and the pipeline (default 3; the pipeline "
        "reuses one cluster, the first run includes its warm-up)",
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    _same_allocator_as_workers(args)

    import dask
    from distributed import Client, LocalCluster

    from ssi_dask import deconvolve, write_zarr
    from ssi_dask.blockwise import plan_blocks
    from ssi_dask.cluster import _local_cluster
    from ssi_dask.example import make_example
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.psf import load_psf, protocol_psf

    shape = tuple(int(v) for v in args.shape.split(","))
    working = tuple(int(v) for v in args.chunks.split(","))
    store_chunks = tuple(int(v) for v in args.store_chunks.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="ssi-dask-bench-"))
    try:
        paths = make_example(
            workdir / "data", shape=shape, chunks=store_chunks, psf=protocol_psf(3)
        )
        psf = load_psf(paths["psf"], 3)
        plan = plan_blocks(
            shape,
            "uint16",
            psf.shape,
            num_iter=args.iterations,
            store_chunks=store_chunks,
            chunks=working,
        )
        volume = zarr.open_array(str(paths["volume"]), mode="r")

        # serial reference: the kernel on the same padded chunks, one process, one FFT thread
        if args.gpu:
            import cupy

            def kernel(block):
                out = richardson_lucy(cupy.asarray(block), psf, num_iter=args.iterations)
                return cupy.asnumpy(out)
        else:

            def kernel(block):
                return richardson_lucy(block, psf, num_iter=args.iterations, workers=1)

        kernel(np.ones((32, 32, 32), np.float32))  # warm-up
        load_before = os.getloadavg()[0]  # > ~0.5 means other work shares the cores
        blocks = []
        grid = [range(0, s, w) for s, w in zip(shape, plan.working_chunks)]
        for start in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3):
            region = tuple(
                slice(max(int(o) - d, 0), min(int(o) + w + d, s))
                for o, w, d, s in zip(start, plan.working_chunks, plan.depth, shape)
            )
            blocks.append(np.asarray(volume[region], dtype=np.float32))
        serial_runs = []
        for _ in range(args.repeat):
            serial = 0.0
            for block in blocks:
                t0 = time.perf_counter()
                kernel(block)
                serial += time.perf_counter() - t0
            serial_runs.append(serial)
        del blocks
        serial = min(serial_runs)

        if args.dask_defaults:
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            )
        else:  # exactly the local cluster `ssi-dask run` starts
            cluster = _local_cluster(args.workers, 1, None, False)
        client = Client(cluster)
        n_workers = len(client.scheduler_info()["workers"])
        from distributed.diagnostics import MemorySampler

        sampler = MemorySampler()
        lazy = deconvolve(
            str(paths["volume"]),
            psf,
            num_iter=args.iterations,
            chunks=plan.working_chunks,
            depth=plan.depth,
        )
        # tasks Dask runs: the graph after its optimisation (write_zarr maps the chunk write
        # over the result, so the write fuses with the kernel and the trim into one task)
        (optimized,) = dask.optimize(lazy.map_blocks(np.negative, dtype=np.float32))
        n_tasks = len(optimized.__dask_graph__())
        walls = []
        for run in range(args.repeat):  # same cluster, a new output each time
            t0 = time.perf_counter()
            with sampler.sample(f"run{run}", measure="process", interval=0.1):
                write_zarr(
                    lazy,
                    workdir / f"out{run}.zarr",
                    output_chunks=plan.output_chunks,
                    client=client,
                )
            walls.append(time.perf_counter() - t0)
        wall = min(walls)
        cluster_bytes = [value for run in sampler.samples.values() for _, value in run]
        client.close()
        cluster.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    efficiency = serial / (n_workers * wall)
    figures = {
        "shape": shape,
        "working_chunks": plan.working_chunks,
        "halo": plan.depth,
        "n_chunks": plan.n_chunks,
        "iterations": args.iterations,
        "workers": n_workers,
        "device": "gpu" if args.gpu else "cpu",
        "worker_settings": "dask defaults" if args.dask_defaults else "ssi_dask.cluster",
        "load_average_before": round(load_before, 2),
        "repeats": args.repeat,
        "serial_kernel_s": round(serial, 3),
        "serial_kernel_runs_s": [round(v, 3) for v in serial_runs],
        "pipeline_wall_s": round(wall, 3),
        "pipeline_wall_runs_s": [round(v, 3) for v in walls],
        "parallel_efficiency_per_run": [
            round(min(serial_runs) / (n_workers * w), 3) for w in walls
        ],
        "parallel_efficiency": round(efficiency, 3),
        "tasks_per_chunk": round(n_tasks / plan.n_chunks, 1),
        "voxels_per_s": round(math.prod(shape) / wall),
        "cluster_rss_before_mib": round(cluster_bytes[0] / 2**20, 1),
        "cluster_rss_peak_mib": round(max(cluster_bytes) / 2**20, 1),
        "peak_rss_per_worker_mib": round(max(cluster_bytes) / 2**20 / n_workers, 1),
        "estimated_task_memory_mib": round(plan.memory_per_task / 2**20, 1),
    }
    print("| figure | value |\n| --- | --- |")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
