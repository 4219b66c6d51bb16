"""Bounded memory at a small scale: a worker with a low memory limit deconvolves a volume
several times larger than that limit (benchmarks/bench_memory.py does it at scale)."""

from __future__ import annotations

import dask
import numpy as np
import zarr

from ssi_dask import deconvolve, write_zarr
from ssi_dask.cluster import _local_cluster
from ssi_dask.psf import widefield_psf
from ssi_dask.verify import verify_output

LIMIT = 300 * 2**20
SIDE = 16384  # 1 GiB as float32, 3.4 times the worker's memory limit
CHUNK = 1024


def _peak_rss() -> int:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` would include the size
    of the parent at spawn time, which survives fork + exec)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_volume_larger_than_worker_memory(tmp_path):
    from distributed import Client

    source = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=(SIDE, SIDE), chunks=(CHUNK, CHUNK), dtype="u1"
    )
    for y in range(0, SIDE, CHUNK):  # written in slabs: never whole in this process either
        source[y : y + CHUNK] = 37
    assert SIDE * SIDE * 4 > 3 * LIMIT
    psf = widefield_psf((9, 9), (0.15, 0.15), na=1.0, wavelength=0.52)
    # No spilling and no pausing: a pipeline that held more than a few chunks would push the
    # worker past the limit, and the nanny would kill it (the run would then fail).
    memory = {"spill": False, "target": False, "pause": False, "terminate": 0.95}
    with dask.config.set({f"distributed.worker.memory.{k}": v for k, v in memory.items()}):
        cluster = _local_cluster(1, 1, f"{LIMIT}B", False)
    client = Client(cluster)
    try:
        (worker,) = client.scheduler_info()["workers"]
        lazy = deconvolve(str(tmp_path / "in.zarr"), psf, num_iter=0, chunks=(CHUNK, CHUNK))
        write_zarr(lazy, tmp_path / "out.zarr", client=client)
        peaks = client.run(_peak_rss)
    finally:
        client.close()
        cluster.close()
    assert list(peaks) == [worker]  # the same worker process all along, never restarted
    assert peaks[worker] < 0.95 * LIMIT, f"peak {peaks[worker] / 2**20:.0f} MiB"
    report = verify_output(tmp_path / "out.zarr")
    assert report.ok and report.total == (SIDE // CHUNK) ** 2
    output = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    # zero iterations of Lucy-Richardson give the block's mean everywhere: 37
    for y, x in [(0, 0), (SIDE - CHUNK, SIDE - CHUNK), (5 * CHUNK, 11 * CHUNK)]:
        np.testing.assert_array_equal(output[y : y + CHUNK, x : x + CHUNK], 37.0)
