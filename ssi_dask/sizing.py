"""Working-chunk size from the worker's memory, and compute time per task vs scheduler cost.

A task should compute long enough that the scheduler's cost per task is small next to it
(DESIGN.md rule 4) and be small enough for the worker that runs it:

* on a GPU worker, one task's working set is a share of the device's memory
  (:func:`gpu_task_bytes`: a sixteenth, between 256 MiB and 4 GiB: ~4 GiB on an 80 GB GPU);
* on a CPU worker with an explicit memory limit, the largest task that
  :func:`ssi_dask.cluster.check_worker_memory` accepts (baseline plus two tasks per thread
  below Dask's pause threshold), capped at :data:`CPU_MAX_TASK_BYTES`, and never smaller than
  the default working chunk (a limit too small for that is refused as before, naming the
  size that would do).

With a connected client (a scheduler given, or ``ssi_dask.run(job, client=...)``) the
workers' own figures from ``client.scheduler_info()`` size the chunks instead
(:func:`client_target_voxels`): the smallest worker's memory limit per thread (or, for a GPU
run, the smallest GPU memory the workers report) bounds a task, below or above the default.

SSI's working chunks are not sized: a task's memory is its block, its Lucy-Richardson prior
and the network's tiles, capped by the tile budget whatever the chunk
(:func:`ssi_dask.ssi.tiling.chunk_task_bytes`, which the memory checks use), and its compute
time is not estimated.

:func:`task_cost_line` gives ``--dry-run``'s estimate of the compute time per task against the
scheduler's overhead per task, with a warning above :data:`OVERHEAD_WARNING`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: Seconds of scheduler (and client) time per task, measured with benchmarks/bench_store_io.py
#: (2000 no-op tasks in waves of 16 on a LocalCluster, loaded 2-core machine): 3.2 ms.
SCHEDULER_SECONDS_PER_TASK = 3.2e-3

#: LR seconds per voxel of the linear working domain per iteration, measured by
#: benchmarks/bench_lr_kernel.py on 80x288x288 (RESULTS.md): 170.3 ms on one CPU core of the
#: 2-core machine, 0.63 ms on an H100 (CuPy).
LR_SECONDS_PER_VOXEL_ITERATION = {
    "cpu": 170.3e-3 / (80 * 288 * 288),
    "gpu": 0.63e-3 / (80 * 288 * 288),
}

#: Warn when the scheduler's overhead exceeds this fraction of a task's compute time.
OVERHEAD_WARNING = 0.05

#: Largest task working set chosen on a CPU worker (larger ones gain nothing in overhead).
CPU_MAX_TASK_BYTES = 2 * 2**30


def gpu_task_bytes(device_bytes: int) -> int:
    """Working memory of one task on a GPU with ``device_bytes``: a sixteenth, 256 MiB-4 GiB."""
    return int(min(4 * 2**30, max(256 * 2**20, device_bytes // 16)))


def cpu_task_bytes(
    limit_bytes: int,
    threads_per_worker: int,
    method: str = "lr",
    cap: int | None = CPU_MAX_TASK_BYTES,
) -> int:
    """The largest task working set a worker with ``limit_bytes`` holds without pausing.

    At most ``cap`` (the size chosen on a CPU worker); ``cap=None`` gives the largest task
    that :func:`ssi_dask.cluster.check_worker_memory` accepts.
    """
    from .cluster import TASKS_IN_FLIGHT, WORKER_BASELINE_BYTES, _memory_fraction  # noqa: PLC0415

    usable = limit_bytes * _memory_fraction() - WORKER_BASELINE_BYTES[method]
    per_task = usable / (TASKS_IN_FLIGHT * max(int(threads_per_worker), 1))
    return int(max(0, per_task if cap is None else min(cap, per_task)))


def voxels_for_bytes(task_bytes: int, psf_shape: Sequence[int], ndim: int) -> int:
    """Working-chunk voxels whose LR task needs about ``task_bytes`` (the plan's estimate)."""
    from .blockwise import estimate_lr_task_memory  # noqa: PLC0415

    low, high = 1, 2**20
    while low < high:  # the estimate grows with the side of a cube: bisect the side
        side = (low + high + 1) // 2
        if estimate_lr_task_memory((side,) * ndim, (0,) * ndim, psf_shape) <= task_bytes:
            low = side
        else:
            high = side - 1
    return int(low**ndim)


def local_gpu_bytes() -> int | None:
    """Total memory of this machine's first CUDA device (CuPy), or None without one."""
    try:
        import cupy  # noqa: PLC0415

        return int(cupy.cuda.runtime.memGetInfo()[1])
    except Exception:
        return None


def target_voxels(
    cluster: Any, method: str, psf_shape: Sequence[int], ndim: int
) -> tuple[int | None, str]:
    """Working-chunk voxels for a local run with ``cluster`` (ClusterSettings), and why.

    Returns ``(None, reason)`` where the default applies: a remote scheduler (the run sizes
    from its workers with :func:`client_target_voxels` instead), no explicit CPU memory limit,
    or a GPU run without a visible device.
    """
    from .cluster import local_memory_limit  # noqa: PLC0415
    from .config import DEFAULT_TARGET_VOXELS  # noqa: PLC0415

    default = DEFAULT_TARGET_VOXELS.get(ndim, 2**22)
    if cluster.remote:
        return None, "default (remote workers)"
    if cluster.gpu:
        device = local_gpu_bytes()
        if device is None:
            return None, "default (no CUDA device visible here)"
        task = gpu_task_bytes(device)
        voxels = max(default, voxels_for_bytes(task, psf_shape, ndim))
        return voxels, f"from the GPU's {device / 2**30:.0f} GiB (~{task / 2**30:.1f} GiB a task)"
    if cluster.memory_limit is None:
        return None, "default"
    limit = local_memory_limit(cluster.memory_limit, cluster.threads_per_worker)
    if limit is None:
        return None, "default (no memory limit)"
    task = cpu_task_bytes(limit, cluster.threads_per_worker, method)
    voxels = voxels_for_bytes(task, psf_shape, ndim)
    if voxels <= default:
        return None, "default (the memory limit fits no larger task)"
    return voxels, f"from the memory limit {limit / 2**30:.2f} GiB (~{task / 2**20:.0f} MiB a task)"


def _worker_gpu_bytes(worker: dict) -> int | None:
    """GPU memory a worker reports (distributed's NVML startup information), or None."""
    value = (worker.get("gpu") or {}).get("memory-total")
    if not value:
        value = (worker.get("metrics") or {}).get("gpu-memory-total")
    return int(value) if value else None


def client_target_voxels(
    info: dict, method: str, psf_shape: Sequence[int], ndim: int, *, gpu: bool = False
) -> tuple[int | None, str, int | None]:
    """Working-chunk voxels for the workers in ``info`` (``client.scheduler_info()``), and why.

    The smallest budget per thread among the workers bounds a task: on CPU, the worker's
    memory limit less its baseline, shared by :data:`~ssi_dask.cluster.TASKS_IN_FLIGHT` tasks
    per thread below the pause threshold (:func:`cpu_task_bytes`; the threshold is read from
    this process's Dask configuration); for a GPU run, :func:`gpu_task_bytes` of the smallest
    GPU memory the workers report. Unlike a local cluster's explicit limit, the result may be
    below the default working chunk (nothing refuses a remote worker's limit beforehand).

    Returns
    -------
    (voxels or None, reason, budget or None)
        ``voxels`` is None where the default applies: no workers, no memory limits, or GPU
        memory not reported. ``budget`` (CPU only) is the largest task the smallest worker
        holds, uncapped, as :func:`ssi_dask.cluster.check_worker_memory` counts it: the plan
        halves its chunks until a task fits it, and warns when even one store chunk does not.
    """
    workers = list((info or {}).get("workers", {}).values())
    count = len(workers)
    noun = f"{count} worker" + ("s" if count != 1 else "")
    if not workers:
        return None, "default (the scheduler has no workers yet)", None
    if gpu:
        devices = [_worker_gpu_bytes(w) for w in workers]
        if any(d is None for d in devices):
            missing = sum(d is None for d in devices)
            return (
                None,
                f"default (GPU memory not known: {missing} of {noun} report none)",
                None,
            )
        task = min(
            gpu_task_bytes(d) // max(int(w.get("nthreads", 1)), 1) for d, w in zip(devices, workers)
        )
        device = min(d for d in devices if d is not None)
        voxels = voxels_for_bytes(task, psf_shape, ndim)
        return (
            voxels,
            f"from the workers' GPU memory {device / 2**30:.1f} GiB ({noun}, "
            f"~{task / 2**30:.2f} GiB a task)",
            None,  # as for a local GPU: the device's share sets the size, nothing refuses it
        )
    limited = [
        (int(w["memory_limit"]), max(int(w.get("nthreads", 1)), 1))
        for w in workers
        if w.get("memory_limit")
    ]
    if not limited:
        return None, f"default (no memory limit on the {noun})", None
    limit, threads = min(limited, key=lambda lt: cpu_task_bytes(lt[0], lt[1], method))
    task = cpu_task_bytes(limit, threads, method)
    if task <= 0:
        return (
            None,
            f"default (the workers' memory limit {limit / 2**30:.2f} GiB leaves no room for a "
            "task beyond a worker's baseline)",
            None,
        )
    voxels = voxels_for_bytes(task, psf_shape, ndim)
    return (
        voxels,
        f"from the workers' memory limit {limit / 2**30:.2f} GiB ({noun}, {threads} thread"
        + ("s" if threads != 1 else "")
        + f" each, ~{task / 2**20:.0f} MiB a task)",
        cpu_task_bytes(limit, threads, method, cap=None),
    )


def task_cost_line(plan: Any, method: str, num_iter: int, device: str, psf_shape: Sequence[int]):
    """``--dry-run``'s line: estimated compute per task vs scheduler overhead; and a warning.

    Returns ``(line, warning or None)``. SSI's time per task is not estimated (it depends on
    the network); LR's is the kernel's measured time per voxel and iteration times the task's
    linear working domain. No warning when one chunk already holds the whole image.
    """
    overhead = SCHEDULER_SECONDS_PER_TASK
    if method != "lr":
        return (
            f"  per task        scheduler overhead ~{overhead * 1e3:.1f} ms (SSI compute time "
            "not estimated)",
            None,
        )
    padded = [c + 2 * d for c, d in zip(plan.working_chunks, plan.depth)]
    domain = math.prod(p + s - 1 for p, s in zip(padded, psf_shape))
    compute = LR_SECONDS_PER_VOXEL_ITERATION[device] * domain * max(int(num_iter), 1)
    share = overhead / compute
    line = (
        f"  per task        compute ~{compute:.3g} s ({device}, {num_iter} iterations), "
        f"scheduler overhead ~{overhead * 1e3:.1f} ms ({100 * share:.2g} %)"
    )
    warning = None
    if share > OVERHEAD_WARNING and plan.n_chunks > 1:  # one chunk: none larger to choose
        warning = (
            f"warning: the scheduler's overhead per task is {100 * share:.0f} % of its compute "
            "time; use larger chunks= so that the cluster computes rather than schedules"
        )
    return line, warning
