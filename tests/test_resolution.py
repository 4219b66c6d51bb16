"""``run`` warns when the PSF is wider than the data's measured resolution, and when an
OME-Zarr output would get no voxel size; measured on the SSI protocol's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli
from scipy import ndimage

from ssi_dask.bench.synthetic import _centre_crop, degrade, ground_truth_2d, load_ground_truth
from ssi_dask.psf import normalize_psf, protocol_psf
from ssi_dask.resolution import check_resolution, sample_planes

PROTOCOL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ssi2d"
IMAGES = sorted(PROTOCOL_IMAGES.glob("*.png")) if PROTOCOL_IMAGES.is_dir() else []


def _too_wide(psf: np.ndarray) -> np.ndarray:
    """The same PSF twice as wide (as with a wrong voxel size or NA)."""
    return normalize_psf(np.clip(ndimage.zoom(psf, 2, order=1), 0, None))


@pytest.mark.skipif(not IMAGES, reason=f"protocol images not found in {PROTOCOL_IMAGES}")
def test_protocol_images_right_psf_no_warning_twice_too_wide_warns():
    psf = protocol_psf(2)
    wide = _too_wide(psf)
    warned = {}
    for path in IMAGES:
        truth = load_ground_truth(path)
        truth = _centre_crop(truth, tuple(min(s, 640) for s in truth.shape))
        planes = sample_planes(degrade(truth, psf, seed=0))
        right = check_resolution(planes, psf)
        assert right.warning() is None, (path.name, right)
        assert right.data_cutoff <= right.psf_cutoff  # the data show no more than it transmits
        warned[path.name] = check_resolution(planes, wide).too_wide
    # drosophilaslice shows no detail beyond 0.03 cycles/pixel, which even the 2x PSF passes
    assert sum(warned.values()) >= len(IMAGES) - 1, warned


def test_builtin_image_right_and_too_wide_psf():
    psf = protocol_psf(2)
    planes = sample_planes(degrade(ground_truth_2d("camera", size=384), psf, seed=1))
    assert check_resolution(planes, psf).warning() is None
    wide = check_resolution(planes, _too_wide(psf))
    assert wide.too_wide and wide.psf_cutoff < check_resolution(planes, psf).psf_cutoff
    assert wide.warning().startswith("warning: the PSF looks too wide for these data: ")


def test_run_warns_about_a_wide_psf_and_a_missing_voxel_size(tmp_path):
    psf = protocol_psf(2)
    image = degrade(ground_truth_2d("camera", size=256), psf, seed=0)
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "psf.tif", psf)
    tifffile.imwrite(tmp_path / "wide.tif", _too_wide(psf))
    base = ["run", tmp_path / "image.tif"]
    right = run_cli(*base, tmp_path / "a.zarr", "--psf", tmp_path / "psf.tif", "--dry-run")
    assert right.returncode == 0, right.stderr
    assert "warning" not in right.stdout + right.stderr
    wide = run_cli(*base, tmp_path / "b.zarr", "--psf", tmp_path / "wide.tif", "--dry-run")
    assert wide.returncode == 0, wide.stderr
    lines = [line.strip() for line in wide.stdout.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "warning: the PSF looks too wide for these data: the image holds detail up to "
    )
    assert lines[0].endswith("check the PSF's optics (--na, --wavelength) and --voxel-size")
    ome = [*base, tmp_path / "c.ome.zarr", "--psf", tmp_path / "psf.tif", "--dry-run"]
    missing = run_cli(*ome, "--output-format", "ome-zarr")
    assert missing.returncode == 0, missing.stderr
    assert (
        "warning: the input declares no voxel size, so the OME-Zarr output gets scale 1 "
        "without units: give --voxel-size DY,DX in micrometres" in missing.stdout
    )
    given = run_cli(*ome, "--output-format", "ome-zarr", "--voxel-size", "0.1,0.1")
    assert given.returncode == 0 and "warning" not in given.stdout, given.stderr
    assert not any((tmp_path / name).exists() for name in ("a.zarr", "b.zarr", "c.ome.zarr"))
