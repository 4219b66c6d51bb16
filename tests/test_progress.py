"""Progress for every long phase of a run, as the command line shows it: region sampling,
training (step k of N, loss, ETA, device), the plan before training, SSI tiles within a chunk,
chunks with one rate that the summary repeats."""

from __future__ import annotations

import io
import re
import subprocess
import time

import numpy as np
import pytest
import tifffile
import zarr
from conftest import cli_env, console_command

from ssi_dask.bench.synthetic import degrade, ground_truth_2d
from ssi_dask.psf import protocol_psf
from ssi_dask.ssi import predict_chunk, train_ssi
from ssi_dask.ssi.train import TrainingPrinter
from ssi_dask.summary import StageProgress


@pytest.fixture(scope="module")
def image2d():
    return degrade(ground_truth_2d("camera", size=96), protocol_psf(2), seed=0)


@pytest.fixture(scope="module")
def model(image2d):
    return train_ssi(
        image2d, protocol_psf(2), seed=0, device="cpu", steps=2, patch_size=32, batch_size=2,
        restarts=0,
    )  # fmt: skip


def test_cli_ssi_run_shows_every_phase_in_order(tmp_path, image2d):
    path = tmp_path / "img.zarr"
    zarr.create_array(store=str(path), shape=image2d.shape, chunks=(48, 48), dtype="float32")[
        ...
    ] = image2d
    tifffile.imwrite(tmp_path / "psf.tif", protocol_psf(2))
    argv = [
        "run", path, tmp_path / "out.zarr", "--psf", tmp_path / "psf.tif", "--method", "ssi",
        "--steps", 4, "--restarts", 0, "--patch-size", 32, "--batch-size", 2, "--regions", 3,
        "--workers", 1, "--train-device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(
        [*console_command("ssi-dask", "ssi_dask"), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: the order of the phases is kept
        text=True,
        timeout=300,
        env=cli_env(),
    )
    text = result.stdout.replace("\r", "\n")
    assert result.returncode == 0, text
    lines = text.splitlines()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"{pattern!r} not in:\n{text}"
        return found[0]

    # the plan, then sampling, then training, then the chunks
    plan = first(r"^  working chunks  \(96, 96\) -> 1 chunks")
    sampling = first(r"^sampling training regions \(with local threads\): 0/6 regions")
    sampled = first(r"^sampling training regions .*: 6/6 regions \(100 %\)")
    header = first(r"^\[ssi\] training on cpu \(\d+ threads\): 1 network\(s\) x 4 steps, 2 patches")
    last_step = first(r"^\[ssi\] run 1 of 1: step 4/4 \(100 %\)  train [\d.]+  val [\d.]+ .*ETA 0s")
    bar = first(r"^deconvolving: +0%\|.*\| 0/1 chunks")
    assert plan < sampling < sampled < header < last_step < bar
    assert "sampled 6 regions of (64, 64)" in text  # the count the progress lines showed
    # one rate, voxels/s, the same on the bar and in the summary
    assert "chunk/s" not in text and "it/s" not in text
    bar_rates = re.findall(r"1/1 chunks \[[^\]]*, ([\d.]+ [kMG]?voxel/s)\]", text)
    summary_rate = re.search(r"throughput  ([\d.]+ [kMG]?voxel/s) \(as on the progress bar", text)
    assert bar_rates and summary_rate and bar_rates[-1] == summary_rate.group(1)


def test_tiles_within_a_chunk_are_reported(image2d, model):
    block = np.pad(image2d[:64, :64], model.halo, mode="reflect")
    seen: list[tuple[int, int]] = []
    out = predict_chunk(
        model,
        block,
        device="cpu",
        tile_shape=32,
        budget=1,
        progress=lambda d, t: seen.append((d, t)),
    )
    reference = predict_chunk(model, block, device="cpu", tile_shape=32, budget=1)
    np.testing.assert_array_equal(out, reference)  # reporting changes nothing
    n_tiles = (64 // 32) ** 2
    assert seen[0] == (0, n_tiles) and seen[-1] == (n_tiles, n_tiles)
    assert [d for d, _ in seen] == sorted({d for d, _ in seen})  # strictly increasing
    assert len(seen) == n_tiles + 1  # budget=1: one tile per network call


def test_worker_reports_tiles_as_events(local_client, image2d, model):
    from ssi_dask.blockwise import SSI_TILES_EVENT, _ssi_chunk

    block = np.pad(image2d[:48, :48], model.halo, mode="reflect")
    received = []
    local_client.subscribe_topic(SSI_TILES_EVENT, received.append)
    started = time.time()  # the session's cluster also holds other tests' tile events
    try:
        out = local_client.submit(_ssi_chunk, block, model, "cpu", (model.halo,) * 2).result()
        events = local_client.get_events(SSI_TILES_EVENT)
    finally:
        local_client.unsubscribe_topic(SSI_TILES_EVENT)
    assert out.shape == block.shape
    messages = [message for stamp, message in events if stamp >= started]
    assert messages[0]["done"] == 0 and messages[-1]["done"] == messages[-1]["total"] >= 1
    assert len({m["chunk"] for m in messages}) == 1


def test_training_printer_eta_counts_the_runs_still_planned():
    stream = io.StringIO()
    printer = TrainingPrinter(file=stream)
    printer.start(
        dict(device="cpu (2 threads)", ensemble=2, restarts=1, steps=200, batch_size=4,
             patch_shape=[32, 32])
    )  # fmt: skip
    printer({"run": 0, "step": 50, "train_loss": 0.5, "elapsed_s": 10.0})
    printer({"run": 1, "step": 100, "train_loss": 0.5, "val_loss": 0.4, "rho": 0.1,
             "elapsed_s": 30.0})  # fmt: skip
    printer({"run": 2, "step": 20, "train_loss": 0.5, "elapsed_s": 4.0})
    lines = stream.getvalue().splitlines()
    assert lines[0] == (
        "[ssi] training on cpu (2 threads): 2 network(s) x 200 steps, 4 patches of 32x32 per "
        "step; up to 1 restart(s) if a run fails its self-supervised check"
    )
    # 0.2 s/step: 150 steps left in run 1 and 200 in run 2 -> 70 s
    assert lines[1].startswith("[ssi] run 1 of 2: step 50/200 (25 %)") and "ETA 1m10s" in lines[1]
    assert "val 0.40000" in lines[2] and lines[2].endswith("ETA 30s")  # 0.3 s x 100 steps
    assert lines[3].startswith("[ssi] run 3 (restart): step 20/200") and "ETA 36s" in lines[3]


def test_stage_progress_lines_are_throttled():
    stream = io.StringIO()
    stage = StageProgress("reading", 100, "regions", file=stream, interval=3600)
    for done in range(101):
        stage.update(done)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # 0, the first finished one, the last
    assert lines[0].startswith("reading: 0/100 regions (0 %), elapsed")
    assert re.match(r"reading: 1/100 regions \(1 %\), elapsed \d+s, ETA \d+", lines[1])
    assert lines[2].startswith("reading: 100/100 regions (100 %)") and "ETA" not in lines[2]
