"""Issue 14/16: the training recipe, the UNet's ``levels``, test-time transforms, large PSFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from ssi_dask.cli import build_parser, job_from_args
from ssi_dask.config import (
    SSI_TRAINING_DEFAULTS,
    SSI_TTA_DEFAULTS,
    SSISettings,
    TrainingRecipe,
    TrainSettings,
)
from ssi_dask.errors import ParameterError
from ssi_dask.ssi import (
    SSIModel,
    UNet,
    load_checkpoint,
    model_hash,
    predict,
    save_checkpoint,
    train_ssi,
)
from ssi_dask.ssi.forward import SamePSFOperator
from ssi_dask.ssi.symmetry import apply, psf_symmetries, tta_transforms

DATA = Path(__file__).parent / "data"


# -- the recipe -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"learning_rate": 0}, "learning_rate must be a finite number > 0, got 0"),
        ({"levels": 0}, "levels must be an integer >= 1, got 0"),
        ({"rho_target": 0.7}, "rho_target must be <= rho_start, got rho_target=0.7"),
        ({"validation_density": 1.5}, "validation_density must be in (0, 1), got 1.5"),
        ({"norm_percentiles": (5, 1)}, "norm_percentiles must be (low, high) with low < high"),
        ({"null_space_weight": "big"}, "null_space_weight must be a number >= 0 or 'auto'"),
        ({"forward": "full"}, "forward must be one of auto, valid, same, got 'full'"),
        ({"augment": 1}, "augment must be True or False, got 1"),
    ],
)
def test_recipe_names_the_bad_parameter(changes, message):
    with pytest.raises(ParameterError) as info:
        TrainingRecipe(**changes)
    assert message in str(info.value)
    with pytest.raises(ParameterError) as info:  # replace() checks the same way
        TrainingRecipe().replace(**changes)
    assert message in str(info.value)


def test_recipe_defaults_per_dimensionality_and_replace():
    recipe = TrainingRecipe(steps=7)
    assert recipe.patch_size is None and recipe.levels is None
    for ndim in (2, 3):
        full = recipe.for_ndim(ndim)
        assert full.steps == 7  # given values are kept
        for key in ("patch_size", "batch_size", "levels", "base_channels"):
            assert getattr(full, key) == SSI_TRAINING_DEFAULTS[ndim][key]
    changed = recipe.replace(restarts=0, levels=2)
    assert (changed.restarts, changed.levels, changed.steps) == (0, 2, 7)
    assert recipe.restarts == 2  # frozen: the original is unchanged
    with pytest.raises(ParameterError, match="unknown training option.s. stepz; expected"):
        recipe.replace(stepz=3)
    with pytest.raises(ParameterError, match="ndim=4"):
        recipe.for_ndim(4)


def test_train_ssi_refuses_unknown_or_bad_overrides_before_any_work():
    image = np.zeros((32, 32), np.float32)
    with pytest.raises(ParameterError, match="unknown training option.s. depth; expected"):
        train_ssi(image, np.ones((3, 3)), depth=2)  # the old name of `levels`
    with pytest.raises(ParameterError, match="steps must be an integer >= 1, got 0"):
        train_ssi(image, np.ones((3, 3)), TrainingRecipe(), steps=0)


def test_train_settings_build_the_recipe():
    settings = TrainSettings(steps=5, net_levels=2, batch_size=3, clipping=None, restarts=0)
    recipe = settings.recipe()
    assert (recipe.steps, recipe.levels, recipe.batch_size, recipe.restarts) == (5, 2, 3, 0)
    assert recipe.sensor_clipping is None
    assert recipe.patch_size is None  # left to the 2D/3D default
    assert TrainSettings().recipe() == TrainingRecipe()


def test_cli_net_levels_and_its_hidden_alias(tmp_path):
    parser = build_parser()
    common = ["run", "in.zarr", str(tmp_path / "out.zarr"), "--psf", "psf.tif", "--method", "ssi"]
    new = job_from_args(parser.parse_args([*common, "--net-levels", "2", "--tta", "4"]))
    old = job_from_args(parser.parse_args([*common, "--net-depth", "2"]))
    assert new.ssi.train.recipe().levels == old.ssi.train.recipe().levels == 2
    assert new.ssi.tta == 4 and old.ssi.tta is None
    run_help = next(
        a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"
    ).choices["run"]
    text = run_help.format_help()
    assert "--net-levels" in text and "--net-depth" not in text
    levels = {SSI_TRAINING_DEFAULTS[n]["levels"] for n in (2, 3)}
    assert f"UNet resolution levels (default: {levels.pop()})" in " ".join(text.split())
    with pytest.raises(ParameterError, match=r"tta=3 is not a number of test-time transforms"):
        SSISettings(tta=3)


# -- old checkpoints (the UNet's levels were called depth) -------------------------------------


def test_checkpoint_written_with_depth_loads_with_the_same_hash_and_output(tmp_path):
    path = DATA / "ssi_checkpoint_depth_key.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert '"depth": 2' in payload["config"]  # written by the code before the rename
    model = load_checkpoint(path)  # the content check passes
    assert model.network.config["levels"] == 2 and "depth" not in model.network.config
    assert model_hash(model) == payload["sha256"]
    image = np.load(DATA / "ssi_checkpoint_depth_key_image.npy")
    expected = np.load(DATA / "ssi_checkpoint_depth_key_output.npy")  # old code, all 8 TTA
    np.testing.assert_array_equal(predict(model, image, tta=8), expected)
    # saved again (now spelled `levels`), it keeps its hash
    digest = save_checkpoint(model, tmp_path / "again.pt")
    assert digest == payload["sha256"]
    assert '"levels": 2' in torch.load(tmp_path / "again.pt", weights_only=True)["config"]
    assert model_hash(load_checkpoint(tmp_path / "again.pt")) == digest


# -- test-time transforms ---------------------------------------------------------------------


def _symmetric_psf3d() -> np.ndarray:
    z, y, x = np.mgrid[-3:4, -4:5, -4:5]
    psf = np.exp(-(z**2) / 8.0 - (x**2 + y**2) / 3.0).astype(np.float32)
    return psf / psf.sum()


def _signature(transform, probe):
    return apply(probe, transform).numpy().tobytes()


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_tta_transforms_are_a_subgroup_of_the_asked_size(n):
    symmetries = psf_symmetries(_symmetric_psf3d())
    assert len(symmetries) == 16
    chosen = tta_transforms(symmetries, n, 3)
    assert len(chosen) == n and chosen[0] == ((), False)
    probe = torch.arange(4 * 4 * 4).reshape(4, 4, 4)
    signatures = {_signature(t, probe) for t in chosen}
    assert len(signatures) == n
    for a in chosen:  # closed under composition: an unbiased average at every size
        for b in chosen:
            assert _signature(b, apply(probe, a)) in signatures
    if n == 2:  # the point reflection first
        assert chosen[1] == ((-3, -2, -1), False)


def test_tta_is_capped_by_the_psf_symmetries():
    psf = np.zeros((5, 5), np.float32)
    psf[2, 2], psf[2, 3] = 1.0, 0.5  # symmetric about the x axis only
    symmetries = psf_symmetries(psf)
    assert len(tta_transforms(symmetries, 16, 2)) == len(symmetries) == 2


def _random_model(ndim=3, psf=None) -> SSIModel:
    torch.manual_seed(0)
    net = UNet(ndim, levels=2, base_channels=2, max_channels=4, batch_norm=False).eval()
    psf = _symmetric_psf3d() if psf is None else psf
    symmetries = [[list(f), bool(w)] for f, w in psf_symmetries(psf)]
    return SSIModel(
        net,
        {"offset": 0.0, "scale": 1.0, "output_range": (-100.0, 100.0)},
        psf,
        {"symmetries": symmetries, "seed": 0},
    )


def test_predict_averages_the_chosen_transforms():
    model = _random_model()
    image = np.random.default_rng(1).random((8, 12, 12)).astype(np.float32)
    one = predict(model, image, tta=1)
    assert not np.allclose(one, predict(model, image, tta=2))
    # tta=16 is the old behaviour (every symmetry), True still means that
    np.testing.assert_array_equal(predict(model, image, tta=16), predict(model, image, tta=True))
    np.testing.assert_array_equal(one, predict(model, image, tta=False))
    np.testing.assert_array_equal(
        predict(model, image), predict(model, image, tta=SSI_TTA_DEFAULTS[3])
    )
    # tta=2 from single-transform predictions: the mean of f(x) and the point reflection of
    # f(point reflection of x) (the padding is symmetric, so this is exact)
    flipped = np.flip(predict(model, np.ascontiguousarray(image[::-1, ::-1, ::-1]), tta=1))
    reference = (one + flipped) / 2
    np.testing.assert_allclose(predict(model, image, tta=2), reference, atol=1e-5)
    with pytest.raises(ParameterError, match="tta=3 is not a number"):
        predict(model, image, tta=3)


def test_deconvolve_records_and_checks_tta():
    from ssi_dask import deconvolve

    model = _random_model()
    image = np.random.default_rng(2).random((12, 20, 20)).astype(np.float32)
    lazy = deconvolve(image, model.psf, method="ssi", model=model, tta=4)
    assert lazy.ssi_dask_provenance["tta"] == 4
    np.testing.assert_allclose(lazy.compute(), predict(model, image, tta=4), atol=1e-5)
    default = deconvolve(image, model.psf, method="ssi", model=model)
    assert default.ssi_dask_provenance["tta"] == SSI_TTA_DEFAULTS[3]
    with pytest.raises(ParameterError, match="tta=5 is not a number"):
        deconvolve(image, model.psf, method="ssi", model=model, tta=5)


# -- large PSFs: the 'same' forward operator --------------------------------------------------


def test_same_operator_is_the_linear_convolution_plus_the_mean_outside():
    rng = np.random.default_rng(0)
    patch = (12, 20)
    psf = rng.random((31, 45)).astype(np.float32)  # larger than the patch on every axis
    psf /= psf.sum()
    op = SamePSFOperator(psf, patch)
    x = rng.random((2, 1, *patch)).astype(np.float32)
    got = op.same(torch.from_numpy(x)).numpy()
    for i in range(2):
        blurred = fftconvolve(x[i, 0].astype(np.float64), psf.astype(np.float64), mode="same")
        coverage = fftconvolve(np.ones(patch), psf.astype(np.float64), mode="same")
        expected = blurred + (1 - coverage) * x[i, 0].mean()
        np.testing.assert_allclose(got[i, 0], expected, atol=2e-5)
    assert op.valid(torch.from_numpy(x)).shape == op.crop(torch.from_numpy(x)).shape


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    gt = np.zeros(shape, np.float32)
    for _ in range(12):
        centre = [rng.uniform(0, s) for s in shape]
        r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        gt += np.exp(-r2 / (2 * rng.uniform(1.0, 2.5) ** 2)).astype(np.float32)
    return gt / gt.max()


def test_ssi_trains_with_a_psf_as_large_as_the_image():
    shape = (48, 48)
    gt = _blobs(shape, 0)
    y, x = np.mgrid[-24:24, -24:24]  # as large as the image (even sides), heavy tails
    psf = (1 / (1 + (x**2 + y**2) / 3.0) ** 2).astype(np.float32)
    psf /= psf.sum()
    blurred = fftconvolve(gt, psf, mode="same")
    noisy = (blurred + np.random.default_rng(1).normal(0, 0.02, shape)).astype(np.float32)
    with pytest.raises(ParameterError, match="forward='valid'; use forward='same'"):
        train_ssi(noisy, psf, forward="valid", steps=1)
    model = train_ssi(
        noisy, psf, seed=0, steps=60, patch_size=48, batch_size=4, levels=2, base_channels=4,
        restarts=0, eval_every=20, output_range=(0.0, 3.0), learning_rate=0.01,
        average_fraction=0,  # the best snapshot: a 60-step run is too short to average
    )  # fmt: skip
    assert model.training["forward"]["mode"] == "same"
    # the self-supervised check on held-out pixels: the run captured more than a tenth of
    # the best Lucy-Richardson baseline's gain over the identity (a misaligned or wrongly
    # scaled forward operator fails it)
    assert model.training["beats_baselines"]
    restored = predict(model, noisy)
    assert restored.shape == shape and np.isfinite(restored).all()
