"""End to end against a real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import zarr
from conftest import cli_env, console_command, tree_digest
from test_cli import free_port, run_cli

from ssi_dask import deconvolve


@pytest.fixture
def scheduler_address(tmp_path):
    """Start a scheduler and two single-threaded workers as separate processes."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = open(tmp_path / "dask.log", "w")  # noqa: SIM115
    processes = [
        subprocess.Popen(
            [
                *console_command("dask", "distributed.cli.dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            stdout=logs,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
    ]
    time.sleep(1.0)
    for _ in range(2):
        processes.append(
            subprocess.Popen(
                [
                    *console_command("dask", "distributed.cli.dask"),
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--memory-limit",
                    "2GiB",
                    "--local-directory",
                    str(tmp_path / "workers"),
                ],
                stdout=logs,
                stderr=subprocess.STDOUT,
                env=cli_env(),
            )
        )
    try:
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        logs.close()


def test_run_against_scheduler_processes(
    tmp_path, scheduler_address, zarr3d, psf3d_file, psf3d, volume3d
):
    before = tree_digest(zarr3d)
    out = tmp_path / "remote.zarr"
    result = run_cli(
        "run",
        zarr3d,
        out,
        "--psf",
        psf3d_file,
        "--iterations",
        7,
        "--chunks",
        "24,32,32",
        "--scheduler",
        scheduler_address,
    )
    assert result.returncode == 0, result.stderr
    assert "dask: 2 workers" in result.stdout
    expected = deconvolve(volume3d, psf3d, num_iter=7, chunks=(24, 32, 32)).compute()
    output = zarr.open_array(str(out), mode="r")
    np.testing.assert_allclose(output[...], expected, rtol=1e-5, atol=1e-6)
    assert output.attrs["ssi_dask"]["complete"] is True
    assert tree_digest(zarr3d) == before
