"""Shared fixtures: small volumes in real Zarr stores, PSF files, and a LocalCluster."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from ssi_dask.psf import widefield_psf

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tree_digest(path: Path) -> str:
    """Hash of every file (names and bytes) under ``path``: proves an input was not modified."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def smooth_volume(shape, seed=0, offset=0.1):
    """A positive test image with structure at several scales."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.random(shape), 1.5) + 0.5 * gaussian_filter(rng.random(shape), 4)
    image = (image - image.min()) / (image.max() - image.min())
    return (image + offset).astype(np.float32)


@pytest.fixture(scope="session")
def psf3d() -> np.ndarray:
    """A compact 3D widefield PSF (7x9x9), sum 1."""
    return widefield_psf((7, 9, 9), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)


@pytest.fixture(scope="session")
def psf2d() -> np.ndarray:
    return widefield_psf((9, 9), (0.15, 0.15), na=1.0, wavelength=0.52)


@pytest.fixture
def volume3d() -> np.ndarray:
    return smooth_volume((24, 64, 96), seed=1)


@pytest.fixture
def zarr3d(tmp_path, volume3d) -> Path:
    """The 3D test volume as a Zarr v3 array on disk with chunks (24, 16, 16)."""
    path = tmp_path / "input.zarr"
    array = zarr.create_array(
        store=str(path), shape=volume3d.shape, chunks=(24, 16, 16), dtype="float32"
    )
    array[...] = volume3d
    return path


@pytest.fixture
def psf3d_file(tmp_path, psf3d) -> Path:
    import tifffile

    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, psf3d)
    return path


@pytest.fixture(scope="session")
def local_client():
    """A real two-worker LocalCluster shared by the tests of a session."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def console_command(script: str, module: str) -> list[str]:
    """The venv's console script ``script``, or ``python -m module`` where it is not installed."""
    import sys

    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def cli_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_cli(*args, timeout: float = 240, **options) -> subprocess.CompletedProcess:
    """Run ``ssi-dask ARGS`` as a real command; stdout and stderr captured as text."""
    return subprocess.run(
        [*console_command("ssi-dask", "ssi_dask"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        **options,
    )
