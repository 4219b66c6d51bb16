"""``ssi-dask run --back-projector wiener-butterworth`` and ``--iterations auto`` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import run_cli, tree_digest

from ssi_dask import deconvolve
from ssi_dask.cli import main
from ssi_dask.lr import richardson_lucy
from ssi_dask.lr_auto import choose_iterations


def test_run_wb_auto_on_a_local_cluster(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    before = tree_digest(zarr3d)
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run",
        zarr3d,
        out,
        "--psf",
        psf3d_file,
        "--back-projector",
        "wiener-butterworth",
        "--iterations",
        "auto",
        "--auto-samples",
        2,
        "--seed",
        5,
        "--chunks",
        "24,32,48",
        "--workers",
        2,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    # 10 WB iterations would need a halo of 45 > 32: only counts whose halo fits are tried
    assert "auto iterations: trying 1..6 (the halo of more exceeds the chunks)" in result.stdout
    # the same choice as the Python API with the same settings
    choice = choose_iterations(
        volume3d, psf3d, back_projector="wiener-butterworth", n_samples=2, seed=5, max_iter=6
    )
    assert f"auto iterations: {choice.num_iter}, wiener alpha {choice.wiener_alpha:g}" in (
        result.stdout
    )
    output = zarr.open_array(str(out), mode="r")
    record = output.attrs["ssi_dask"]
    assert record["iterations"] == choice.num_iter
    assert record["back_projector"] == "wiener-butterworth"
    assert record["wiener_alpha"] == choice.wiener_alpha
    assert record["butterworth_order"] == 10
    assert record["auto_iterations"]["num_iter"] == choice.num_iter
    assert record["auto_iterations"]["samples"] == choice.samples
    assert len(record["auto_iterations"]["errors"]) == 5  # one curve per alpha tried
    expected = deconvolve(
        volume3d,
        psf3d,
        num_iter=choice.num_iter,
        back_projector="wiener-butterworth",
        wiener_alpha=choice.wiener_alpha,
        chunks=(24, 32, 48),
    ).compute(scheduler="threads")
    np.testing.assert_allclose(output[...], expected, rtol=1e-5, atol=1e-5)
    assert tree_digest(zarr3d) == before


def test_run_wb_fixed_parameters_in_process(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    out = tmp_path / "out.zarr"
    code = main(
        [
            "run",
            str(zarr3d),
            str(out),
            "--psf",
            str(psf3d_file),
            "--back-projector",
            "wiener-butterworth",
            "--wiener-alpha",
            "0.02",
            "--cutoff",
            "0.3",
            "--butterworth-order",
            "6",
            "--iterations",
            "3",
            "--chunks",
            "24,32,48",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    output = zarr.open_array(str(out), mode="r")
    record = output.attrs["ssi_dask"]
    assert record["iterations"] == 3 and record["wiener_alpha"] == 0.02
    assert record["cutoff"] == [0.3, 0.3, 0.3] and record["butterworth_order"] == 6
    expected = deconvolve(
        volume3d,
        psf3d,
        num_iter=3,
        back_projector="wiener-butterworth",
        wiener_alpha=0.02,
        cutoff=0.3,
        butterworth_order=6,
        chunks=(24, 32, 48),
    ).compute(scheduler="threads")
    np.testing.assert_allclose(output[...], expected, rtol=1e-5, atol=1e-5)


def test_run_accelerated_in_process(tmp_path, zarr3d, psf3d_file, psf3d, volume3d):
    out = tmp_path / "out.zarr"
    before = tree_digest(zarr3d)
    args = ["run", str(zarr3d), str(out), "--psf", str(psf3d_file), "--iterations", "12"]
    code = main([*args, "--acceleration", "nesterov", "--workers", "1", "--no-progress"])
    assert code == 0
    output = zarr.open_array(str(out), mode="r")
    assert output.attrs["ssi_dask"]["acceleration"] == "nesterov"
    expected = richardson_lucy(volume3d, psf3d, num_iter=12, acceleration="nesterov")
    np.testing.assert_allclose(output[...], expected, atol=1e-3 * float(expected.max()))
    assert tree_digest(zarr3d) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--iterations", "many"], "--iterations must be an integer >= 0 or 'auto', got 'many'"),
        (["--iterations", "-2"], "--iterations must be >= 0, got -2"),
        (
            ["--wiener-alpha", "0.1"],
            "--wiener-alpha, --butterworth-order and --cutoff need "
            "--back-projector wiener-butterworth",
        ),
        (
            ["--back-projector", "wiener-butterworth", "--wiener-alpha", "-1"],
            "--wiener-alpha must be a finite number > 0, got -1.0",
        ),
        (
            ["--back-projector", "wiener-butterworth", "--cutoff", "0.1,0.2"],
            "--cutoff must be one number or 3 numbers (cycles per pixel per axis), got (0.1, 0.2)",
        ),
        (
            ["--back-projector", "wiener-butterworth", "--cutoff", "a"],
            "--cutoff must be numbers separated by commas, got 'a'",
        ),
        (
            ["--iterations", "auto", "--auto-samples", "0"],
            "n_samples must be an integer >= 1, got 0",
        ),
        (
            ["--back-projector", "wiener-butterworth", "--acceleration", "nesterov"],
            "--acceleration nesterov applies to the classic back projector only; pass "
            "--back-projector classic or --acceleration none",
        ),
    ],
)
def test_bad_options_get_one_line(tmp_path, zarr3d, psf3d_file, capsys, extra, message):
    before = tree_digest(zarr3d)
    out = tmp_path / "out.zarr"
    code = main(["run", str(zarr3d), str(out), "--psf", str(psf3d_file), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [f"ssi-dask: error: {message}"]
    assert not out.exists()
    assert tree_digest(zarr3d) == before
