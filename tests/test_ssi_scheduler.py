"""Distributed SSI end to end: `ssi-dask train` and `ssi-dask run --method ssi` against a real
``dask scheduler`` with two ``dask worker`` processes on 127.0.0.1, and the CLI's GPU errors."""

from __future__ import annotations

import numpy as np
import torch
import zarr
from conftest import tree_digest
from test_cli import _assert_clean_failure, run_cli
from test_scheduler_processes import scheduler_address  # noqa: F401  (fixture)

from ssi_dask.ssi import load_checkpoint, predict

TINY_CLI = [
    "--steps",
    4,
    "--restarts",
    0,
    "--patch-size",
    24,
    "--batch-size",
    2,
    "--net-depth",
    2,
    "--base-channels",
    4,
    "--regions",
    3,
    "--region-size",
    "24,32,32",
]


def test_train_and_run_ssi_on_scheduler_processes(
    tmp_path,
    scheduler_address,  # noqa: F811
    zarr3d,
    psf3d_file,
    volume3d,
):
    from distributed import Client

    before = tree_digest(zarr3d)
    model_path = tmp_path / "model.pt"
    trained = run_cli(
        "train",
        zarr3d,
        "--psf",
        psf3d_file,
        "--out",
        model_path,
        "--scheduler",
        scheduler_address,
        "--train-on",
        "worker",
        *TINY_CLI,
        "--lr-prior",
        30,  # the hold-out rule takes its cap on this smooth volume: a halo wider than 32
    )
    assert trained.returncode == 0, trained.stderr
    assert "dask: 2 workers read the training regions" in trained.stdout
    model = load_checkpoint(model_path)
    sampling = model.training["sampling"]
    assert sampling["trained_on"] == "worker" and sampling["kept"] == 3
    assert sampling["volume_shape"] == list(volume3d.shape)
    out = tmp_path / "ssi.zarr"
    # Dask's active memory manager may drop an idle replica of the model between chunks, and
    # the worker would fetch it again: off for this check of the graph (one model key)
    with Client(scheduler_address, timeout="30s") as client:
        client.amm.stop()
    result = run_cli(
        "run",
        zarr3d,
        out,
        "--psf",
        psf3d_file,
        "--method",
        "ssi",
        "--model",
        model_path,
        "--chunks",
        "24,32,32",
        "--scheduler",
        scheduler_address,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "dask: 2 workers" in result.stdout
    output = zarr.open_array(str(out), mode="r")
    assert output.attrs["ssi_dask"]["complete"] is True
    assert output.attrs["ssi_dask"]["model"]["sha256"] == model.training["sha256"]
    expected = predict(model, volume3d, device="cpu")
    tolerance = 1e-4 * float(np.ptp(expected))
    # the Lucy-Richardson prior (30 accelerated iterations, fixed above: as far-reaching as
    # 180 classic ones) is least constrained at the volume's edges, where chunked and
    # whole-image outputs may differ more than away from them (chunk seams included)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(output[inner], expected[inner], atol=tolerance)
    np.testing.assert_allclose(output[...], expected, atol=10 * tolerance)
    assert model.training["lr_prior"]["iterations"] == 30  # the case the comment describes
    assert model.training["lr_prior"]["acceleration"] == "nesterov"  # the 3D default
    assert tree_digest(zarr3d) == before
    # the model's graph key reached each worker at most once (one computes it, one fetches it)
    with Client(scheduler_address, timeout="30s") as client:
        client.amm.start()
        logs = client.run(
            lambda dask_worker: [
                key
                for t in dask_worker.transfer_incoming_log
                for key in t["keys"]
                if str(key).startswith("shared-model-")
            ]
        )
    fetched = [len(keys) for keys in logs.values()]
    assert len(fetched) == 2 and sum(fetched) <= 1


def test_gpu_without_cuda_is_one_line(tmp_path, zarr3d, psf3d_file):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA device is visible: --gpu would work here")
    model_path = tmp_path / "model.pt"
    trained = run_cli("train", zarr3d, "--psf", psf3d_file, "--out", model_path, "--gpu", *TINY_CLI)
    _assert_clean_failure(trained, "--train-device cuda needs a CUDA GPU visible to torch")
    assert not model_path.exists()
    out = tmp_path / "o.zarr"
    ran = run_cli("run", zarr3d, out, "--psf", psf3d_file, "--method", "ssi", "--gpu", *TINY_CLI)
    _assert_clean_failure(ran, "--train-device cuda needs a CUDA GPU visible to torch")
    assert not out.exists()
    remote = run_cli(
        "train", zarr3d, "--psf", psf3d_file, "--out", model_path, "--train-on", "worker"
    )
    _assert_clean_failure(remote, "--train-on worker needs --scheduler or --scheduler-file")
