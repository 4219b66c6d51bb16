"""Working chunks sized from the worker's memory limit, and the dry run's cost per task."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

import ssi_dask
from ssi_dask.cluster import check_worker_memory
from ssi_dask.config import DEFAULT_TARGET_VOXELS
from ssi_dask.sizing import cpu_task_bytes, gpu_task_bytes


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
