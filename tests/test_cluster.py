"""The local cluster that ``ssi-dask run`` starts: worker settings and option checks."""

from __future__ import annotations

import os

import dask
import pytest

from ssi_dask.cluster import dask_client, worker_env
from ssi_dask.errors import ParameterError


def _worker_settings() -> dict:
    return {
        "profile": dask.config.get("distributed.worker.profile.enabled"),
        "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def test_local_workers_get_allocator_environment_and_no_profiler(monkeypatch):
    # what an earlier default LocalCluster in this process leaves behind must not win
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dask_client(n_workers=1, threads_per_worker=1, memory_limit="1GiB") as client:
        (settings,) = client.run(_worker_settings).values()
        assert len(client.scheduler_info()["workers"]) == 1
    assert settings == {
        "profile": False,
        "malloc_trim": str(128 * 2**20),  # an eighth of the 1 GiB limit (see worker_env)
        "omp_threads": "1",
    }
    # the client's own configuration and environment are left as they were
    assert dask.config.get("distributed.worker.profile.enabled") is True
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"


def test_allocator_threshold_follows_small_memory_limits():
    assert worker_env(None)["MALLOC_TRIM_THRESHOLD_"] == str(256 * 2**20)
    assert worker_env("8GiB")["MALLOC_TRIM_THRESHOLD_"] == str(256 * 2**20)
    assert worker_env("512MiB")["MALLOC_MMAP_THRESHOLD_"] == str(64 * 2**20)


def test_both_scheduler_and_file_is_refused(tmp_path):
    with pytest.raises(ParameterError, match="either --scheduler or --scheduler-file"):
        with dask_client("tcp://127.0.0.1:1", scheduler_file=tmp_path / "s.json"):
            pass
