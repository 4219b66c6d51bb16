"""The launch recipes in cluster/, exercised as far as a machine without SLURM or GPUs allows:
the generated SLURM job scripts are checked and executed locally (as sbatch would run them),
and the scheduler-file paths run end to end with local processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cli_env, tree_digest
from test_cli import run_cli

from ssi_dask import deconvolve, write_zarr
from ssi_dask._backend import cupy_or_none

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def venv_env(tmp_path: Path, **extra: str) -> dict:
    env = cli_env()
    env.pop("SLURM_JOB_ID", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def test_jobqueue_gpu_job_script():
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (extras 'hpc' and 'test')")
    recipe = load_recipe("slurm_jobqueue")
    cluster = recipe.gpu_slurm_cluster(
        gpus_per_node=2,
        cpus_per_gpu=4,
        memory_per_gpu="8GB",
        partition="gpu",
        account="lab",
        walltime="01:30:00",
        interface="lo",
        prologue=["module load cuda/12"],
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
    )
    try:
        script = cluster.job_script()
        address = cluster.scheduler_address
    finally:
        cluster.close()
    lines = script.splitlines()
    for directive in (
        "#SBATCH -p gpu",
        "#SBATCH -A lab",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=15259M",  # 2 x 8 GB in whole MiB
        "#SBATCH -t 01:30:00",
        "#SBATCH --gres=gpu:2",
    ):
        assert directive in lines, (directive, script)
    worker = next(line for line in lines if "dask_cuda.cli" in line)
    assert worker.startswith(f"{sys.executable} -m dask_cuda.cli {address} ")
    assert "--nthreads 1" in worker and "--memory-limit 7.45GiB" in worker
    assert "--interface lo" in worker
    assert lines.index("module load cuda/12") < lines.index(worker)


def test_jobqueue_job_script_starts_a_worker_that_deconvolves(tmp_path, zarr3d, psf3d, volume3d):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (extras 'hpc' and 'test')")
    from distributed import Client

    recipe = load_recipe("slurm_jobqueue")
    cluster = recipe.gpu_slurm_cluster(
        gpu=False,  # same job layout with a CPU worker: what this machine can run
        gpus_per_node=1,
        memory_per_gpu="2GB",
        interface="lo",
        local_directory=str(tmp_path),
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
    )
    job = tmp_path / "job.sh"
    job.write_text(cluster.job_script())
    assert "--gres" not in job.read_text()
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115
    process = subprocess.Popen(["bash", str(job)], stdout=log, stderr=subprocess.STDOUT)
    try:  # run the job script as sbatch would on a compute node
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=90)
            lazy = deconvolve(str(zarr3d), psf3d, num_iter=3, chunks=(24, 32, 32))
            write_zarr(lazy, tmp_path / "out.zarr", client=client)
    finally:
        process.terminate()
        process.wait(timeout=30)
        cluster.close()
        log.close()
    expected = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 32)).compute()
    result = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...]
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_sbatch_script_header_and_syntax():
    script = (CLUSTER / "slurm_dask_cuda.sbatch").read_text()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --gres=gpu:4" in header and "#SBATCH --ntasks-per-node=1" in header
    assert 'srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1' in script
    assert subprocess.run(["bash", "-n", str(CLUSTER / "slurm_dask_cuda.sbatch")]).returncode == 0


def test_sbatch_script_runs_end_to_end_outside_slurm(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    before = tree_digest(zarr3d)
    scheduler_file = tmp_path / "scheduler.json"
    out = tmp_path / "out.zarr"
    env = venv_env(
        tmp_path,
        SSI_DASK_WORKER="dask worker --nthreads 1 --memory-limit 2GiB --no-dashboard",
        SSI_DASK_RUN_OPTIONS="",
        SSI_DASK_WORKERS="1",
        SSI_DASK_INTERFACE="lo",
        SSI_DASK_DASHBOARD="127.0.0.1:0",
        SCHEDULER_FILE=str(scheduler_file),
    )
    result = subprocess.run(
        ["bash", str(CLUSTER / "slurm_dask_cuda.sbatch"), str(zarr3d), str(out),
         "--psf", str(psf3d_file), "--iterations", "3", "--chunks", "24,32,32", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done in" in result.stdout and "dask: 1 workers" in result.stdout
    assert not scheduler_file.exists()  # cleaned up with the processes
    expected = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 32)).compute()
    np.testing.assert_allclose(
        zarr.open_array(str(out), mode="r")[...], expected, rtol=1e-5, atol=1e-6
    )
    assert tree_digest(zarr3d) == before


def test_sbatch_script_without_arguments_prints_usage(tmp_path):
    result = subprocess.run(
        ["bash", str(CLUSTER / "slurm_dask_cuda.sbatch")],
        capture_output=True, text=True, env=venv_env(tmp_path), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("usage: sbatch ") and "INPUT OUTPUT" in result.stderr


def _start_local_recipe(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    scheduler_file = tmp_path / "local.json"
    process = subprocess.Popen(
        [sys.executable, str(CLUSTER / "local_cuda.py"), "--scheduler-file", str(scheduler_file),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=venv_env(tmp_path),
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while not scheduler_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"recipe did not start: {process.communicate()[0]}")
        time.sleep(0.2)
    return process, scheduler_file


def test_local_recipe_scheduler_file_end_to_end(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    process, scheduler_file = _start_local_recipe(tmp_path, "--cpu", "--workers", "1")
    try:
        assert json.loads(scheduler_file.read_text())["address"].startswith("tcp://127.0.0.1:")
        out = tmp_path / "out.zarr"
        result = run_cli(
            "run", zarr3d, out, "--psf", psf3d_file, "--iterations", 3, "--chunks", "24,32,32",
            "--scheduler-file", scheduler_file, "--no-progress",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "dask: 1 workers" in result.stdout
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert "1 workers at tcp://127.0.0.1:" in output
    assert not scheduler_file.exists()
    expected = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 32)).compute()
    np.testing.assert_allclose(
        zarr.open_array(str(out), mode="r")[...], expected, rtol=1e-5, atol=1e-6
    )


def _dask_cuda() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except Exception:
        return False
    return cupy_or_none() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _dask_cuda(), reason="dask-cuda and CuPy with a CUDA device not available")
def test_local_cuda_recipe_on_gpus(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    process, scheduler_file = _start_local_recipe(tmp_path)
    try:
        out = tmp_path / "out.zarr"
        result = run_cli(
            "run", zarr3d, out, "--psf", psf3d_file, "--iterations", 3, "--chunks", "24,32,32",
            "--scheduler-file", scheduler_file, "--gpu", "--no-progress",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    finally:
        process.terminate()
        process.communicate(timeout=60)
    expected = deconvolve(volume3d, psf3d, num_iter=3, chunks=(24, 32, 32)).compute()
    got = zarr.open_array(str(out), mode="r")[...]
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
