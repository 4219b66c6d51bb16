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
    with pytest.raises(ParameterError, match="either scheduler= or scheduler_file, not both"):
        with dask_client("tcp://127.0.0.1:1", scheduler_file=tmp_path / "s.json"):
            pass


def _listening(process) -> set[tuple[str, int]]:
    """TCP addresses on which ``process`` and its children (the nannies' workers) listen."""
    import psutil

    found = set()
    for member in [process, *process.children(recursive=True)]:
        try:
            connections = member.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        found |= {c.laddr[:2] for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def test_local_cluster_listens_on_loopback_only():
    from urllib.parse import urlsplit

    import psutil

    from ssi_dask.cluster import dashboard_link

    me = psutil.Process()
    before = _listening(me)
    with dask_client(n_workers=2, threads_per_worker=1, memory_limit="1GiB") as client:
        servers = _listening(me) - before
        link = urlsplit(dashboard_link(client))
        info = client.scheduler_info()
        workers = [urlsplit(address) for address in info["workers"]]
        nannies = [urlsplit(w["nanny"]) for w in info["workers"].values()]
    # scheduler, dashboard, 2 nannies and 2 workers, all on the loopback interface
    assert len(servers) >= 6, servers
    assert {host for host, _ in servers} == {"127.0.0.1"}, servers
    # the printed dashboard address is the one that really listens
    assert link.hostname == "127.0.0.1" and (link.hostname, link.port) in servers
    assert urlsplit(info["address"]).port in {port for _, port in servers}
    for address in [*workers, *nannies]:
        assert (address.hostname, address.port) in servers, (address, servers)
