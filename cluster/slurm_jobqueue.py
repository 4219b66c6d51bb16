"""Deconvolve on SLURM GPU nodes with dask-jobqueue: one job per node, one dask-cuda worker
per GPU, the scheduler in this process (run it on a login or submit node).

    pip install "ssi-dask[gpu,hpc]"
    python cluster/slurm_jobqueue.py --nodes 2 --gpus-per-node 4 --partition gpu \\
        --account myproject -- /scratch/volume.ome.zarr /scratch/deconvolved.ome.zarr \\
        --psf psf.tif --iterations 20

Everything after ``--`` goes to ``ssi-dask run`` (which gets ``--scheduler ADDRESS --gpu``
added). ``--print-job-script`` prints the batch script a job would get and exits: check it
against your site's rules (partition, account, GPU request) before submitting anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def gpu_slurm_cluster(
    *,
    gpus_per_node: int = 4,
    cpus_per_gpu: int = 8,
    memory_per_gpu: str = "60GB",
    partition: str | None = None,
    account: str | None = None,
    walltime: str = "02:00:00",
    interface: str | None = None,
    local_directory: str = "$TMPDIR",
    prologue: Sequence[str] = (),
    gpu: bool = True,
    **options,
):
    """A ``dask_jobqueue.SLURMCluster`` whose jobs each hold one node's GPUs.

    Each job asks for ``gpus_per_node`` GPUs (``--gres=gpu:N``), ``cpus_per_gpu`` cores per
    GPU and ``memory_per_gpu`` of host memory per GPU, and starts ``dask cuda worker``
    (``python -m dask_cuda.cli``), which runs one single-threaded worker per GPU. With
    ``gpu=False`` it starts plain CPU workers instead (same job layout, no GPU request).

    Returns
    -------
    dask_jobqueue.SLURMCluster
        Not scaled: call ``cluster.scale(jobs=N)`` to submit N node jobs.
    """
    import math

    from dask.utils import parse_bytes
    from dask_jobqueue import SLURMCluster

    per_gpu = parse_bytes(memory_per_gpu)
    directives = [f"--gres=gpu:{gpus_per_node}"] if gpu else []
    return SLURMCluster(
        queue=partition,
        account=account,
        walltime=walltime,
        cores=1,  # threads per worker: one GPU stream each
        processes=1,
        memory=memory_per_gpu,  # --memory-limit of each GPU's worker (host spill cache)
        job_cpu=gpus_per_node * cpus_per_gpu,
        job_mem=f"{math.ceil(per_gpu * gpus_per_node / 2**20)}M",  # SLURM wants whole units
        job_extra_directives=directives,
        worker_command="dask_cuda.cli" if gpu else "distributed.cli.dask_worker",
        interface=interface,
        local_directory=local_directory,
        job_script_prologue=list(prologue),
        job_name="ssi-dask",
        **options,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1, help="node jobs to submit")
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--cpus-per-gpu", type=int, default=8)
    parser.add_argument("--memory-per-gpu", default="60GB")
    parser.add_argument("--partition", help="SLURM partition (#SBATCH -p)")
    parser.add_argument("--account", help="SLURM account (#SBATCH -A)")
    parser.add_argument("--walltime", default="02:00:00")
    parser.add_argument("--interface", help="network interface of the workers, e.g. ib0")
    parser.add_argument(
        "--prologue",
        action="append",
        default=[],
        help="shell line run before the worker, e.g. 'module load cuda' (repeatable)",
    )
    parser.add_argument("--print-job-script", action="store_true")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for a worker")
    parser.add_argument("run_args", nargs="*", help="INPUT OUTPUT [ssi-dask run options]")
    args = parser.parse_args(argv)
    cluster = gpu_slurm_cluster(
        gpus_per_node=args.gpus_per_node,
        cpus_per_gpu=args.cpus_per_gpu,
        memory_per_gpu=args.memory_per_gpu,
        partition=args.partition,
        account=args.account,
        walltime=args.walltime,
        interface=args.interface,
        prologue=args.prologue,
    )
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        if len(args.run_args) < 2:
            parser.error("give INPUT OUTPUT [ssi-dask run options] after --")
        from distributed import Client

        from ssi_dask.cli import main as ssi_dask_main

        cluster.scale(jobs=args.nodes)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=args.wait)
        return ssi_dask_main(
            ["run", *args.run_args, "--scheduler", cluster.scheduler_address, "--gpu"]
        )
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
