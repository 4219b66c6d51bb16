"""ssi-dask: deconvolve very large 2D/3D images in Zarr on a Dask cluster.

Methods: ``"lr"`` (Lucy-Richardson per chunk) and ``"ssi"`` (Self-Supervised Inversion,
Kobayashi et al. 2020).
"""

from __future__ import annotations

from ._version import __version__
from .blockwise import deconvolve, plan_blocks  # noqa: E402
from .config import (  # noqa: E402
    ClusterSettings,
    Job,
    LayoutSettings,
    LRSettings,
    PSFSettings,
    SSISettings,
    TrainingRecipe,
    TrainSettings,
)
from .io import open_volume  # noqa: E402
from .lr import richardson_lucy  # noqa: E402
from .pipeline import RunReport, run  # noqa: E402
from .psf import load_psf, protocol_psf, widefield_psf  # noqa: E402
from .store import write_zarr  # noqa: E402
from .verify import verify_output  # noqa: E402

__all__ = [
    "ClusterSettings",
    "Job",
    "LRSettings",
    "LayoutSettings",
    "PSFSettings",
    "RunReport",
    "SSISettings",
    "TrainingRecipe",
    "TrainSettings",
    "__version__",
    "deconvolve",
    "load_psf",
    "open_volume",
    "plan_blocks",
    "protocol_psf",
    "richardson_lucy",
    "run",
    "train",
    "verify_output",
    "widefield_psf",
    "write_zarr",
]


def __getattr__(name: str):
    # ``train`` needs torch: imported on first use, so that LR workers (and ``import ssi_dask``)
    # do not pay torch's import time and ~180 MiB of memory.
    if name == "train":
        from .training import train  # noqa: PLC0415

        return train
    raise AttributeError(f"module 'ssi_dask' has no attribute {name!r}")
