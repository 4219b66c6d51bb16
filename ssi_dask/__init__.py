"""ssi-dask: deconvolve very large 2D/3D images in Zarr on a Dask cluster.

Methods: ``"lr"`` (Lucy-Richardson per chunk) and ``"ssi"`` (Self-Supervised Inversion,
Kobayashi et al. 2020).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .blockwise import deconvolve, plan_blocks  # noqa: E402
from .io import open_volume  # noqa: E402
from .lr import richardson_lucy  # noqa: E402
from .psf import load_psf, protocol_psf, widefield_psf  # noqa: E402
from .store import write_zarr  # noqa: E402
from .training import train  # noqa: E402

__all__ = [
    "__version__",
    "deconvolve",
    "load_psf",
    "open_volume",
    "plan_blocks",
    "protocol_psf",
    "richardson_lucy",
    "train",
    "widefield_psf",
    "write_zarr",
]
