"""One multi-GPU node: start a dask-cuda ``LocalCUDACluster`` (one worker per GPU), publish
it in a scheduler file, and keep it up for any number of ``ssi-dask run --scheduler-file``.

    pip install "ssi-dask[gpu]"
    python cluster/local_cuda.py --scheduler-file ~/ssi-dask.json --devices 0,1,2,3 &
    ssi-dask run volume.ome.zarr deconvolved.ome.zarr --psf psf.tif \\
        --scheduler-file ~/ssi-dask.json --gpu

For a single run, ``ssi-dask run ... --gpu`` starts the same cluster itself. ``--cpu``
starts a CPU ``LocalCluster`` with the same scheduler file instead (for machines without a
GPU, and the recipe's own test). Stop it with Ctrl-C or SIGTERM; the file is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence


def start_cluster(
    *,
    cpu: bool = False,
    devices: str | None = None,
    workers: int | None = None,
    memory_limit: str = "auto",
    rmm_pool_size: str | None = None,
):
    """A ``LocalCUDACluster`` on the visible (or given) GPUs, or a CPU ``LocalCluster``."""
    if cpu:
        import logging

        from distributed import LocalCluster

        return LocalCluster(
            n_workers=workers or 1,
            threads_per_worker=1,
            memory_limit=memory_limit,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        sys.exit(
            "local_cuda.py: dask-cuda is not installed (pip install 'ssi-dask[gpu]'), or use --cpu"
        )
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices,
        n_workers=workers,
        threads_per_worker=1,
        memory_limit=memory_limit,
        rmm_pool_size=rmm_pool_size,
        host="127.0.0.1",  # a local cluster: reachable from this machine only
        dashboard_address="127.0.0.1:8787",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler-file", required=True, help="JSON file to write")
    parser.add_argument("--devices", help="GPUs to use, e.g. 0,1 (default: all visible)")
    parser.add_argument("--workers", type=int, help="workers (default: one per GPU)")
    parser.add_argument("--memory-limit", default="auto", help="host memory per worker")
    parser.add_argument("--rmm-pool-size", help="RMM pool per GPU, e.g. 20GB (optional)")
    parser.add_argument("--cpu", action="store_true", help="CPU LocalCluster instead")
    args = parser.parse_args(argv)
    cluster = start_cluster(
        cpu=args.cpu,
        devices=args.devices,
        workers=args.workers,
        memory_limit=args.memory_limit,
        rmm_pool_size=args.rmm_pool_size,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        info = {"address": cluster.scheduler_address, "type": "Scheduler"}
        temporary = f"{args.scheduler_file}.tmp"
        with open(temporary, "w") as handle:  # written whole, then renamed: never half-read
            json.dump(info, handle)
        os.replace(temporary, args.scheduler_file)
        print(
            f"{len(cluster.workers)} workers at {cluster.scheduler_address}; run\n"
            f"  ssi-dask run INPUT OUTPUT --psf PSF --scheduler-file {args.scheduler_file}"
            + ("" if args.cpu else " --gpu"),
            flush=True,
        )
        stop.wait()
    finally:
        if os.path.exists(args.scheduler_file):
            os.remove(args.scheduler_file)
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
