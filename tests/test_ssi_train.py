"""SSI training, inference, checkpoints: small end-to-end tests (tiny nets, few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.signal import fftconvolve

from ssi_dask.errors import CheckpointError, ParameterError
from ssi_dask.ssi import (
    EnsembleUNet,
    SSIModel,
    UNet,
    load_checkpoint,
    predict,
    predict_block,
    save_checkpoint,
    train_ssi,
)


def _psf(n=7, sigma=1.5):
    r = np.arange(n) - n // 2
    g = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _scene(shape=(96, 96), seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    for _ in range(25):
        y, x = rng.integers(4, shape[0] - 12), rng.integers(4, shape[1] - 12)
        img[y : y + rng.integers(3, 9), x : x + rng.integers(3, 9)] = rng.uniform(0.4, 1)
    return img


def _degrade(gt, psf, seed=0):
    rng = np.random.default_rng(seed)
    y = fftconvolve(gt, psf, mode="same") + 0.05 * rng.standard_normal(gt.shape)
    return np.clip(y, 0, 1).astype(np.float32)


def _psnr(a, b):
    return 10 * np.log10(1 / np.mean((np.clip(a, 0, 1) - b) ** 2))


FAST = dict(steps=20, patch_size=32, batch_size=4, levels=2, base_channels=4, eval_every=10)


@pytest.fixture(scope="module")
def tiny_model():
    gt = _scene()
    return train_ssi(_degrade(gt, _psf()), _psf(), seed=0, restarts=0, **FAST)


def test_same_seed_same_weights():
    y = _degrade(_scene(), _psf())
    kw = dict(FAST, steps=8, restarts=0)
    a = train_ssi(y, _psf(), seed=3, device="cpu", **kw)
    b = train_ssi(y, _psf(), seed=3, device="cpu", **kw)
    c = train_ssi(y, _psf(), seed=4, device="cpu", **kw)
    sa, sb, sc = (m.network.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_round_trip(tiny_model, tmp_path):
    path = tmp_path / "m.pt"
    digest = save_checkpoint(tiny_model, path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, SSIModel)
    assert loaded.training["sha256"] == digest
    assert loaded.config == tiny_model.config
    assert loaded.normalisation == tiny_model.normalisation
    np.testing.assert_array_equal(loaded.psf, tiny_model.psf)
    y = _degrade(_scene(seed=5), _psf(), seed=5)
    np.testing.assert_array_equal(predict(loaded, y), predict(tiny_model, y))


def test_corrupt_or_edited_checkpoint_raises(tiny_model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(tiny_model, path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"hello": 1}, bad)
    with pytest.raises(CheckpointError, match="not an ssi-dask"):
        load_checkpoint(bad)
    msg = None
    try:
        load_checkpoint(bad)
    except CheckpointError as e:
        msg = str(e)
    assert "\n" not in msg


@pytest.mark.parametrize("ndim", [2, 3])
def test_tiled_prediction_equals_untiled(ndim):
    torch.manual_seed(0)
    net = UNet(ndim, levels=3, base_channels=4).eval()
    psf = np.ones((3,) * ndim, np.float32) / 3**ndim
    model = SSIModel(net, {"offset": 0.0, "scale": 1.0, "output_range": (-10, 10)}, psf)
    shape = (70, 53) if ndim == 2 else (21, 30, 27)
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    whole = predict(model, img, tile_shape=None)
    tiles = predict(model, img, tile_shape=16 if ndim == 2 else 8, batch_size=3)
    assert whole.shape == shape
    np.testing.assert_allclose(tiles, whole, atol=1e-4)


def test_predict_block_matches_chunked_map_overlap():
    da = pytest.importorskip("dask.array")
    torch.manual_seed(1)
    net = UNet(2, levels=3, base_channels=4).eval()
    model = SSIModel(
        net,
        {"offset": 0.0, "scale": 1.0, "output_range": (-10, 10)},
        np.ones((3, 3), np.float32) / 9,
    )
    img = np.random.default_rng(0).random((96, 64), dtype=np.float32)
    h = model.halo
    whole = predict_block(model, np.pad(img, h, mode="reflect"))[h:-h, h:-h]
    chunked = da.from_array(img, chunks=(32, 32)).map_overlap(
        lambda b: predict_block(model, b), depth=h, boundary="reflect", dtype=np.float32
    )
    # dask's "reflect" repeats the edge pixel (NumPy's "symmetric"); compare to that
    whole_sym = predict_block(model, np.pad(img, h, mode="symmetric"))[h:-h, h:-h]
    np.testing.assert_allclose(chunked.compute(), whole_sym, atol=1e-4)
    assert whole.shape == img.shape


def test_predict_normalises_and_clips(tiny_model):
    y = _degrade(_scene(), _psf())
    out = predict(tiny_model, y * 1000, tile_shape=48)
    lo, hi = tiny_model.value_range
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6
    with pytest.raises(ParameterError):
        predict(tiny_model, np.zeros((8, 8, 8), np.float32))


def test_training_reduces_validation_loss_and_improves_psnr():
    gt = _scene((128, 128), seed=2)
    psf = _psf()
    y = _degrade(gt, psf, seed=2)
    model = train_ssi(
        y,
        psf,
        seed=0,
        steps=150,
        patch_size=48,
        batch_size=8,
        levels=2,
        base_channels=8,
        eval_every=25,
        restarts=0,
        learning_rate=4e-3,
    )
    vals = [e["val_loss"] for e in model.log if "val_loss" in e]
    assert min(vals[1:]) < vals[0]
    assert model.training["val_loss"] < model.training["baseline_val_losses"]["identity"]
    out = predict(model, y)
    assert _psnr(out, gt) > _psnr(y, gt) + 1.0


def test_failed_run_restarts(monkeypatch):
    y = _degrade(_scene(), _psf())
    model = train_ssi(y, _psf(), seed=0, restarts=1, **dict(FAST, steps=2, lr_prior=0))
    runs = [e for e in model.log if "failed" in e]
    # two steps of a plain network (no Lucy-Richardson prior, which starts at LR) cannot beat
    # LR: the run is flagged and a restart happens; best run kept
    assert runs[0]["failed"] and len(runs) == 2
    assert model.training["val_loss"] == min(r["best_val_loss"] for r in runs)


def test_bad_parameters():
    y = np.zeros((64, 64), np.float32)
    with pytest.raises(ParameterError):
        train_ssi(y, np.ones((3, 3, 3)), steps=1)
    with pytest.raises(ParameterError):
        train_ssi(np.zeros((4,)), np.ones(3), steps=1)


def test_progress_callback():
    seen = []
    y = _degrade(_scene(), _psf())
    train_ssi(y, _psf(), seed=0, restarts=0, progress=seen.append, **FAST)
    assert seen and {"step", "val_loss", "train_loss"} <= set(seen[0])


def test_weight_average_is_the_mean_of_the_states():
    from ssi_dask.ssi.train import _WeightAverage

    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = UNet(ndim=2, levels=2, base_channels=4)
        net.train()
        net(torch.rand(2, 1, 16, 16))  # moves the BatchNorm running statistics
        nets.append(net)
    average = _WeightAverage()
    for net in nets:
        average.add(net)
    state = average.state()
    for key, value in nets[0].state_dict().items():
        stacked = np.stack([n.state_dict()[key].numpy() for n in nets])
        if value.is_floating_point():
            np.testing.assert_allclose(state[key].numpy(), stacked.mean(0), rtol=1e-6, atol=1e-7)
        else:  # step counters: the latest
            assert state[key].item() == nets[-1].state_dict()[key].item()


def test_training_averages_the_last_part_of_the_run():
    y = _degrade(_scene(), _psf())
    model = train_ssi(y, _psf(), seed=0, restarts=0, average_fraction=0.25, **FAST)
    averaged = [e for e in model.log if "averaged_steps" in e]
    assert len(averaged) == 1 and averaged[0]["averaged_steps"] == FAST["steps"] // 4
    assert model.training["val_loss"] == averaged[0]["val_loss"]
    assert model.training["average_fraction"] == 0.25
    # without averaging, the best snapshot's validation loss is the run's
    plain = train_ssi(y, _psf(), seed=0, restarts=0, average_fraction=0, **FAST)
    assert not [e for e in plain.log if "averaged_steps" in e]
    snapshots = [e["val_loss"] for e in plain.log if "train_loss" in e]
    assert plain.training["val_loss"] == min(snapshots)


def test_ensemble_network_is_the_mean_of_its_members():
    torch.manual_seed(0)
    ensemble = EnsembleUNet(3, ndim=2, levels=2, base_channels=4).eval()
    single = UNet(ndim=2, levels=2, base_channels=4)
    assert (ensemble.halo, ensemble.alignment) == (single.halo, single.alignment)
    assert ensemble.config == dict(single.config, members=3)
    x = torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        expected = sum(m(x) for m in ensemble.members) / 3
        np.testing.assert_allclose(ensemble(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ParameterError, match="at least one member"):
        EnsembleUNet(0, ndim=2)


def test_training_an_ensemble(tmp_path):
    y = _degrade(_scene(), _psf())
    model = train_ssi(y, _psf(), seed=0, restarts=0, ensemble=2, **FAST)
    assert isinstance(model.network, EnsembleUNet) and model.config["members"] == 2
    assert set(model.training["selected_runs"]) == {0, 1}
    losses = model.training["member_val_losses"]
    assert losses == sorted(losses)  # members ordered by their validation loss
    runs = [e for e in model.log if "failed" in e]
    assert len(runs) == 2 and {r["seed"] for r in runs} == {0, 1000}
    # the members' outputs are averaged (checked on the raw network outputs)
    x = torch.from_numpy(
        (y[:32, :32] - model.normalisation["offset"]) / model.normalisation["scale"]
    )
    x = x[None, None].float()
    with torch.no_grad():
        members = [m(x) for m in model.network.members]
        np.testing.assert_allclose(
            model.network(x).numpy(), ((members[0] + members[1]) / 2).numpy(), atol=1e-6
        )
    # an ensemble survives a checkpoint round trip
    save_checkpoint(model, tmp_path / "ensemble.pt")
    loaded = load_checkpoint(tmp_path / "ensemble.pt")
    assert loaded.config == model.config
    np.testing.assert_array_equal(predict(loaded, y), predict(model, y))
    with pytest.raises(ParameterError, match="ensemble must be an integer >= 1, got 0"):
        train_ssi(y, _psf(), ensemble=0, restarts=0, **FAST)


def _null_band_weights(shape, psf):
    """The ``1 - |OTF|^2`` weights of the penalties' band on an rfft grid of ``shape`` (NumPy,
    independently of the training code)."""
    otf = np.fft.rfftn(
        np.fft.ifftshift(np.pad(psf, [(0, s - p) for s, p in zip(shape, psf.shape)]))
    )
    return np.clip(1 - np.abs(otf) ** 2 / np.max(np.abs(otf) ** 2), 0, None)


def _null_band_energy(image, psf):
    """Mean energy per pixel of ``image`` at frequencies ``psf`` transmits poorly."""
    spectrum = np.abs(np.fft.rfft2(image)) ** 2
    return float((_null_band_weights(image.shape, psf) * spectrum).sum() / image.size**2 * 2)


def _noisy_scene(psf):
    """The penalty tests' scene, its degraded image, and that image with fresh noise added."""
    truth = _scene((96, 96), seed=5)
    y = _degrade(truth, psf, seed=5)
    fresh = y + 0.05 * np.random.default_rng(9).standard_normal(y.shape).astype(np.float32)
    return truth, y, fresh


def test_noise_penalty_lowers_the_outputs_noise_sensitivity():
    # noise_penalty_weight: the output's change when noise is added to the input, at poorly
    # transmitted frequencies, is a term of the loss; a large weight must leave a network whose
    # output moves less there under fresh noise than the same run without the term
    psf = _psf()
    _, y, fresh = _noisy_scene(psf)
    moved = {}
    for weight in (0.0, 5.0):
        model = train_ssi(
            y,
            psf,
            seed=0,
            restarts=0,
            noise_penalty_weight=weight,
            noise_penalty_region="everywhere",
            **dict(FAST, steps=40, lr_prior=0),
        )
        assert model.training["noise_penalty_weight"] == weight
        moved[weight] = _null_band_energy(predict(model, fresh) - predict(model, y), psf)
    assert moved[5.0] < 0.5 * moved[0.0]


def _null_band(image, psf):
    """``image`` filtered by the square root of the ``1 - |OTF|^2`` weights (NumPy)."""
    weight = _null_band_weights(image.shape, psf)
    return np.fft.irfftn(np.fft.rfftn(image) * np.sqrt(weight), s=image.shape)


def test_background_weight_is_a_wiener_weight_on_the_priors_own_noise():
    from ssi_dask.ssi.train import _background_weight

    # the prior's noise std is the rms of its change under noise: 0.1 here
    reference = torch.tensor([-1.0, 0.0, 0.1, 0.3, 0.2])
    noisy = reference + torch.tensor([0.1, -0.1, 0.1, -0.1, 0.1])
    weight = _background_weight(reference + 0.2, noisy + 0.2, zero=0.2)
    np.testing.assert_allclose(weight.numpy(), [1.0, 1.0, 0.5, 0.1, 0.2], rtol=1e-5)


def test_noise_penalty_region_is_checked():
    from ssi_dask.config import TrainingRecipe

    for ndim, weight, region in ((2, 0.0, "everywhere"), (3, 0.2, "interiors")):
        recipe = TrainingRecipe().for_ndim(ndim)
        assert (recipe.noise_penalty_weight, recipe.noise_penalty_region) == (weight, region)
    with pytest.raises(ParameterError, match=r"^noise_penalty_weight must be >= 0"):
        TrainingRecipe(noise_penalty_weight=-0.1)
    with pytest.raises(
        ParameterError,
        match=(
            r"^noise_penalty_region must be one of everywhere, background, interiors, "
            r"got 'edges'$"
        ),
    ):
        TrainingRecipe(noise_penalty_region="edges")


def _box_mean_numpy(x, size):
    """Mean over a centred box of ``size`` of the part inside the array (SciPy)."""
    ones = np.ones_like(x)
    return ndimage.uniform_filter(x, size, mode="constant") / ndimage.uniform_filter(
        ones, size, mode="constant"
    )


def test_psf_fwhm_counts_the_pixels_above_half_the_peak():
    from ssi_dask.ssi.train import psf_fwhm

    # a Gaussian of sigma 2 along y (exp(-k^2/8) >= 1/2 for |k| <= 2: 5 pixels), sigma 1
    # along x (|k| <= 1: 3 pixels), a single pixel where nothing else reaches half the peak
    y, x = np.mgrid[-8:9, -6:7]
    assert psf_fwhm(np.exp(-(y**2) / 8 - x**2 / 2)) == (5, 3)
    delta = np.zeros((5, 7, 7))
    delta[2, 3, 3] = 1
    assert psf_fwhm(delta) == (1, 1, 1)


def _interior_level_numpy(x, small, large):
    """The minimum over ``large`` of the mean over ``small`` (SciPy)."""
    return ndimage.minimum_filter(_box_mean_numpy(x, small), large, mode="nearest")


def test_interior_weights_match_scipy():
    from ssi_dask.ssi.train import INTERIOR_WEIGHT, _penalty_weights

    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 1, (2, 1, 9, 14, 12)).astype(np.float32)
    noisy = reference + 0.1 * rng.standard_normal(reference.shape).astype(np.float32)
    fwhm = (2, 3, 1)  # made odd: (3, 3, 1); three times that: (9, 9, 3)
    small, large = (1, 1, 3, 3, 1), (1, 1, 9, 9, 3)

    # the background weight with the patch's noise variance as a white probe gives it
    # (white_ratio: the white probe's variance over the probe's, per voxel) and its term
    # rescaled by that ratio, plus the interior share: the same weight's complement at the
    # lowest PSF-width mean within the wide box
    zero, weight = 0.1, 0.2
    white_ratio = rng.uniform(0.1, 1, reference.shape).astype(np.float32)
    var = (((noisy.astype(np.float64) - reference) ** 2) * white_ratio).mean()
    background = var / (var + np.maximum(reference - zero, 0) ** 2)
    low = _interior_level_numpy(reference.astype(np.float64), small, large)
    interior = 1 - var / (var + np.maximum(low - zero, 0) ** 2)
    expected = background * white_ratio + (1 - background) * interior * INTERIOR_WEIGHT / weight
    got = _penalty_weights(
        "interiors",
        weight,
        torch.from_numpy(reference),
        torch.from_numpy(noisy),
        zero,
        fwhm,
        torch.from_numpy(white_ratio),
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-4, atol=1e-6)


def test_interior_share_counts_deep_inside_a_large_object_only():
    from ssi_dask.ssi.train import _background_weight, _penalty_weights

    rng = np.random.default_rng(1)
    reference = np.zeros((1, 1, 24, 64, 64), np.float32)
    reference[..., 2:22, 4:30, 4:30] = 1.0  # a large bright object
    reference[..., 12, 40, 40] = 1.0  # a point
    reference[..., 2:22, 50, 4:60] = 1.0  # a thin sheet (a membrane)
    noisy = reference + 0.01 * rng.standard_normal(reference.shape).astype(np.float32)
    ref, noi = torch.from_numpy(reference), torch.from_numpy(noisy)
    weight = 0.2
    share = (
        _penalty_weights("interiors", weight, ref, noi, 0.0, (3, 3, 3))
        - _background_weight(ref, noi, 0.0)
    )[0, 0] * weight
    assert float(share[8:16, 12:22, 12:22].min()) > 0.99  # the object's interior, at weight 1
    assert float(share[:, 4:6, 12:22].abs().max()) < 1e-6  # its edge
    assert float(share[:, 38:43, 38:43].abs().max()) < 1e-6  # the point and its neighbours
    assert float(share[:, 48:53, :].abs().max()) < 1e-6  # the sheet
    assert float(share[:, 34:36, 34:36].abs().max()) < 1e-6  # the background


def test_interiors_probe_is_the_datas_own_noise_inside_large_objects():
    from types import SimpleNamespace

    from ssi_dask.ssi.train import _probe_sigma

    gain, floor, white = 0.01, 0.0004, 0.05

    class Validator:
        def noise_model(self):
            return gain, floor

    ctx = SimpleNamespace(noise_sigma=white, validator=Validator(), psf_fwhm=(1, 3, 3))
    assert _probe_sigma("background", ctx, torch.zeros((1, 1, 3, 9, 9))) == white
    # against NumPy: the input's lowest mean over the small box (1, 3, 3) within the wide box
    # (3, 9, 9) through the noise model, never below the white level
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 4, (1, 1, 5, 12, 13)).astype(np.float32)
    level = _interior_level_numpy(x.astype(np.float64), (1, 1, 1, 3, 3), (1, 1, 3, 9, 9))
    level = np.maximum(level, 0)
    expected = np.sqrt(np.maximum(gain * level + floor, white**2))
    got = _probe_sigma("interiors", ctx, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    bright = _probe_sigma("interiors", ctx, torch.full((1, 1, 3, 9, 9), 4.0))
    np.testing.assert_allclose(bright.numpy(), (gain * 4 + floor) ** 0.5, rtol=1e-5)
    dark = _probe_sigma("interiors", ctx, torch.zeros((1, 1, 3, 9, 9)))
    np.testing.assert_allclose(dark.numpy(), white, rtol=1e-6)


def test_voxel_weighted_null_penalty_matches_numpy():
    from ssi_dask.ssi.forward import PSFOperator
    from ssi_dask.ssi.train import _NullSpacePenalty

    psf = _psf()
    shape = (24, 31)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, *shape)).astype(np.float32)
    where = rng.uniform(size=x.shape).astype(np.float32)
    penalty = _NullSpacePenalty(PSFOperator(psf), shape, "cpu")
    got = float(penalty(torch.from_numpy(x), torch.from_numpy(where)))
    window = np.outer(np.hanning(shape[0]), np.hanning(shape[1]))  # sqrt-Hann on each axis, squared
    band = np.stack([_null_band(xi[0] * np.sqrt(window), psf) for xi in x])[:, None]
    expected = (where * band**2).sum() / window.sum() / len(x)
    assert got == pytest.approx(expected, rel=1e-4)


def test_background_noise_penalty_spares_structure():
    # noise_penalty_region="background": the penalty counts where the Lucy-Richardson prior is
    # within its noise of zero, so the trained output passes far less noise into the
    # background than without the penalty, and about as much on the structure
    psf = _psf()
    truth, y, fresh = _noisy_scene(psf)
    background = ~ndimage.binary_dilation(truth > 0, iterations=3)
    structure = truth > 0
    energy = {}
    for weight in (0.0, 5.0):
        model = train_ssi(
            y,
            psf,
            seed=0,
            restarts=0,
            noise_penalty_weight=weight,
            noise_penalty_region="background",
            **dict(FAST, steps=40, lr_prior=5),
        )
        # recorded only where it acts (a weight of 0 keeps the model's hash as before)
        assert model.training.get("noise_penalty_region") == ("background" if weight else None)
        band = _null_band(predict(model, fresh) - predict(model, y), psf)
        energy[weight] = [float((band[region] ** 2).mean()) for region in (background, structure)]
    assert energy[5.0][0] < 0.5 * energy[0.0][0]
    assert energy[5.0][1] > 0.7 * energy[0.0][1]


def test_interiors_noise_penalty_smooths_inside_a_large_object_and_spares_points():
    # noise_penalty_region="interiors": the penalty also counts deep inside large bright
    # objects, so the trained output passes far less noise into a large object's interior than
    # with the background region, and about as much around points
    psf = _psf()
    truth = np.zeros((96, 96), np.float32)
    truth[20:76, 8:60] = 0.7  # a large flat object
    points = [(20 + 14 * i, 80) for i in range(5)]
    for y, x in points:
        truth[y, x] = 1.0
    y = _degrade(truth, psf, seed=5)
    fresh = y + 0.05 * np.random.default_rng(9).standard_normal(y.shape).astype(np.float32)
    interior = np.zeros(truth.shape, bool)
    interior[30:66, 18:50] = True
    around_points = np.zeros(truth.shape, bool)
    for y0, x0 in points:
        around_points[y0 - 2 : y0 + 3, x0 - 2 : x0 + 3] = True
    energy = {}
    for region in ("background", "interiors"):
        model = train_ssi(
            y,
            psf,
            seed=0,
            restarts=0,
            noise_penalty_weight=0.2,
            noise_penalty_region=region,
            **dict(FAST, steps=200, lr_prior=5),
        )
        assert model.training["noise_penalty_region"] == region
        band = _null_band(predict(model, fresh) - predict(model, y), psf)
        energy[region] = [float((band[m] ** 2).mean()) for m in (interior, around_points)]
    assert energy["interiors"][0] < 0.75 * energy["background"][0]
    assert energy["interiors"][1] > 0.75 * energy["background"][1]
