"""Helpers for the reliability tests: real dask scheduler/worker processes, a CLI run in the
background that can be killed, and the completion records it leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import cli_env, console_command

from ssi_dask.progress import progress_folder


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaskProcesses:
    """A ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (no nanny by default,
    so killing a worker's process really removes that worker)."""

    def __init__(self, folder: Path, n_workers: int = 2, nanny: bool = False):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.folder = Path(folder)
        self.log = open(self.folder / "dask.log", "w")  # noqa: SIM115
        self.nanny = nanny
        self.scheduler = self._spawn(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            self.address.rsplit(":", 1)[1],
            "--no-dashboard",
        )
        time.sleep(1.0)
        self.workers = [self.start_worker() for _ in range(n_workers)]
        if n_workers:
            self.wait_for_workers(n_workers)

    def _spawn(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*console_command("dask", "distributed.cli.dask"), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )

    def start_worker(self) -> subprocess.Popen:
        return self._spawn(
            "worker",
            self.address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--memory-limit",
            "2GiB",
            "--local-directory",
            str(self.folder / "workers"),
            *([] if self.nanny else ["--no-nanny"]),
        )

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=60)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.workers, self.scheduler]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def start_cli(*args, folder: Path) -> subprocess.Popen:
    """Start ``ssi-dask ARGS`` in its own process group, output to files in ``folder``."""
    return subprocess.Popen(
        [*console_command("ssi-dask", "ssi_dask"), *map(str, args)],
        stdout=open(folder / "cli.out", "w"),  # noqa: SIM115
        stderr=open(folder / "cli.err", "w"),  # noqa: SIM115
        env=cli_env(),
        start_new_session=True,
    )


def records_written(output: Path) -> int:
    """Completion records in an output (whole records only: temporary files start with '.')."""
    folder = progress_folder(output)
    if not folder.is_dir():
        return 0
    return sum(1 for entry in folder.iterdir() if not entry.name.startswith("."))


def wait_for_records(output: Path, at_least: int, process: subprocess.Popen, timeout=120) -> int:
    """Poll until ``output`` has ``at_least`` records; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = records_written(output)
        if count >= at_least:
            return count
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) with {count} records")
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} records after {timeout} s")


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything in its process group (its local cluster too)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
