"""``ssi-dask train`` and ``ssi-dask run --method ssi`` end to end on a 2D Zarr image."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
import zarr
from conftest import tree_digest
from test_cli import _assert_clean_failure, run_cli

from ssi_dask.bench.synthetic import degrade, ground_truth_2d
from ssi_dask.psf import protocol_psf
from ssi_dask.ssi import describe_runs, load_checkpoint, predict


@pytest.fixture
def degraded_zarr(tmp_path):
    truth = ground_truth_2d("camera", size=160)
    image = degrade(truth, protocol_psf(2), seed=0)
    path = tmp_path / "image.zarr"
    zarr.create_array(store=str(path), shape=image.shape, chunks=(80, 80), dtype="float32")[...] = (
        image
    )
    psf_path = tmp_path / "psf.tif"
    tifffile.imwrite(psf_path, protocol_psf(2))
    return path, psf_path, image


def test_train_then_run_ssi_chunked_matches_in_process(tmp_path, degraded_zarr):
    path, psf_path, image = degraded_zarr
    before = tree_digest(path)
    model_path = tmp_path / "model.pt"
    trained = run_cli(
        "train", path, "--psf", psf_path, "--out", model_path, "--steps", 30, "--restarts", 0
    )
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "ssi.zarr"
    result = run_cli(
        "run",
        path,
        out,
        "--psf",
        psf_path,
        "--method",
        "ssi",
        "--model",
        model_path,
        "--chunks",
        "80,80",
        "--workers",
        2,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    model = load_checkpoint(model_path)
    # the training summary says how many runs were trained, retried and what the check found
    (summary,) = [line for line in trained.stdout.splitlines() if line.startswith("trained in")]
    assert summary.endswith(": " + describe_runs(model.training))
    assert model.training["runs"] == 1 and ": 1 run (0 retried" in summary  # --restarts 0
    assert summary.endswith("self-check passed") == model.training["self_check"]["passed"]
    expected = predict(model, image, device="cpu")
    output = zarr.open_array(str(out), mode="r")
    assert output.shape == image.shape
    np.testing.assert_allclose(output[...], expected, atol=1e-4 * float(np.ptp(expected)))
    provenance = output.attrs["ssi_dask"]
    assert provenance["method"] == "ssi" and provenance["complete"] is True
    assert provenance["model"]["halo"] == model.halo
    assert len(provenance["model"]["sha256"]) == 64
    assert tree_digest(path) == before


def test_run_ssi_trains_when_no_model_is_given(tmp_path, degraded_zarr):
    path, psf_path, image = degraded_zarr
    out = tmp_path / "trained-here.zarr"
    saved = tmp_path / "saved.pt"
    result = run_cli(
        "run",
        path,
        out,
        "--psf",
        psf_path,
        "--method",
        "ssi",
        "--steps",
        20,
        "--seed",
        3,
        "--restarts",
        0,
        "--ensemble",
        2,
        "--save-model",
        saved,
        "--workers",
        1,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "training SSI" in result.stdout
    model = load_checkpoint(saved)
    # two networks trained and averaged; the chunked run applies the average
    assert model.config["members"] == 2 and len(model.training["selected_runs"]) == 2
    output = zarr.open_array(str(out), mode="r")[...]
    np.testing.assert_allclose(
        output, predict(model, image, device="cpu"), atol=1e-4 * float(np.ptp(output))
    )


def test_ssi_bad_checkpoint(tmp_path, degraded_zarr):
    path, psf_path, _ = degraded_zarr
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"definitely not a checkpoint")
    result = run_cli(
        "run", path, tmp_path / "o.zarr", "--psf", psf_path, "--method", "ssi", "--model", broken
    )
    _assert_clean_failure(result, "is unreadable or corrupt")
    missing = run_cli(
        "run",
        path,
        tmp_path / "o.zarr",
        "--psf",
        psf_path,
        "--method",
        "ssi",
        "--model",
        tmp_path / "none.pt",
    )
    _assert_clean_failure(missing, "does not exist; train a model first")
    assert not (tmp_path / "o.zarr").exists()


def test_ssi_bad_ensemble_size(tmp_path, degraded_zarr):
    path, psf_path, _ = degraded_zarr
    result = run_cli("train", path, "--psf", psf_path, "--out", tmp_path / "m.pt", "--ensemble", 0)
    _assert_clean_failure(result, "--ensemble must be an integer >= 1, got 0")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(
    "spec, expected",
    # auto: 8.7 % of this image sits at 0, only 0.06 % at 1 (below the 0.1 % rule)
    [("auto", (0.0, None)), ("none", None), ("0,1", (0.0, 1.0)), (",1", (None, 1.0))],
)
def test_ssi_clipping_option_reaches_the_checkpoint(tmp_path, degraded_zarr, spec, expected):
    path, psf_path, image = degraded_zarr
    assert (image == 0).any() and (image == 1).any()  # the protocol's degradation clips both
    model_path = tmp_path / "m.pt"
    result = run_cli(
        "train",
        path,
        "--psf",
        psf_path,
        "--out",
        model_path,
        "--steps",
        2,
        "--restarts",
        0,
        "--clipping",
        spec,
    )
    assert result.returncode == 0, result.stderr
    sensor = load_checkpoint(model_path).training["sensor"]
    if expected is None:
        assert sensor is None
    else:
        assert (sensor["lower_raw"], sensor["upper_raw"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "flag, spec, message",
    [
        (
            "--clipping",
            "maybe",
            "--clipping must be auto, none or LO,HI with either side empty (e.g. 0,), got 'maybe'",
        ),
        ("--clipping", "1,0", "--clipping needs LO < HI, got '1,0'"),
        ("--lr-prior", "2x", "--lr-prior must be an iteration count >= 0 or 'auto', got '2x'"),
        ("--lr-prior", "-3", "--lr-prior must be an integer >= 0, got -3"),
    ],
)
def test_ssi_bad_training_flag(tmp_path, degraded_zarr, flag, spec, message):
    path, psf_path, _ = degraded_zarr
    result = run_cli("train", path, "--psf", psf_path, "--out", tmp_path / "m.pt", flag, spec)
    _assert_clean_failure(result, message)
    assert not (tmp_path / "m.pt").exists()


def test_ssi_lr_prior_option_reaches_the_checkpoint(tmp_path, degraded_zarr):
    path, psf_path, image = degraded_zarr
    before = tree_digest(path)
    model_path = tmp_path / "m.pt"
    result = run_cli(
        "train", path, "--psf", psf_path, "--out", model_path, "--steps", 2, "--restarts", 0,
        "--lr-prior", 3,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = load_checkpoint(model_path)
    recorded = dict(model.training["lr_prior"])
    # the data never go below zero: the prior's zero is the normalisation's offset
    assert recorded.pop("background") == pytest.approx(model.normalisation["offset"], abs=1e-7)
    assert recorded == {"iterations": 3, "requested": 3}
    assert model.network.prior_iterations == 3
    assert tree_digest(path) == before


def test_ssi_plan_before_training_carries_the_prior(tmp_path, zarr3d, psf3d_file):
    """The plan printed before training has the prior's halo: a count given is planned
    exactly (a halo too wide for the chunks is refused before any training), a count chosen
    in training is planned at 1 with the range up to ``lr_prior_max_iter`` stated."""
    from ssi_dask.ssi import UNet

    before = tree_digest(zarr3d)
    out = tmp_path / "out.zarr"
    # 100 accelerated iterations of the 7x9x9 PSF: a halo of 56, wider than 48-voxel chunks
    # (x is cut in two; z and y are held whole, where the halo only mirrors the edges)
    refused = run_cli(
        "run", zarr3d, out, "--psf", psf3d_file, "--method", "ssi", "--lr-prior", 100,
        "--chunks", "24,64,48", timeout=120,
    )  # fmt: skip
    _assert_clean_failure(refused, "halo 56 along axis 2 exceeds the smallest working chunk 48")
    assert "training" not in refused.stdout and not out.exists()
    largest = UNet(3, levels=3, base_channels=8, prior_iterations=100, prior_psf_shape=(7, 9, 9),
                   prior_acceleration="nesterov")  # fmt: skip
    first = UNet(3, levels=3, base_channels=8, prior_iterations=1, prior_psf_shape=(7, 9, 9),
                 prior_acceleration="nesterov")  # fmt: skip
    dry = run_cli(
        "run", zarr3d, out, "--psf", psf3d_file, "--method", "ssi", "--chunks", "24,64,48",
        "--dry-run",
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert f"halo (depth)    (24, 24, {first.halo})" in dry.stdout
    assert (
        "prior           auto: nesterov Lucy-Richardson, 1-100 iterations chosen in training "
        f"(halo and memory above for 1; up to {largest.halo} and ~"
    ) in dry.stdout
    assert first.halo < largest.halo == 56
    assert tree_digest(zarr3d) == before and not out.exists()
    # a memory limit that holds the plan at 1 but not at 100: warned before training
    tight = run_cli(
        "run", zarr3d, out, "--psf", psf3d_file, "--method", "ssi", "--chunks", "24,64,48",
        "--dry-run", "--memory-limit", "600MB",
    )  # fmt: skip
    suggested = re.search(r"give --memory-limit (\d+)MiB or more", tight.stderr)
    assert tight.returncode == 2 and suggested, tight.stderr
    warned = run_cli(
        "run", zarr3d, out, "--psf", psf3d_file, "--method", "ssi", "--chunks", "24,64,48",
        "--dry-run", "--memory-limit", f"{suggested.group(1)}MiB",
    )  # fmt: skip
    assert warned.returncode == 0, warned.stderr
    assert "  warning: at the prior's largest count (100) one task needs ~" in warned.stdout
    assert "give a larger --memory-limit or a fixed --lr-prior (a smaller count)" in warned.stdout
