"""Self-supervised choice of the iteration count against PSNR on volumes with ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from ssi_dask import deconvolve
from ssi_dask.bench.metrics import psnr
from ssi_dask.bench.synthetic import degrade
from ssi_dask.errors import ParameterError
from ssi_dask.lr import get_plan, resolve_back_projector, richardson_lucy
from ssi_dask.lr_auto import (
    choose_iterations,
    holdout_errors,
    holdout_products,
    sample_slices,
)


def gaussian_psf(shape, sigmas):
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    psf = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigmas, strict=True)))
    return (psf / psf.sum()).astype(np.float32)


def synthetic_volume(shape, seed):
    """Ground truth in [0, 1]: small bright spots plus a dimmer blobby background."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    truth[tuple(rng.integers(3, n - 3, shape[1] * 3) for n in shape)] = 1
    truth = gaussian_filter(truth, 1.0)
    truth = truth / truth.max() + 0.4 * (gaussian_filter(rng.random(shape), 4) > 0.5)
    return (truth / truth.max()).astype(np.float32)


def psnr_curve(image, psf, truth, max_iter, **bp):
    """PSNR (outputs clipped to [0, 1]) after every iteration 1..max_iter, in one run."""
    spec = resolve_back_projector(psf, **bp)
    plan = get_plan(psf, image.shape, back_projector=spec)
    curve = {}
    plan.deconvolve(
        image, max_iter, callback=lambda n, x: curve.__setitem__(n, psnr(truth, np.clip(x, 0, 1)))
    )
    return curve


@pytest.fixture(scope="module")
def psf():
    return gaussian_psf((11, 11, 11), (2.0, 1.3, 1.3))


@pytest.mark.parametrize(("seed", "noise"), [(1, 0.05), (2, 0.1)])
def test_auto_classic_within_half_db_of_best_fixed_n(psf, seed, noise):
    truth = synthetic_volume((32, 96, 96), seed)
    image = degrade(truth, psf, seed=seed, gaussian_std=noise, salt_and_pepper=0, bits=None)
    curve = psnr_curve(image, psf, truth, 50, back_projector="classic")
    best_n = max(curve, key=curve.get)
    assert 2 < best_n < 50  # an interior optimum: the choice matters
    choice = choose_iterations(image, psf, sample_shape=(32, 64, 64), n_samples=2, seed=seed)
    assert 1 <= choice.num_iter <= 50 and choice.wiener_alpha is None
    assert curve[choice.num_iter] >= curve[best_n] - 0.5
    # and it is a real choice: counts in the range differ by far more than the tolerance
    assert min(curve.values()) < curve[best_n] - 1.5


def test_auto_wiener_butterworth_chooses_n_and_alpha(psf):
    truth = synthetic_volume((32, 96, 96), 2)
    image = degrade(truth, psf, seed=2, gaussian_std=0.1, salt_and_pepper=0, bits=None)
    alphas = (0.003, 0.01, 0.03, 0.1, 0.3)
    curves = {
        a: psnr_curve(image, psf, truth, 10, back_projector="wiener-butterworth", wiener_alpha=a)
        for a in alphas
    }
    best = max(v for curve in curves.values() for v in curve.values())
    choice = choose_iterations(image, psf, back_projector="wiener-butterworth", seed=2)
    assert choice.wiener_alpha in alphas and 1 <= choice.num_iter <= 10
    assert curves[choice.wiener_alpha][choice.num_iter] >= best - 0.5
    assert set(choice.errors) == {f"{a:g}" for a in alphas}
    worst = min(v for curve in curves.values() for v in curve.values())
    assert worst < best - 1.5


def reference_masked_rl(image, psf, num_iter, keep, edge_threshold=1e-3, eps=1e-6):
    """Classic RL on the extended domain (fftconvolve, float64) with a data mask.

    Returns the squared prediction errors of the held-out pixels after each iteration.
    """
    y = np.asarray(image, np.float64)
    h = np.asarray(psf, np.float64) / np.sum(psf)
    h_flip = h[(slice(None, None, -1),) * h.ndim]
    weights = fftconvolve(keep.astype(np.float64), h_flip, mode="full")
    ok = weights > edge_threshold * weights.max()
    inv_w = np.where(ok, 1.0 / np.where(ok, weights, 1.0), 0.0)
    x = np.full(tuple(n + k - 1 for n, k in zip(y.shape, h.shape)), y[keep].mean())
    errors = []
    for _ in range(num_iter + 1):
        blurred = fftconvolve(x, h, mode="valid")
        errors.append(((blurred - y)[~keep] ** 2).sum())
        x = x * fftconvolve(keep * y / np.maximum(blurred, eps), h_flip, mode="full") * inv_w
    return np.asarray(errors)


def test_holdout_errors_match_reference_and_never_see_the_held_out_pixels():
    rng = np.random.default_rng(0)
    psf = gaussian_psf((7, 9), (1.5, 2.0))
    image = (fftconvolve(rng.random((40, 50)) + 0.1, psf, mode="same")).astype(np.float32)
    held = rng.random(image.shape) < 0.1
    plan = get_plan(psf, image.shape)
    ours = plan.holdout_errors(image, held, 8, workers=1)
    assert ours.shape == (9, 2)
    ref = reference_masked_rl(image, psf, 8, ~held)
    np.testing.assert_allclose(ours[:, 0], ref, rtol=1e-4)
    # J-invariance: with wildly different values at the held-out pixels the predictions stay
    # those of the estimate that never saw them (the reference multiplies y by the mask)
    changed = image.copy()
    changed[held] += rng.normal(0, 0.5, held.sum()).astype(np.float32)
    np.testing.assert_allclose(
        plan.holdout_errors(changed, held, 8, workers=1)[:, 0],
        reference_masked_rl(changed, psf, 8, ~held),
        rtol=1e-4,
    )


def test_sample_slices_are_distinct_seeded_and_inside():
    slices = sample_slices((40, 300, 200), (32, 64, 64), 5, seed=3)
    assert len(slices) == 5
    assert slices == sample_slices((40, 300, 200), (32, 64, 64), 5, seed=3)
    assert slices != sample_slices((40, 300, 200), (32, 64, 64), 5, seed=4)
    starts = {tuple(s.start for s in where) for where in slices}
    assert len(starts) == 5
    for where in slices:
        assert [s.stop - s.start for s in where] == [32, 64, 64]
        assert all(0 <= s.start and s.stop <= n for s, n in zip(where, (40, 300, 200)))
    # a volume no larger than the box has one position
    assert sample_slices((20, 30), (64, 64), 4) == [(slice(0, 20), slice(0, 30))]


def test_deconvolve_auto_records_the_choice(psf):
    truth = synthetic_volume((24, 64, 64), 3)
    image = degrade(truth, psf, seed=3, gaussian_std=0.05, salt_and_pepper=0, bits=None)
    options = {"max_iter": 12, "n_samples": 1}
    lazy = deconvolve(
        image,
        psf,
        num_iter="auto",
        back_projector="wiener-butterworth",
        auto_options=options,
        chunks=(24, 32, 64),
    )
    choice = lazy.auto_choice
    # with user-set chunks only the counts whose halo fits them are tried (as on the CLI)
    assert 1 <= choice.max_iter < 12
    with pytest.raises(ParameterError, match=r"use larger chunks= \(e.g. chunks=\("):
        deconvolve(image, psf, num_iter=choice.max_iter + 1,
                   back_projector="wiener-butterworth", chunks=(24, 32, 64))  # fmt: skip
    assert choice == choose_iterations(
        image, psf, back_projector="wiener-butterworth", max_iter=choice.max_iter, n_samples=1
    )
    expected = richardson_lucy(
        image,
        psf,
        choice.num_iter,
        back_projector="wiener-butterworth",
        wiener_alpha=choice.wiener_alpha,
    )
    result = lazy.compute(scheduler="threads")
    assert float(np.abs(result - expected).max() / np.abs(expected).max()) < 1e-3
    record = choice.as_dict()
    assert record["num_iter"] == choice.num_iter and record["wiener_alpha"] == choice.wiener_alpha
    assert len(record["errors"]["0.1"]) == choice.max_iter + 1  # n = 0 .. max_iter


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
        ({"density": 0.6}, "density must be below 0.5 (a fraction held out), got 0.6"),
        ({"n_samples": 0}, "n_samples must be an integer >= 1, got 0"),
        ({"rule": "minimum"}, "rule must be one of one-se, paired, got 'minimum'"),
        (
            {"alphas": (0.1,)},
            "alphas only apply to the Wiener-Butterworth back projector",
        ),
        (
            {"sample_shape": (8, 8, 8)},
            "the sampled chunk (8, 8, 8) is smaller than the PSF (11, 11, 11); "
            "give a larger sample_shape",
        ),
    ],
)
def test_bad_settings(psf, kwargs, message):
    image = np.ones((16, 32, 32), np.float32)
    with pytest.raises(ParameterError) as info:
        choose_iterations(image, psf, **kwargs)
    assert str(info.value) == message


def test_deconvolve_rejects_bad_iterations(psf):
    image = np.ones((16, 32, 32), np.float32)
    with pytest.raises(ParameterError) as info:
        deconvolve(image, psf, num_iter="many")
    assert str(info.value) == "num_iter must be an integer >= 0 or 'auto', got 'many'"
    with pytest.raises(ParameterError) as info:
        deconvolve(image, psf, num_iter=3, back_projector="wb")
    assert "unknown back projector 'wb'" in str(info.value)


def reference_held_out_squared_errors(image, psf, num_iter, keep, nesterov=False):
    """Per-pixel squared errors of the held-out pixels after each iteration (float64 reference).

    The estimate sees negative values as 0; the predictions are scored against the image.
    ``nesterov``: iteration n starts from max(x + (n - 2) / (n + 1) (x - x_previous), 0).
    """
    y = np.asarray(image, np.float64)
    seen = np.maximum(y, 0)
    h = np.asarray(psf, np.float64) / np.sum(psf)
    h_flip = h[(slice(None, None, -1),) * h.ndim]
    weights = fftconvolve(keep.astype(np.float64), h_flip, mode="full")
    ok = weights > 1e-3 * weights.max()
    inv_w = np.where(ok, 1.0 / np.where(ok, weights, 1.0), 0.0)
    x = np.full(tuple(n + k - 1 for n, k in zip(y.shape, h.shape)), seen[keep].mean())
    rows, previous = [], x
    for n in range(1, num_iter + 2):
        rows.append((fftconvolve(x, h, mode="valid") - y)[~keep] ** 2)
        point = x
        if nesterov and n > 2:
            point = np.maximum(x + (n - 2) / (n + 1) * (x - previous), 0)
        blurred = fftconvolve(point, h, mode="valid")
        ratio = keep * seen / np.maximum(blurred, 1e-6)
        previous, x = x, point * fftconvolve(ratio, h_flip, mode="full") * inv_w
    return np.asarray(rows)


def test_paired_rule_matches_a_by_hand_choice_and_stops_nearer_the_minimum():
    rng = np.random.default_rng(4)
    psf = gaussian_psf((9, 9), (1.8, 1.8))
    truth = gaussian_filter((rng.random((96, 96)) > 0.97).astype(np.float64), 0.7) * 4 + 0.05
    image = fftconvolve(truth, psf, mode="same") + rng.normal(0, 0.08, truth.shape)
    image = image.astype(np.float32)
    max_iter, density, n_masks, seed = 60, 0.05, 2, 3
    paired = choose_iterations(image, psf, max_iter=max_iter, n_samples=1, seed=seed, rule="paired")
    one_se = choose_iterations(image, psf, max_iter=max_iter, n_samples=1, seed=seed)
    # by hand: the same masks (choose_iterations seeds sample i's masks with seed * 1000 + i)
    masks = np.random.default_rng(seed * 1000)
    squared = np.concatenate(
        [
            reference_held_out_squared_errors(
                image, psf, max_iter, ~(masks.random(image.shape) < density)
            )
            for _ in range(n_masks)
        ],
        axis=1,
    )
    mean = squared.mean(axis=1)
    best = int(np.argmin(mean[1:])) + 1
    chosen = None
    for n in range(1, max_iter + 1):
        difference = squared[n] - squared[best]
        if difference.mean() <= difference.std() / np.sqrt(difference.size):
            chosen = n
            break
    assert paired.num_iter == chosen and paired.rule == "paired"
    assert paired.as_dict()["rule"] == "paired" and one_se.rule == "one-se"
    np.testing.assert_allclose(paired.errors["classic"], mean, rtol=1e-4)
    # an interior minimum (25 here) and the paired rule stops between the one-standard-error
    # count (6) and it (13)
    assert one_se.num_iter < paired.num_iter < best < max_iter


def test_holdout_products_agree_with_holdout_errors():
    rng = np.random.default_rng(1)
    psf = gaussian_psf((7, 7), (1.5, 1.5))
    block = (fftconvolve(rng.random((48, 40)), psf, mode="same") + 0.1).astype(np.float32)
    sums, count = holdout_errors(block, psf, max_iter=12, seed=5)
    products, same_count = holdout_products(block, psf, max_iter=12, seed=5)
    assert products.shape == (13, 14) and same_count == count
    np.testing.assert_allclose(products[:, 0], sums[:, 0], rtol=1e-5)
    np.testing.assert_allclose(np.diag(products[:, 1:]), sums[:, 1], rtol=1e-5)
    np.testing.assert_allclose(products[:, 1:], products[:, 1:].T, rtol=1e-12)


def test_accelerated_holdout_errors_match_the_reference():
    rng = np.random.default_rng(2)
    psf = gaussian_psf((9, 9), (1.8, 1.8))
    image = fftconvolve(rng.random((64, 72)) ** 8, psf, mode="same") + 0.05
    image = (image + rng.normal(0, 0.01, image.shape)).astype(np.float32)
    held = rng.random(image.shape) < 0.05
    plan = get_plan(psf, image.shape)
    ours = plan.holdout_errors(image, held, 15, workers=1, acceleration="nesterov")
    reference = reference_held_out_squared_errors(image, psf, 15, ~held, nesterov=True)
    np.testing.assert_allclose(ours[:, 0], reference.sum(axis=1), rtol=1e-4)
    plain = reference_held_out_squared_errors(image, psf, 15, ~held)
    assert np.abs(ours[:, 0] - plain.sum(axis=1)).max() > 1e-3 * plain.sum(axis=1).max()
    choice = choose_iterations(image, psf, max_iter=15, n_samples=1, acceleration="nesterov")
    assert choice.acceleration == "nesterov" and choice.as_dict()["acceleration"] == "nesterov"
    assert "acceleration" not in choose_iterations(image, psf, max_iter=3, n_samples=1).as_dict()
