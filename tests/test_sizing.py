"""Working chunks sized from the worker's memory limit, and the dry run's cost per task."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import zarr
from dask.utils import format_bytes

import ssi_dask
from ssi_dask.cluster import check_worker_memory
from ssi_dask.config import DEFAULT_TARGET_VOXELS
from ssi_dask.sizing import (
    client_target_voxels,
    cpu_task_bytes,
    gpu_task_bytes,
    voxels_for_bytes,
)


def _job(tmp_path, psf3d_file, source, **cluster):
    return ssi_dask.Job(
        input=source,
        output=tmp_path / "out.zarr",
        psf=ssi_dask.PSFSettings(files=(str(psf3d_file),)),
        lr=ssi_dask.LRSettings(num_iter=1),
        cluster=ssi_dask.ClusterSettings(workers=1, **cluster),
        progress=False,
    )


def test_gpu_task_share():
    assert gpu_task_bytes(80 * 10**9) == 4 * 2**30  # ~1-4 GiB per task on an 80 GB GPU
    assert 2**30 <= gpu_task_bytes(24 * 10**9) <= 4 * 2**30
    assert gpu_task_bytes(2 * 10**9) == 256 * 2**20


def test_cpu_chunks_grow_with_the_memory_limit_and_fit_it(tmp_path, psf3d_file):
    source = tmp_path / "big.zarr"  # metadata only: a dry run reads no chunk
    zarr.create_array(store=str(source), shape=(64, 4096, 4096), chunks=(64, 64, 64), dtype="u2")
    plans = {}
    for limit in ("1100MiB", "2GiB", "4GiB"):
        lines: list[str] = []
        job = _job(tmp_path, psf3d_file, source, memory_limit=limit, threads_per_worker=1)
        report = ssi_dask.run(dataclasses.replace(job, dry_run=True), echo=lines.append)
        plans[limit] = report.plan
        text = "\n".join(lines)
        assert "  per task        compute ~" in text
        # the chosen task fits the limit by the same rule that refuses a too-small one
        check_worker_memory(limit, 1, report.plan.memory_per_task)
        if limit == "1100MiB":
            assert "chunk size      default" in text
        else:
            assert "chunk size      from the memory limit" in text
    voxels = {k: int(np.prod(p.working_chunks)) for k, p in plans.items()}
    assert voxels["1100MiB"] == DEFAULT_TARGET_VOXELS[3]
    assert voxels["1100MiB"] < voxels["2GiB"] < voxels["4GiB"]
    assert plans["4GiB"].memory_per_task <= cpu_task_bytes(4 * 2**30, 1)


def test_dry_run_warns_when_the_scheduler_overhead_dominates(tmp_path, psf3d_file):
    source = tmp_path / "in.zarr"
    zarr.create_array(store=str(source), shape=(64, 1024, 1024), chunks=(16, 32, 32), dtype="u2")
    job = _job(tmp_path, psf3d_file, source)
    job = dataclasses.replace(job, dry_run=True, lr=ssi_dask.LRSettings(num_iter=2))
    for chunks, warned in (((32, 32, 32), True), ((64, 512, 512), False)):
        lines: list[str] = []
        layout = ssi_dask.LayoutSettings(chunks=chunks)
        ssi_dask.run(dataclasses.replace(job, layout=layout), echo=lines.append)
        text = "\n".join(lines)
        assert ("warning: the scheduler's overhead per task is" in text) is warned, text


@pytest.mark.slow
def test_sized_run_on_a_local_cluster_with_a_memory_limit(tmp_path, psf3d_file, psf3d):
    from conftest import smooth_volume

    from ssi_dask import deconvolve

    volume = smooth_volume((32, 256, 512), seed=3)
    source = tmp_path / "in.zarr"
    zarr.create_array(store=str(source), shape=volume.shape, chunks=(32, 64, 64), dtype="f4")[
        ...
    ] = volume
    job = _job(tmp_path, psf3d_file, source, memory_limit="2GiB", threads_per_worker=1)
    report = ssi_dask.run(job, echo=None)
    assert report.chunks == 1  # the default would cut it in 2: 32x256x256 voxels each
    whole = deconvolve(volume, psf3d, num_iter=1, chunks=volume.shape).compute()
    np.testing.assert_allclose(
        zarr.open_array(str(tmp_path / "out.zarr"))[...], whole, rtol=1e-5, atol=1e-6
    )


def _cluster(memory_limit: str):
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        memory_limit=memory_limit,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )


def test_chunks_sized_from_the_connected_workers(tmp_path, psf3d_file):
    """A given client's workers size the chunks, and the CLI's --scheduler does the same."""
    from conftest import run_cli
    from distributed import Client

    source = tmp_path / "big.zarr"  # metadata only: a dry run reads no chunk
    zarr.create_array(store=str(source), shape=(64, 2048, 2048), chunks=(64, 64, 64), dtype="u2")
    job = dataclasses.replace(_job(tmp_path, psf3d_file, source), dry_run=True)
    plans, texts = {}, {}
    for limit in ("1GiB", "4GiB"):
        with _cluster(limit) as cluster, Client(cluster, set_as_default=False) as client:
            lines: list[str] = []
            plans[limit] = ssi_dask.run(job, client=client, echo=lines.append).plan
            texts[limit] = "\n".join(lines)
            if limit == "1GiB":  # a store chunk larger than the workers hold: cut to fit
                coarse = tmp_path / "coarse.zarr"
                zarr.create_array(
                    store=str(coarse), shape=(64, 2048, 2048), chunks=(64, 512, 512), dtype="u2"
                )
                cut = ssi_dask.run(dataclasses.replace(job, input=coarse), client=client, echo=None)
                # chunks given that large: kept, and warned
                lines = []
                warned = ssi_dask.run(
                    dataclasses.replace(
                        job, input=coarse, layout=ssi_dask.LayoutSettings(chunks=(64, 512, 512))
                    ),
                    client=client,
                    echo=lines.append,
                )
                coarse_text = "\n".join(lines)
            if limit == "4GiB":  # the command connects first, and sizes from the same workers
                given = ssi_dask.run(
                    dataclasses.replace(job, layout=ssi_dask.LayoutSettings(chunks=(64, 64, 64))),
                    client=client,
                    echo=lines.append,
                )
                cli = run_cli(
                    "run", source, tmp_path / "cli.zarr", "--psf", psf3d_file, "--iterations",
                    1, "--scheduler", cluster.scheduler_address, "--dry-run",
                )  # fmt: skip
    for limit, gib in (("1GiB", "1.00"), ("4GiB", "4.00")):
        line = f"  chunk size      from the workers' memory limit {gib} GiB (2 workers, 1 thread"
        assert line in texts[limit], texts[limit]
        # what the plan holds per task fits the budget the line names
        assert plans[limit].memory_per_task <= cpu_task_bytes(int(float(gib) * 2**30), 1)
    voxels = {k: int(np.prod(p.working_chunks)) for k, p in plans.items()}
    assert voxels["1GiB"] < voxels["4GiB"]
    assert plans["1GiB"].n_chunks > plans["4GiB"].n_chunks
    budget = cpu_task_bytes(2**30, 1, cap=None)
    assert cut.plan.memory_per_task <= budget and cut.plan.input_reads > 1
    assert not any(w.startswith("warning: one task needs") for w in cut.warnings)
    assert warned.plan.working_chunks == (64, 512, 512)
    assert warned.plan.memory_per_task > budget
    assert (
        f"warning: one task needs ~{format_bytes(warned.plan.memory_per_task)}, more than the "
        f"workers' memory limit holds ({format_bytes(budget)} a task)"
    ) in coarse_text
    assert any(w.startswith("warning: one task needs") for w in warned.warnings)
    # explicit chunks= wins over the workers' figures
    assert given.plan.working_chunks == (64, 64, 64)
    assert cli.returncode == 0, cli.stderr
    assert "chunk size      from the workers' memory limit 4.00 GiB (2 workers" in cli.stdout
    assert f"working chunks  {plans['4GiB'].working_chunks}" in cli.stdout


def test_client_sizing_for_gpu_workers_reads_their_reported_memory():
    """dask-cuda workers report their GPU's memory in the scheduler's worker information."""
    psf = (17, 17, 17)
    gpu = {"nthreads": 1, "memory_limit": 2**34, "gpu": {"memory-total": 80 * 10**9}}
    info = {"workers": {"a": gpu, "b": dict(gpu, gpu={"memory-total": 24 * 10**9})}}
    voxels, reason, budget = client_target_voxels(info, "lr", psf, 3, gpu=True)
    task = gpu_task_bytes(24 * 10**9)  # the smallest device bounds a task
    assert voxels == voxels_for_bytes(task, psf, 3) > DEFAULT_TARGET_VOXELS[3]
    assert reason == "from the workers' GPU memory 22.4 GiB (2 workers, ~1.40 GiB a task)"
    assert budget is None  # as on a local GPU, nothing refuses the device's share
    unknown = {"workers": {"a": gpu, "b": {"nthreads": 1, "memory_limit": 2**34}}}
    assert client_target_voxels(unknown, "lr", psf, 3, gpu=True) == (
        None,
        "default (GPU memory not known: 1 of 2 workers report none)",
        None,
    )
    # CPU: the smallest budget per thread, not the smallest limit, bounds a task
    cpu = {"workers": {"a": {"nthreads": 4, "memory_limit": 8 * 2**30},
                       "b": {"nthreads": 1, "memory_limit": 4 * 2**30}}}  # fmt: skip
    voxels, reason, budget = client_target_voxels(cpu, "lr", psf, 3)
    assert voxels == voxels_for_bytes(cpu_task_bytes(8 * 2**30, 4), psf, 3)
    assert cpu_task_bytes(8 * 2**30, 4) < cpu_task_bytes(4 * 2**30, 1)
    assert budget == cpu_task_bytes(8 * 2**30, 4, cap=None)
    assert "8.00 GiB (2 workers, 4 threads each" in reason
    no_limit = {"workers": {"a": {"nthreads": 1, "memory_limit": 0}}}
    assert client_target_voxels(no_limit, "lr", psf, 3)[:2] == (
        None,
        "default (no memory limit on the 1 worker)",
    )


@pytest.mark.slow
def test_run_sized_from_the_workers_equals_the_whole_volume(tmp_path, psf3d_file, psf3d):
    from conftest import smooth_volume
    from distributed import Client

    from ssi_dask import deconvolve

    volume = smooth_volume((64, 256, 640), seed=5)
    source = tmp_path / "in.zarr"
    zarr.create_array(store=str(source), shape=volume.shape, chunks=(64, 64, 64), dtype="f4")[
        ...
    ] = volume
    with _cluster("1GiB") as cluster, Client(cluster, set_as_default=False) as client:
        lines: list[str] = []
        report = ssi_dask.run(_job(tmp_path, psf3d_file, source), client=client, echo=lines.append)
    # the 1 GiB workers' budget per task (below the default chunk's) cuts it in several chunks
    assert report.chunks >= 2, lines
    assert report.plan.memory_per_task <= cpu_task_bytes(2**30, 1)
    whole = deconvolve(volume, psf3d, num_iter=1, chunks=volume.shape).compute()
    np.testing.assert_allclose(
        zarr.open_array(str(tmp_path / "out.zarr"))[...], whole, rtol=1e-5, atol=1e-6
    )
