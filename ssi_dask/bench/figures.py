"""PNG figures of restorations (matplotlib, no display needed)."""

from __future__ import annotations

import os

import numpy as np


def _view(image: np.ndarray) -> np.ndarray:
    """A 2D view: the image itself, or the middle z plane of a volume."""
    image = np.asarray(image)
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _inset_box(truth: np.ndarray, size: int) -> tuple[int, int, int]:
    """Top-left corner and side of the square with the most fine detail in ``truth``."""
    from scipy import ndimage  # noqa: PLC0415

    size = int(min(size, *truth.shape))
    detail = np.abs(ndimage.laplace(truth.astype(np.float64)))
    total = ndimage.uniform_filter(detail, size, mode="constant")
    half = size // 2
    inner = total[half : truth.shape[0] - size + half + 1, half : truth.shape[1] - size + half + 1]
    y, x = np.unravel_index(int(np.argmax(inner)), inner.shape)
    return int(y), int(x), size


def protocol_figure(result, path: str | os.PathLike, title: str = "") -> None:
    """Ground truth, input, best LR and SSI side by side with their PSNR/SSIM, zoomed insets
    of the region with the most fine detail, and a line profile through it, as a PNG.

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
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    panels = [
        ("ground truth", "ground_truth", None),
        ("input", "input", "input"),
        (f"best LR (n={result.best_lr_iterations})", "best-lr", "best-lr"),
    ]
    if "ssi" in result.images:
        panels.append(("SSI", "ssi", "ssi"))
    truth = _view(result.images["ground_truth"])
    y0, x0, side = _inset_box(truth, max(24, min(truth.shape) // 4))
    row = y0 + side // 2
    figure = plt.figure(figsize=(3.6 * len(panels), 3.6 * 2 + 2.6))
    grid = figure.add_gridspec(3, len(panels), height_ratios=(1, 1, 0.75))
    colours = {
        "ground_truth": "black",
        "input": "tab:gray",
        "best-lr": "tab:blue",
        "ssi": "tab:red",
    }
    profile_axis = figure.add_subplot(grid[2, :])
    for column, (label, image_key, metric_key) in enumerate(panels):
        view = _view(result.images[image_key])
        top = figure.add_subplot(grid[0, column])
        top.imshow(view, cmap="gray", vmin=0, vmax=1)
        top.add_patch(Rectangle((x0, y0), side, side, fill=False, edgecolor="yellow", lw=1))
        if metric_key is not None:
            values = result.metrics[metric_key]
            label = f"{label}\nPSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.3f}"
        top.set_title(label, fontsize=10)
        top.axis("off")
        zoom = figure.add_subplot(grid[1, column])
        zoom.imshow(view[y0 : y0 + side, x0 : x0 + side], cmap="gray", vmin=0, vmax=1)
        zoom.axhline(side // 2, color="yellow", lw=0.8, ls="--")
        zoom.set_title("zoom (yellow box)", fontsize=9)
        zoom.axis("off")
        profile_axis.plot(
            np.arange(x0, x0 + side),
            view[row, x0 : x0 + side],
            color=colours[image_key],
            lw=1.6 if image_key == "ground_truth" else 1.1,
            label=label.split("\n")[0],
        )
    plane = " (middle z plane)" if result.images["ground_truth"].ndim == 3 else ""
    profile_axis.set_title(f"line profile along the dashed line, row {row}{plane}", fontsize=9)
    profile_axis.set_xlabel("x (pixels)")
    profile_axis.set_ylabel("intensity")
    profile_axis.legend(fontsize=8, ncol=len(panels), loc="upper right")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.96) if title else None)
    figure.savefig(path, dpi=100)
    plt.close(figure)
