"""Connect to a Dask scheduler, or start a local cluster (CPU or one worker per GPU)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

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


class QuietLibrariesPlugin(WorkerPlugin):
    """Worker plugin of a local cluster: the workers share the command's stderr, so library
    warnings and log records there are kept off it as in the command itself
    (:func:`ssi_dask.quiet.quiet_libraries`)."""

    name = "ssi-dask-quiet-libraries"

    def setup(self, worker: Any) -> None:
        from .quiet import install_quiet_libraries  # noqa: PLC0415

        install_quiet_libraries()


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


#: Resident memory of an idle local worker process once a task's modules are imported
#: (distributed, zarr, scipy.fft, ssi_dask.lr: 133 MiB measured, 131-138 MiB in
#: benchmarks/RESULTS.md; torch and ssi_dask.ssi add 180 MiB: 313 MiB), with ~20 % margin.
WORKER_BASELINE_BYTES = {"lr": 160 * 2**20, "ssi": 384 * 2**20}
#: Tasks' working memory alive at once per worker thread: the running task plus the input
#: blocks and halo pieces Dask holds for the next ones. Measured peak minus baseline was
#: 2.0x the plan's per-task estimate (bench_memory.py) and 1.6x (bench_pipeline.py).
TASKS_IN_FLIGHT = 2


def _memory_fraction() -> float:
    """Share of the memory limit a local worker can use before it stalls or is killed:
    Dask's pause threshold (80 % by default), else its terminate threshold, else all."""
    import dask  # noqa: PLC0415

    for key in ("pause", "terminate"):
        value = dask.config.get(f"distributed.worker.memory.{key}", default=False)
        if value not in (False, None) and float(value) > 0:
            return float(value)
    return 1.0


def local_memory_limit(memory_limit: str | None, threads_per_worker: int = 1) -> int | None:
    """Bytes of memory each local worker may use, as Dask will read ``--memory-limit``.

    ``None`` or ``"auto"`` is the machine's memory shared by the cores (each worker gets its
    threads' share); a number up to 1 is a fraction of the machine's memory; otherwise a size
    such as ``"4GiB"``. Returns None for no limit (``0``).

    Raises
    ------
    ParameterError
        When the value cannot be read as a size.
    """
    from distributed.worker_memory import parse_memory_limit  # noqa: PLC0415

    text = "auto" if memory_limit is None else str(memory_limit).strip()
    bad = ParameterError(
        f"memory_limit {memory_limit!r} is not a memory size; give e.g. 4GiB or 500MB, a "
        "fraction of the machine's memory such as 0.5, or leave it out"
    )
    try:
        if text.startswith("-"):
            raise bad
        return parse_memory_limit(
            text, max(int(threads_per_worker), 1), logger=logging.getLogger("ssi_dask.quiet")
        )
    except (ValueError, TypeError):
        raise bad from None


def check_worker_memory(
    memory_limit: str | None,
    threads_per_worker: int,
    task_bytes: int,
    *,
    method: str = "lr",
) -> int | None:
    """Refuse, before a local cluster starts, a memory limit too small for the plan's tasks.

    A worker needs its baseline (:data:`WORKER_BASELINE_BYTES`) plus :data:`TASKS_IN_FLIGHT`
    tasks per thread, all below Dask's pause threshold (:func:`_memory_fraction`); above it,
    the worker pauses and the run hangs, or the nanny kills it again and again.

    Parameters
    ----------
    memory_limit : str or None
        The ``--memory-limit`` value (None: Dask's "auto").
    threads_per_worker : int
        Threads (tasks running at once) per worker.
    task_bytes : int
        Working memory of one task (``BlockPlan.memory_per_task`` for LR).
    method : {"lr", "ssi"}
        Which baseline applies (SSI workers import torch).

    Returns
    -------
    int or None
        The worker memory limit in bytes (None: no limit).

    Raises
    ------
    ParameterError
        When the limit cannot be read, or is too small, with the size that would do.
    """
    from dask.utils import format_bytes  # noqa: PLC0415

    limit = local_memory_limit(memory_limit, threads_per_worker)
    if limit is None:
        return None
    threads = max(int(threads_per_worker), 1)
    needed = WORKER_BASELINE_BYTES[method] + TASKS_IN_FLIGHT * threads * int(task_bytes)
    fraction = _memory_fraction()
    if needed <= fraction * limit:
        return limit
    smallest_mib = -(-int(needed / fraction) // 2**20)
    given = (
        f"memory_limit {memory_limit}"
        if memory_limit not in (None, "auto")
        else "the default memory limit (the machine's memory shared by the cores)"
    )
    baseline = WORKER_BASELINE_BYTES[method]
    fix = f"give memory_limit='{smallest_mib}MiB' or more"
    if memory_limit in (None, "auto"):  # the machine's memory is shared by the workers
        fix += " with fewer workers="
    if baseline < fraction * limit:  # room for some tasks: smaller ones may fit
        fix += ", fewer threads_per_worker or" if threads > 1 else ", or"
        fix += " smaller chunks="
    if task_bytes:
        what = (
            f"one task needs ~{format_bytes(task_bytes)} and a worker ~{format_bytes(needed)} "
            f"({format_bytes(baseline)} baseline, {TASKS_IN_FLIGHT * threads} tasks in flight)"
        )
    else:
        what = f"a worker needs ~{format_bytes(baseline)} with its modules imported"
    raise ParameterError(
        f"{given} gives each worker {format_bytes(limit)}, but {what}, more than Dask's pause "
        f"threshold ({fraction:.0%} of the limit, where the run would stall); {fix}"
    )


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
                "gpu=True needs dask-cuda and CuPy with a CUDA device; install "
                "'ssi-dask[gpu]' on a machine with a GPU, or drop gpu=True"
            ) from None
        from ._backend import cupy_or_none  # noqa: PLC0415

        if cupy_or_none() is None:
            raise DeviceError("gpu=True was given but no CUDA device is visible; drop gpu=True")
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
        raise ParameterError("workers= and threads_per_worker must be at least 1")
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
    set_as_default: bool = True,
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
    set_as_default : bool
        Make the client Dask's default scheduler while it is open.

    Raises
    ------
    SchedulerError
        When the scheduler cannot be reached within ``connect_timeout``.
    """
    from distributed import Client  # noqa: PLC0415

    if scheduler and scheduler_file:
        raise ParameterError("give either scheduler= or scheduler_file, not both")
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
                set_as_default=set_as_default,
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
    client = Client(cluster, set_as_default=set_as_default)
    try:
        client.register_plugin(QuietLibrariesPlugin())
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
