"""ssi-dask: deconvolve very large 2D/3D images in Zarr on a Dask cluster.

Methods: ``"lr"`` (Lucy-Richardson per chunk) and ``"ssi"`` (Self-Supervised Inversion,
Kobayashi et al. 2020).

The public names are imported on first use (module ``__getattr__``), so that ``import
ssi_dask`` and ``ssi-dask --help`` load neither Dask nor PyTorch: the command line starts in a
fraction of a second and Lucy-Richardson workers never pay torch's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the submodule that defines it (imported when the name is first used).
_LAZY = {
    "deconvolve": "blockwise",
    "plan_blocks": "blockwise",
    "ClusterSettings": "config",
    "Job": "config",
    "LayoutSettings": "config",
    "LRSettings": "config",
    "PSFSettings": "config",
    "SSISettings": "config",
    "TrainSettings": "config",
    "open_volume": "io",
    "richardson_lucy": "lr",
    "RunReport": "pipeline",
    "run": "pipeline",
    "load_psf": "psf",
    "protocol_psf": "psf",
    "widefield_psf": "psf",
    "write_zarr": "store",
    "train": "training",
    "verify_output": "verify",
}

__all__ = [
    "__version__",
    "ClusterSettings",
    "Job",
    "LRSettings",
    "LayoutSettings",
    "PSFSettings",
    "RunReport",
    "SSISettings",
    "TrainSettings",
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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .blockwise import deconvolve, plan_blocks
    from .config import (
        ClusterSettings,
        Job,
        LayoutSettings,
        LRSettings,
        PSFSettings,
        SSISettings,
        TrainSettings,
    )
    from .io import open_volume
    from .lr import richardson_lucy
    from .pipeline import RunReport, run
    from .psf import load_psf, protocol_psf, widefield_psf
    from .store import write_zarr
    from .training import train
    from .verify import verify_output


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, ``ssi_dask.lr``) on first use."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
