"""PNG figures of restorations (matplotlib, no display needed)."""

from __future__ import annotations

import os

import numpy as np


def _view(image: np.ndarray) -> np.ndarray:
    """A 2D view: the image itself, or the middle z plane of a volume."""
    image = np.asarray(image)
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def protocol_figure(result, path: str | os.PathLike, title: str = "") -> None:
    """Ground truth, input, best LR and SSI side by side with their PSNR/SSIM, as a PNG.

    Parameters
    ----------
    result : ssi_dask.bench.protocol.ProtocolResult
        The run to show.
    path : str or path-like
        Where to write the PNG.
    title : str
        Figure title.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [
        ("ground truth", "ground_truth", None),
        ("input", "input", "input"),
        (f"best LR (n={result.best_lr_iterations})", "best-lr", "best-lr"),
    ]
    if "ssi" in result.images:
        panels.append(("SSI", "ssi", "ssi"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for axis, (label, image_key, metric_key) in zip(axes[0], panels):
        axis.imshow(_view(result.images[image_key]), cmap="gray", vmin=0, vmax=1)
        if metric_key is not None:
            values = result.metrics[metric_key]
            label = f"{label}\nPSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.3f}"
        axis.set_title(label, fontsize=10)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.92) if title else None)
    figure.savefig(path, dpi=110)
    plt.close(figure)
