"""ssi-dask: deconvolve very large 2D/3D images in Zarr on a Dask cluster.

Methods: ``"lr"`` (Lucy-Richardson per chunk) and ``"ssi"`` (Self-Supervised Inversion,
Kobayashi et al. 2020).
"""

from __future__ import annotations

__version__ = "0.1.0"
