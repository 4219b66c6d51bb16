"""Example data the project makes itself: a blurred, noisy 3D volume in Zarr and its PSF."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import OutputError
from .psf import psf_written_by_ssi_dask, save_psf, widefield_psf
from .safety import (
    check_output_target,
    check_replaceable_file,
    claim_output,
    is_zarr_node,
    resolved,
)

#: Optics of the example: a water-immersion widefield microscope.
EXAMPLE_VOXEL_SIZE = (0.4, 0.2, 0.2)
EXAMPLE_OPTICS = {"na": 1.0, "wavelength": 0.52, "refractive_index": 1.33}


def make_example(
    directory: str | os.PathLike,
    *,
    shape: tuple[int, int, int] = (64, 512, 512),
    chunks: tuple[int, int, int] = (32, 128, 128),
    seed: int = 0,
    psf: np.ndarray | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``volume.zarr`` (uint16, Zarr v3), ``ground_truth.zarr`` and ``psf.tif``.

    The ground truth is a seeded field of blobs and filaments (smoothed noise, thresholded),
    blurred with a widefield PSF and given Poisson and camera noise.

    Returns
    -------
    dict
        Paths of ``volume``, ``ground_truth`` and ``psf``.
    """
    import zarr  # noqa: PLC0415
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    from .psf import blur  # noqa: PLC0415

    given = Path(directory)
    if given.is_symlink() and not given.exists():
        raise OutputError(
            f"{str(given)!r} is a broken symbolic link; give a real folder for the example"
        )
    directory = resolved(given)  # every check and write below uses this one path
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{str(directory)!r} exists and is not a folder; choose another DIR")
    if is_zarr_node(directory):
        raise OutputError(
            f"{str(directory)!r} is a Zarr store; give a plain folder for the example files"
        )
    paths = {
        "volume": directory / "volume.zarr",
        "ground_truth": directory / "ground_truth.zarr",
        "psf": directory / "psf.tif",
    }
    if not directory.exists():
        if not directory.parent.is_dir():
            raise OutputError(
                f"the folder of {str(directory)!r} does not exist; create "
                f"{str(directory.parent)!r} first"
            )
        directory.mkdir()  # new and empty: nothing in it can be refused below
    # Every check before anything is written or deleted: only stores this tool made are
    # replaced (see ssi_dask.safety), and the PSF only when ssi-dask wrote it.
    for name in ("volume", "ground_truth"):
        check_output_target(paths[name], overwrite=overwrite)
    check_replaceable_file(paths["psf"], overwrite=overwrite)
    if paths["psf"].exists() and not psf_written_by_ssi_dask(paths["psf"]):
        raise OutputError(
            f"{str(paths['psf'])!r} was not written by ssi-dask; refusing to replace it with "
            "--overwrite, move it away or choose another DIR"
        )
    rng = np.random.default_rng(seed)
    # Blobs and filaments on the requested shape itself (skimage's binary_blobs only makes
    # cubes, and a 1024^3 cube to crop 64 planes from would cost 4 GiB).
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3.0)
    blobs = field > np.quantile(field[:: max(1, shape[0] // 8)], 0.85)
    truth = gaussian_filter(blobs.astype(np.float32), 0.7)
    truth = 1000.0 * truth / truth.max() + 20.0
    if psf is None:
        psf = widefield_psf((17, 17, 17), EXAMPLE_VOXEL_SIZE, **EXAMPLE_OPTICS)
    blurred = np.clip(blur(truth, psf), 0, None)
    noisy = rng.poisson(blurred).astype(np.float32) + rng.normal(100.0, 3.0, shape)
    volume = np.clip(np.round(noisy), 0, 65535).astype(np.uint16)
    for name, data, dtype in (("volume", volume, "uint16"), ("ground_truth", truth, "float32")):
        with claim_output(paths[name], overwrite=overwrite) as store:
            array = zarr.create_array(
                store=str(store),
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                attributes={"voxel_size_um": list(EXAMPLE_VOXEL_SIZE)},
            )
            array[...] = data
    save_psf(paths["psf"], psf, EXAMPLE_VOXEL_SIZE)
    return paths
