"""SSI's output range from the forward model and the self-check of clipped / underfit outputs.

Real torch training on small generated images (tiny networks, few steps).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ssi_dask.bench.protocol import run_outcome
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


# a plain network (no Lucy-Richardson prior, which starts training at LR): a few steps of it
# underfit, which is what these tests need
SMALL = dict(
    patch_size=48, batch_size=4, levels=2, base_channels=4, eval_every=20, restarts=0, lr_prior=0
)


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


def test_every_run_is_self_checked_and_a_flagged_run_is_retried(monkeypatch):
    import ssi_dask.ssi.train as train_module

    calls = []
    real = train_module._lr_baselines

    def counted(*args, **kwargs):
        calls.append(kwargs.get("iters"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_lr_baselines", counted)
    psf = _psf()
    y = _blurred(_beads(seed=3, count=60), psf, noise=0.04, seed=3)
    printed = []
    printer = TrainingPrinter(interval=1e9)
    printer._print = printed.append
    options = dict(SMALL, restarts=1)
    model = train_ssi(
        y, psf, seed=0, steps=30, output_range=(0.0, 0.3), progress=printer, **options
    )
    training = model.training
    # the range (0, 0.3) clips both runs' outputs: the first is retried with the next seed
    runs = [e for e in model.log if "failed" in e]
    assert [r["seed"] for r in runs] == [0, 1000]
    assert all(r["failed"] and "clipped" in r["reasons"] for r in runs)
    assert all("clipped" in r["self_check_flags"] and r["at_bound"] > 1e-4 for r in runs)
    assert (training["runs"], training["runs_retried"], training["failed_runs"]) == (2, 1, 2)
    assert [r["flags"] for r in training["run_checks"]] == [r["self_check_flags"] for r in runs]
    assert [r["val_loss"] for r in training["run_checks"]] == [r["best_val_loss"] for r in runs]
    # every run failed: the best by validation loss is kept, and the check says so
    best = min(runs, key=lambda r: r["best_val_loss"])
    assert training["selected_run"] == best["run"]
    assert training["val_loss"] == best["best_val_loss"]
    check = training["self_check"]
    assert not check["passed"] and check["every_run_failed"] and "clipped" in check["flags"]
    assert check["at_bound"] == best["at_bound"]
    # the Lucy-Richardson baselines ran once for the whole call (both runs' checks share them)
    assert len(calls) == 1 and max(calls[0]) == 200
    assert set(check["residual_to_noise"]) == {"ssi", "identity"} | {
        f"lr{n}" for n in (2, 5, 10, 20, 50, 100, 200)
    }
    # the benchmarks' record of the runs
    outcome = run_outcome(model)
    assert (outcome["runs"], outcome["runs_retried"], outcome["failed_runs"]) == (2, 1, 2)
    assert outcome["failed_reasons"] == [
        f"run {r['run'] + 1}: {'+'.join(r['reasons'])}" for r in runs
    ]
    assert outcome["self_check_flags"] == check["flags"] and not outcome["self_check_passed"]
    # the printer says why the first run failed and that it is retried, then sums up
    first = next(line for line in printed if line.startswith("[ssi] run 1 failed"))
    assert "clipped: " in first and "at its upper bound 0.3" in first
    assert first.endswith("; retrying with another seed (restart 1 of 1)")
    second = next(line for line in printed if line.startswith("[ssi] run 2 failed"))
    assert second.endswith("; no restart left, the best runs are kept")
    assert printed[-1].startswith("[ssi] training done: 2 runs (1 retried; failed: run 1 ")
    assert printed[-1].endswith(
        "self-check FAILED ("
        + ", ".join((["validation"] if not training["beats_baselines"] else []) + check["flags"])
        + "): every run failed, the best by validation loss was kept"
    )


def test_a_run_that_passes_both_checks_is_not_retried():
    psf = _psf()
    y = _blurred(_beads(seed=3, count=60), psf, noise=0.04, seed=3)
    model = train_ssi(y, psf, seed=0, steps=150, **dict(SMALL, restarts=1))
    training = model.training
    assert (training["runs"], training["runs_retried"], training["failed_runs"]) == (1, 0, 0)
    (run,) = training["run_checks"]
    assert run == dict(
        run=0, seed=0, failed=False, reasons=[], val_loss=training["val_loss"], flags=[]
    )
    check = training["self_check"]
    assert check["passed"] and not check["every_run_failed"] and check["flags"] == []
    # the returned network is the run's: its check is the one recorded for the run
    (entry,) = [e for e in model.log if "failed" in e]
    assert entry["residual_to_noise"] == check["residual_to_noise"]["ssi"]
