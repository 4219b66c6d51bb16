"""SSI's output range from the forward model and the self-check of clipped / underfit outputs.

Real torch training on small generated images (tiny networks, few steps).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ssi_dask.config import TrainingRecipe
from ssi_dask.errors import ParameterError
from ssi_dask.ssi import train_ssi
from ssi_dask.ssi.train import TrainingPrinter, object_range


def _psf(n=9, sigma=1.6):
    r = np.arange(n) - n // 2
    g = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _beads(shape=(96, 96), seed=0, count=40):
    """Sparse point-like beads: their blurred peaks are far below the object's."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    ys = rng.integers(6, shape[0] - 6, count)
    xs = rng.integers(6, shape[1] - 6, count)
    img[ys, xs] = rng.uniform(0.5, 1.0, count)
    return img


def _blurred(truth, psf, noise, seed=0):
    rng = np.random.default_rng(seed)
    y = fftconvolve(truth, psf, mode="same") + noise * rng.standard_normal(truth.shape)
    return y.astype(np.float32)


SMALL = dict(patch_size=48, batch_size=4, levels=2, base_channels=4, eval_every=20, restarts=0)


def test_auto_output_range_bounds_every_non_negative_object():
    psf = _psf()
    lo, hi = object_range(psf)
    assert lo == 0.0 and hi == pytest.approx(1.0 / float(psf.max()), rel=1e-6)
    # no non-negative object exceeds its blurred image's maximum divided by the PSF's peak,
    # and a single point reaches the bound
    rng = np.random.default_rng(1)
    for truth in (_beads(seed=2), rng.uniform(0, 1, (64, 64)), np.pad([[1.0]], 20)):
        blurred = fftconvolve(truth, psf, mode="same")
        assert truth.max() <= blurred.max() * hi * (1 + 1e-6)
    point = np.pad([[1.0]], 20)
    assert fftconvolve(point, psf, mode="same").max() * hi == pytest.approx(1.0, rel=1e-5)


def test_recipe_output_range_accepts_auto_or_a_pair():
    assert TrainingRecipe().output_range == "auto"
    assert TrainingRecipe(output_range=(0, 2)).output_range == (0.0, 2.0)
    with pytest.raises(ParameterError, match="output_range must be 'auto' or \\(low, high\\)"):
        TrainingRecipe(output_range="wide")


def test_self_check_flags_a_far_too_low_output_range_and_passes_the_auto_one():
    psf = _psf()
    y = _blurred(_beads(seed=3, count=60), psf, noise=0.04, seed=3)
    printed = []
    printer = TrainingPrinter(interval=1e9)
    printer._print = printed.append
    low = train_ssi(y, psf, seed=0, steps=30, output_range=(0.0, 0.3), progress=printer, **SMALL)
    check = low.training["self_check"]
    assert low.normalisation["output_range"] == (0.0, 0.3)
    assert "clipped" in check["flags"] and not check["passed"]
    assert check["at_bound"] > check["at_bound_limit"] == pytest.approx(1e-4)
    assert any("self-check flagged clipped" in line for line in printed)

    auto = train_ssi(y, psf, seed=0, steps=40, **SMALL)
    lo, hi = auto.normalisation["output_range"]
    assert (lo, hi) == pytest.approx(object_range(psf))
    check = auto.training["self_check"]
    assert check["at_bound"] <= check["at_bound_limit"]
    assert "clipped" not in check["flags"]
    assert auto.training["output_range"]["rule"].startswith("auto")


def test_self_check_flags_an_underfit_output_and_not_a_trained_one():
    psf = _psf()
    y = _blurred(_beads(seed=3, count=60), psf, noise=0.04, seed=3)
    # three steps: the output does not explain the data beyond the noise where LR does
    underfit = train_ssi(y, psf, seed=0, steps=3, **SMALL)
    check = underfit.training["self_check"]
    ratios = check["residual_to_noise"]
    assert "underfit" in check["flags"] and not check["passed"]
    assert ratios["ssi"]["bright"] - 1 > check["underfit_excess_limit"]
    assert min(ratios[f"lr{n}"]["bright"] for n in (2, 5, 10, 20)) < ratios["ssi"]["bright"]

    trained = train_ssi(y, psf, seed=0, steps=150, **SMALL)
    check = trained.training["self_check"]
    assert check["flags"] == [] and check["passed"]
    assert check["residual_to_noise"]["ssi"]["bright"] < 1 + check["underfit_excess_limit"]
