"""``ssi-dask demo``: the protocol on a built-in (or given) ground truth, with a figure."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ParameterError


def demo_ground_truth(dim: int, image: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """The ground truth of the demo and its name.

    Built in: scikit-image's ``camera`` (512x512, shipped inside the package) in 2D, and a
    64^3 ``binary_blobs`` volume (METHOD.md's 3D demo) in 3D.
    """
    from .synthetic import ground_truth_2d, ground_truth_3d, load_ground_truth  # noqa: PLC0415

    if image is not None:
        path = Path(image)
        if not path.exists():
            raise InputError(f"image {str(path)!r} does not exist; check the path given to --image")
        truth = load_ground_truth(path)
        if truth.ndim != dim:
            raise InputError(
                f"image {str(path)!r} is {truth.ndim}D but --dim is {dim}; pass --dim {truth.ndim}"
            )
        return truth, path.stem
    if dim == 2:
        return ground_truth_2d("camera"), "camera"
    if dim == 3:
        return ground_truth_3d((64, 64, 64), seed=1), "blobs64"
    raise ParameterError(f"--dim must be 2 or 3, got {dim}")


def run_demo(
    dim: int = 2,
    image: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "demo-out",
    *,
    seed: int = 0,
    device: str = "auto",
    ssi_options: dict | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Degrade, restore with LR (2/5/10/20 iterations) and SSI, and report.

    Writes ``DIR/demo_<name>.png`` (ground truth, input, best LR, SSI) and
    ``DIR/demo_<name>.json`` (metrics, timings). Returns the JSON content.
    """
    from ..psf import protocol_psf  # noqa: PLC0415
    from .figures import protocol_figure  # noqa: PLC0415
    from .protocol import run_protocol  # noqa: PLC0415

    truth, name = demo_ground_truth(dim, image)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    psf = protocol_psf(dim)
    log(f"demo: {name} {truth.shape}, protocol PSF {psf.shape}, seed {seed}")
    result = run_protocol(
        truth, psf, seed=seed, device=device, ssi_options=ssi_options, progress=progress, log=log
    )
    log(result.table())
    report = {
        "image": name,
        "shape": list(truth.shape),
        "seed": seed,
        "ssim_data_range": 1.0,
        "best_lr_iterations": result.best_lr_iterations,
        "metrics": result.metrics,
        "times_s": {k: round(v, 3) for k, v in result.times.items()},
        "training": result.info,
    }
    figure_path = out / f"demo_{name}.png"
    json_path = out / f"demo_{name}.json"
    protocol_figure(result, figure_path, title=f"{name}: protocol degradation, seed {seed}")
    json_path.write_text(json.dumps(report, indent=2))
    log(f"wrote {figure_path} and {json_path}")
    return report
