"""The blockwise pipeline on a CUDA device (CuPy chunks, dask-cuda workers). Skipped without one."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import smooth_volume

from ssi_dask import deconvolve, write_zarr
from ssi_dask._backend import cupy_or_none

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cupy_or_none() is None, reason="CuPy with a CUDA device is not available"),
]


def gaussian_psf(shape, sigma):
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    psf = np.exp(-sum((g / s) ** 2 for g, s in zip(grids, sigma)) / 2)
    return (psf / psf.sum()).astype(np.float32)


def test_gpu_chunks_match_cpu_chunks():
    volume = smooth_volume((32, 96, 128), seed=4)
    psf = gaussian_psf((9, 9, 9), (2.0, 1.5, 1.5))
    cpu = deconvolve(volume, psf, num_iter=12, chunks=(32, 48, 64)).compute(scheduler="threads")
    gpu = deconvolve(volume, psf, num_iter=12, chunks=(32, 48, 64), device="cuda").compute(
        scheduler="threads"
    )
    assert isinstance(gpu, np.ndarray)
    assert np.abs(gpu - cpu).max() / np.abs(cpu).max() < 1e-4


def _dask_cuda_importable() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _dask_cuda_importable(), reason="dask-cuda is not installed")
def test_local_cuda_cluster_writes_zarr(tmp_path):
    from ssi_dask.cluster import dask_client

    volume = smooth_volume((32, 64, 64), seed=5)
    psf = gaussian_psf((7, 7, 7), (1.5, 1.2, 1.2))
    lazy = deconvolve(volume, psf, num_iter=8, chunks=(32, 32, 32), device="cuda")
    expected = deconvolve(volume, psf, num_iter=8, chunks=(32, 32, 32)).compute()
    with dask_client(gpu=True) as client:
        assert len(client.scheduler_info()["workers"]) >= 1
        write_zarr(lazy, tmp_path / "gpu.zarr", client=client)
    result = zarr.open_array(str(tmp_path / "gpu.zarr"), mode="r")[...]
    assert np.abs(result - expected).max() / np.abs(expected).max() < 1e-4
