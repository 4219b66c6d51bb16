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


def test_demo_rejects_missing_image(tmp_path):
    result = run_cli("demo", "--image", tmp_path / "nope.png", "--out", tmp_path / "o")
    _assert_clean_failure(result, "does not exist; check the path given to --image")
