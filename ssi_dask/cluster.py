"""Connect to a Dask scheduler, or start a local cluster (CPU or one worker per GPU)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DeviceError, ParameterError, SchedulerError

#: Environment for worker processes. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536``, which
#: also switches off glibc's adaptive mmap threshold: every FFT buffer of a chunk (tens of MB)
#: is then a fresh mmap and page-faults on first touch (~15k faults per LR iteration).
#: Serving such buffers from the heap and trimming only above 256 MiB keeps them warm while
#: memory still returns to the OS between chunks (benchmarks/RESULTS.md has the figures).
WORKER_ALLOCATOR_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

#: Dask configuration for the workers of a local CPU cluster. Besides the allocator settings,
#: the workers' statistical profiler (a stack sample every 10 ms) is switched off: measured on
#: a single-threaded LR worker it costs ~4 % of the worker's CPU time, which on a small machine
#: is taken straight from the kernels (benchmarks/RESULTS.md). The dashboard's "Profile" page is
#: empty as a consequence; everything else on the dashboard works.
LOCAL_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": WORKER_ALLOCATOR_ENV,
    "distributed.worker.profile.enabled": False,
}


#: Where the servers of a local cluster listen: scheduler, nannies, workers and the dashboard
#: on the loopback interface only (nothing of a local run is reachable from the network).
LOCAL_HOST = "127.0.0.1"
#: The scheduler's dashboard: loopback, on a free port (a bare ":0" would bind 0.0.0.0).
LOCAL_DASHBOARD_ADDRESS = f"{LOCAL_HOST}:0"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the old ones."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_env(memory_limit: str | None) -> dict[str, str]:
    """:data:`WORKER_ALLOCATOR_ENV`, with the heap kept below an eighth of a small memory limit.

    Freed heap below the trim threshold stays in the process's resident memory; with a limit of
    a few hundred MiB, 256 MiB of it would hold the worker above Dask's pause threshold (80 %
    of the limit) for good, and the run would stall (measured by benchmarks/bench_memory.py).
    """
    env = dict(WORKER_ALLOCATOR_ENV)
    if memory_limit and memory_limit != "auto":
        from dask.utils import parse_bytes  # noqa: PLC0415

        try:
            limit = parse_bytes(memory_limit)
        except (ValueError, TypeError):
            return env
        if limit < 64 * 2**20:  # a fraction of the machine's memory, not a size
            return env
        threshold = str(min(256 * 2**20, max(limit // 8, 2**20)))
        env.update(MALLOC_TRIM_THRESHOLD_=threshold, MALLOC_MMAP_THRESHOLD_=threshold)
    return env


def _local_cluster(
    n_workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | None,
    gpu: bool,
) -> Any:
    if gpu:
        try:
            from dask_cuda import LocalCUDACluster  # noqa: PLC0415
        except ImportError:
            raise DeviceError(
                "--gpu needs dask-cuda and CuPy with a CUDA device; install "
                "'ssi-dask[gpu]' on a machine with a GPU, or drop --gpu"
            ) from None
        from ._backend import cupy_or_none  # noqa: PLC0415

        if cupy_or_none() is None:
            raise DeviceError("--gpu was given but no CUDA device is visible; drop --gpu")
        return LocalCUDACluster(
            threads_per_worker=threads_per_worker or 1,
            memory_limit=memory_limit or "auto",
            host=LOCAL_HOST,
            dashboard_address=LOCAL_DASHBOARD_ADDRESS,
        )
    import dask  # noqa: PLC0415
    from distributed import LocalCluster  # noqa: PLC0415

    cores = os.cpu_count() or 1
    threads = threads_per_worker or 1
    workers = n_workers or max(cores // threads, 1)
    if workers < 1 or threads < 1:
        raise ParameterError("--workers and --threads-per-worker must be at least 1")
    config = {
        **LOCAL_WORKER_CONFIG,
        "distributed.nanny.pre-spawn-environ": worker_env(memory_limit),
    }
    # Dask lets variables already in os.environ override pre-spawn-environ, and every nanny
    # started in this process leaves its own (e.g. MALLOC_TRIM_THRESHOLD_=65536) there: set
    # ours for the time the workers are spawned, then restore the process's environment.
    with dask.config.set(config), _environ(config["distributed.nanny.pre-spawn-environ"]):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            memory_limit=memory_limit or "auto",
            processes=True,
            host=LOCAL_HOST,
            dashboard_address=LOCAL_DASHBOARD_ADDRESS,
            silence_logs=logging.CRITICAL,  # task errors are reported by the command itself
        )


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    *,
    scheduler_file: str | os.PathLike | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    gpu: bool = False,
    connect_timeout: float = 5.0,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: connected to a scheduler, or on a new local cluster.

    Parameters
    ----------
    scheduler : str, optional
        Scheduler address such as ``tcp://10.0.0.1:8786``.
    scheduler_file : path-like, optional
        JSON file written by ``dask scheduler --scheduler-file``.
    n_workers, threads_per_worker, memory_limit
        Size of the local cluster started when no scheduler is given.
    gpu : bool
        Start a ``LocalCUDACluster`` (one worker per GPU) instead of a CPU cluster.
    connect_timeout : float
        Seconds to wait for a remote scheduler before failing.

    Raises
    ------
    SchedulerError
        When the scheduler cannot be reached within ``connect_timeout``.
    """
    from distributed import Client  # noqa: PLC0415

    if scheduler and scheduler_file:
        raise ParameterError("give either --scheduler or --scheduler-file, not both")
    if scheduler or scheduler_file:
        if scheduler_file is not None and not Path(scheduler_file).exists():
            raise SchedulerError(
                f"scheduler file {str(scheduler_file)!r} does not exist; start the scheduler with "
                "`dask scheduler --scheduler-file FILE` first"
            )
        where = scheduler or f"the address in {str(scheduler_file)!r}"
        try:
            client = Client(
                address=scheduler,
                scheduler_file=str(scheduler_file) if scheduler_file else None,
                timeout=f"{connect_timeout}s",
                set_as_default=True,
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise SchedulerError(
                f"cannot reach the Dask scheduler at {where} within {connect_timeout:g} s "
                f"({type(exc).__name__}); check the address and that `dask scheduler` is running"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    cluster = _local_cluster(n_workers, threads_per_worker, memory_limit, gpu)
    client = Client(cluster, set_as_default=True)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def dashboard_link(client: Any) -> str | None:
    """The dashboard URL of the client's scheduler, or None when it has none."""
    try:
        return client.dashboard_link
    except Exception:
        return None
