"""``ssi-dask psf`` picks a shape holding >= 99 % of the PSF's energy and warns on truncation."""

from __future__ import annotations

import numpy as np
import tifffile
from conftest import run_cli

from ssi_dask.psf import energy_held, energy_psf_shape, widefield_psf

OPTICS_2D = dict(na=1.0, wavelength=0.5)
VOXEL_2D = (0.1, 0.1)


def test_default_shape_is_the_smallest_holding_99_percent():
    shape, held = energy_psf_shape(VOXEL_2D, **OPTICS_2D)
    assert shape[0] == shape[1] and shape[0] % 2 == 1
    assert held >= 0.99
    assert energy_held(shape, VOXEL_2D, **OPTICS_2D) >= 0.99
    smaller = (shape[0] - 2, shape[1] - 2)
    assert energy_held(smaller, VOXEL_2D, **OPTICS_2D) < 0.99


def test_energy_held_against_a_direct_sum():
    # independent reference: the crop's share of a much larger grid, computed here
    big = widefield_psf((201, 201), VOXEL_2D, **OPTICS_2D)
    crop = big[100 - 8 : 100 + 9, 100 - 8 : 100 + 9]
    assert abs(energy_held((17, 17), VOXEL_2D, **OPTICS_2D) - crop.sum() / big.sum()) < 0.01


def test_cli_psf_without_shape_and_with_a_truncating_shape(tmp_path):
    expected, held = energy_psf_shape((0.406, 0.406, 0.406), na=0.8, wavelength=0.6)
    common = ["--na", "0.8", "--wavelength", "0.6", "--voxel-size", "0.406,0.406,0.406"]
    result = run_cli("psf", tmp_path / "default.tif", *common)
    assert result.returncode == 0, result.stderr
    assert tifffile.imread(tmp_path / "default.tif").shape == expected
    assert f"holding {100 * held:.1f} % of the energy" in result.stdout
    assert result.stderr == ""
    cut = run_cli("psf", tmp_path / "cut.tif", *common, "--shape", "17,9,9")
    assert cut.returncode == 0, cut.stderr
    written = tifffile.imread(tmp_path / "cut.tif")
    assert written.shape == (17, 9, 9) and np.isclose(written.sum(), 1, atol=1e-4)
    share = energy_held((17, 9, 9), (0.406,) * 3, na=0.8, wavelength=0.6)
    assert cut.stderr.strip() == (
        f"warning: --shape 17,9,9 holds only {100 * share:.1f} % of the PSF's energy (measured "
        f"on a large grid): the rest is cut off; the default shape "
        f"{','.join(map(str, expected))} holds 99 %: leave out --shape or enlarge it"
    )
