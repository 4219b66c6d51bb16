"""`ssi-dask demo` and the protocol runner, checked against an independent recomputation."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from test_cli import _assert_clean_failure, run_cli

from ssi_dask.bench.demo import run_demo
from ssi_dask.bench.metrics import psnr, ssim
from ssi_dask.bench.synthetic import degrade, ground_truth_2d, load_ground_truth
from ssi_dask.lr import richardson_lucy
from ssi_dask.psf import protocol_psf


def test_demo_writes_figure_and_metrics(tmp_path):
    truth = ground_truth_2d("camera", size=96)
    image_path = tmp_path / "tiny.png"
    Image.fromarray(np.round(truth * 255).astype(np.uint8)).save(image_path)
    lines = []
    report = run_demo(
        2,
        image_path,
        tmp_path / "out",
        seed=4,
        device="cpu",
        ssi_options={"steps": 20, "restarts": 0},
        progress=False,
        log=lines.append,
    )
    figure = tmp_path / "out" / "demo_tiny.png"
    stored = json.loads((tmp_path / "out" / "demo_tiny.json").read_text())
    assert figure.stat().st_size > 10_000
    assert Image.open(figure).size[0] > Image.open(figure).size[1]  # panels side by side
    assert stored["metrics"] == report["metrics"]
    # independent recomputation of the input and LR rows
    reference = load_ground_truth(image_path)
    degraded = degrade(reference, protocol_psf(2), seed=4)
    assert stored["metrics"]["input"]["psnr"] == np.float64(psnr(reference, degraded)).item()
    for n in (2, 5, 10, 20):
        restored = np.clip(richardson_lucy(degraded, protocol_psf(2), num_iter=n), 0, 1)
        assert abs(stored["metrics"][f"lr-{n}"]["psnr"] - psnr(reference, restored)) < 1e-6
        assert abs(stored["metrics"][f"lr-{n}"]["ssim"] - ssim(reference, restored)) < 1e-6
    best = max((2, 5, 10, 20), key=lambda n: stored["metrics"][f"lr-{n}"]["psnr"])
    assert stored["best_lr_iterations"] == best
    assert set(stored["metrics"]["ssi"]) == {"psnr", "ssim", "mi", "smi"}
    assert any("| restoration | PSNR (dB)" in line for line in lines)
    # each metric explained in one line under the table, and the margin stated
    for metric in ("PSNR", "SSIM", "MI", "SMI"):
        assert sum(line.strip().startswith(f"{metric}: ") for line in lines) == 1
    margin = stored["metrics"]["ssi"]["psnr"] - stored["metrics"]["best-lr"]["psnr"]
    assert stored["ssi_minus_best_lr"]["psnr_db"] == margin
    assert any(line.startswith(f"SSI vs the best LR (n={best}") and f"{margin:+.2f} dB" in line
               for line in lines)  # fmt: skip


def test_builtin_demo_scenes_are_microscopy_like():
    from scipy import ndimage

    from ssi_dask.bench.demo import DEMO_SHAPE, demo_ground_truth
    from ssi_dask.bench.figures import _inset_box

    for dim in (2, 3):
        truth, name = demo_ground_truth(dim)
        assert truth.shape == DEMO_SHAPE[dim] and name == f"cells{dim}d"
        assert truth.dtype == np.float32 and truth.min() == 0 and truth.max() == 1
        np.testing.assert_array_equal(truth, demo_ground_truth(dim)[0])  # generated, seeded
        # mostly dark background with bright thin structures and dim large nuclei
        assert 0.4 < float(np.mean(truth < 0.02)) < 0.95
        labels, count = ndimage.label(truth > 0.2)
        assert count >= 10
    truth, _ = demo_ground_truth(2)
    y, x, side = _inset_box(truth, 64)
    assert side == 64 and 0 <= y <= 256 - 64 and 0 <= x <= 256 - 64
    detail = np.abs(ndimage.laplace(truth.astype(np.float64)))
    assert detail[y : y + 64, x : x + 64].sum() >= detail[:64, :64].sum()  # the busiest box


def test_demo_rejects_missing_image(tmp_path):
    result = run_cli("demo", "--image", tmp_path / "nope.png", "--out", tmp_path / "o")
    _assert_clean_failure(result, "does not exist; check the path given to --image")
