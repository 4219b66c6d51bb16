"""SSI with a Lucy-Richardson prior (issue 16): ``lr_prior=n`` gives the network the
Lucy-Richardson restoration of its (masked) input as a second channel and trains a correction
to it; every inference path computes the prior on the part of the block inside the volume."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

from ssi_dask.blockwise import _ssi_chunk, lr_default_depth
from ssi_dask.config import TrainingRecipe
from ssi_dask.errors import ParameterError
from ssi_dask.lr import get_plan, richardson_lucy
from ssi_dask.lr_auto import choose_iterations
from ssi_dask.ssi import (
    EnsembleUNet,
    UNet,
    build_network,
    load_checkpoint,
    predict,
    predict_chunk,
    save_checkpoint,
    train_ssi,
)
from ssi_dask.ssi.forward import LucyRichardsonPrior
from ssi_dask.ssi.regions import RegionPool


def gaussian_psf(shape, sigma):
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),))
    psf = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigmas)))
    return (psf / psf.sum()).astype(np.float32)


def _scene(shape, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    for _ in range(int(np.prod(shape) // 150)):
        centre = [rng.integers(2, s - 2) for s in shape]
        truth[tuple(slice(c - 1, c + 2) for c in centre)] += rng.uniform(0.3, 1.0)
    return truth


def _blurred(shape, psf, seed=0, noise=0.01):
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(seed)
    y = fftconvolve(_scene(shape, seed), psf, mode="same") + 0.02
    return (y + noise * rng.standard_normal(shape)).clip(0).astype(np.float32)


@pytest.mark.parametrize("shape, sigma", [((70, 90), 2.0), ((20, 36, 40), (1.5, 1.2, 1.2))])
def test_prior_is_the_packages_lucy_richardson(shape, sigma):
    # the torch prior is an independent implementation of ssi_dask.lr.richardson_lucy (the
    # same extended domain and edge weights): equal to float rounding, edges included
    ndim = len(shape)
    psf = gaussian_psf((9,) * ndim, sigma)
    y = _blurred(shape, psf)
    for n in (1, 7):
        ours = LucyRichardsonPrior(psf, n)(torch.from_numpy(y)[None, None])[0, 0].numpy()
        reference = richardson_lucy(y, psf, num_iter=n)
        np.testing.assert_allclose(ours, reference, atol=2e-4 * float(reference.max()))


def test_accelerated_prior_is_the_packages_accelerated_lucy_richardson():
    # torch (the prior) and NumPy (ssi_dask.lr, in place) implement the momentum separately
    shape, psf = (20, 36, 40), gaussian_psf((9, 9, 9), (1.5, 1.2, 1.2))
    y = _blurred(shape, psf)
    plan = get_plan(psf, shape)
    for n in (2, 3, 12):
        ours = LucyRichardsonPrior(psf, n, acceleration="nesterov")(
            torch.from_numpy(y)[None, None]
        )[0, 0].numpy()
        reference = plan.deconvolve(y, n, acceleration="nesterov")
        np.testing.assert_allclose(ours, reference, atol=2e-4 * float(reference.max()))
    # the first two iterations carry no momentum; from the third on the restoration differs
    assert np.array_equal(plan.deconvolve(y, 2, acceleration="nesterov"), plan.deconvolve(y, 2))
    plain = plan.deconvolve(y, 12)
    assert np.abs(reference - plain).max() > 0.05 * float(plain.max())
    with pytest.raises(
        ParameterError, match=r"^acceleration must be one of none, nesterov, got 'fast'$"
    ):
        plan.deconvolve(y, 3, acceleration="fast")


def test_network_with_prior_starts_at_the_prior_and_round_trips():
    psf = gaussian_psf((7, 7), 1.5)
    net = UNet(ndim=2, levels=2, base_channels=4, prior_iterations=3, prior_psf_shape=psf.shape)
    net.prior_psf.copy_(torch.from_numpy(psf))
    x = torch.from_numpy(_blurred((32, 40), psf))[None, None]
    prior = net.prior(x)
    # the correction's output layer starts at zero: the untrained network returns the prior
    torch.testing.assert_close(net(x), prior)
    assert net.config["prior_iterations"] == 3 and net.config["prior_psf_shape"] == (7, 7)
    assert net.encoders[0][0].weight.shape[1] == 2  # image and prior channels
    torch.nn.init.normal_(net.head.weight)
    rebuilt = build_network(net.config)
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt(x), net(x))
    # a network without a prior is unchanged: one input channel, no prior keys in its config
    plain = UNet(ndim=2, levels=2, base_channels=4)
    assert plain.prior(x) is None and "prior_iterations" not in plain.config
    assert plain.halo == UNet(ndim=2, levels=2, base_channels=4).halo
    # the halo adds Lucy-Richardson's chunk halo for the prior's iterations
    margin = max(lr_default_depth(psf.shape, 3))
    assert net.prior_margin == margin
    assert net.halo == -(-(net.receptive_field_radius + margin) // net.alignment) * net.alignment
    ensemble = EnsembleUNet(2, **{k: v for k, v in net.config.items()})
    ensemble.members[0].prior_psf.copy_(torch.from_numpy(psf))
    ensemble.members[1].prior_psf.copy_(torch.from_numpy(psf))
    torch.testing.assert_close(ensemble(x), prior)
    assert ensemble.halo == net.halo


def test_lr_prior_is_checked_with_its_name():
    with pytest.raises(ParameterError, match=r"^lr_prior must be an integer >= 0, got -1$"):
        TrainingRecipe(lr_prior=-1)
    with pytest.raises(
        ParameterError, match=r"^lr_prior must be an iteration count >= 0 or 'auto', got 'yes'$"
    ):
        TrainingRecipe(lr_prior="yes")
    assert TrainingRecipe().lr_prior is None
    assert TrainingRecipe().for_ndim(2).lr_prior == "auto"
    assert TrainingRecipe().for_ndim(3).lr_prior == "auto"


def _chunked(model, image):
    """SSI applied to ``image`` in 40x48 chunks with the model's halo (map_overlap)."""
    h = model.halo
    return (
        da.from_array(image, chunks=(40, 48))
        .map_overlap(
            _ssi_chunk, depth=h, boundary="reflect", dtype=np.float32, model=model, margin=(h, h)
        )
        .compute(scheduler="sync")
    )


@pytest.fixture(scope="module")
def trained():
    psf = gaussian_psf((9, 9), 1.6)
    y = _blurred((96, 120), psf, seed=3)
    model = train_ssi(y, psf, seed=0, steps=6, patch_size=48, batch_size=2, restarts=0, lr_prior=4)
    return model, y, psf


def test_training_records_the_prior_and_a_checkpoint_keeps_it(trained, tmp_path):
    model, y, _ = trained
    # the data are clipped at 0 (the sensor detects it): the prior's zero is the clip level
    assert model.training["lr_prior"] == {"iterations": 4, "requested": 4, "background": 0.0}
    assert model.network.prior_iterations == 4
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.network.prior_iterations == 4
    np.testing.assert_array_equal(predict(loaded, y), predict(model, y))


def test_chunked_application_matches_whole_image_with_the_prior(trained):
    model, y, _ = trained
    whole = predict(model, y)
    h = model.halo
    chunked = _chunked(model, y)
    # the prior is cut at each chunk's halo (Lucy-Richardson's halo tolerance, 1e-3), and at
    # the volume's edges it is computed on the volume only, as in the whole-image run
    np.testing.assert_allclose(chunked, whole, atol=1e-3 * float(whole.max()))
    # an edge chunk without its position would mirror the volume into the prior: different
    block = np.pad(y[:56, :64], ((h, 0), (h, 0)), mode="symmetric")
    told = predict_chunk(model, block, margin=h, outside=[(h, 0), (h, 0)])
    untold = predict_chunk(model, block, margin=h)
    np.testing.assert_allclose(told[h : h + 16, h : h + 16], whole[:16, :16], atol=1e-3)
    assert np.abs(untold[h : h + 16, h : h + 16] - whole[:16, :16]).max() > 1e-3


def test_tiles_of_a_chunk_need_the_network_halo_only(trained, monkeypatch):
    """The prior is computed once per block, so its tiles carry the network's halo only (not
    the prior's margin, which the block's own halo holds), and give the one-tile result."""
    import ssi_dask.ssi.tiling as tiling

    model, y, _ = trained
    h, net_halo = model.halo, model.edge_halo
    assert net_halo < h  # the chunk halo includes the prior's margin
    block = np.pad(y[:64, :64], h, mode="symmetric")
    one_tile = predict_chunk(model, block, margin=h, tile_shape=64)
    shapes = []
    real = tiling.run_network

    def recording(net, inputs, *args):
        shapes.append(inputs.shape[1:])
        return real(net, inputs, *args)

    monkeypatch.setattr(tiling, "run_network", recording)
    tiled = predict_chunk(model, block, margin=h, tile_shape=16)
    inner = (slice(h, -h),) * 2
    np.testing.assert_allclose(tiled[inner], one_tile[inner], rtol=1e-5, atol=1e-5)
    # an interior tile: 16 kept pixels and the network's halo on both sides (it was the
    # chunk halo's, prior margin included, before)
    assert (16 + 2 * net_halo, 16 + 2 * net_halo) in shapes
    assert (16 + 2 * h, 16 + 2 * h) not in shapes


def test_interior_only_chunk_runs_the_network_on_the_chunk_alone(trained, monkeypatch):
    """For callers that crop the halo away: the chunk's output as with the whole block, the
    halo's output 0, and the network run on the chunk plus its own halo only."""
    import ssi_dask.ssi.tiling as tiling

    model, y, _ = trained
    h = model.halo
    block = np.pad(y[:64, :64], h, mode="symmetric")
    sizes = []
    real = tiling.run_network

    def recording(net, inputs, *args):
        sizes.append(inputs[0].size * len(inputs))
        return real(net, inputs, *args)

    monkeypatch.setattr(tiling, "run_network", recording)
    whole = predict_chunk(model, block, margin=h, tile_shape=64)
    work_whole, sizes[:] = sum(sizes), []
    chunk = predict_chunk(model, block, margin=h, tile_shape=64, interior_only=True)
    inner = (slice(h, -h),) * 2
    np.testing.assert_allclose(chunk[inner], whole[inner], rtol=1e-5, atol=1e-5)
    assert not chunk[:h].any() and not chunk[-h:].any() and not chunk[:, :h].any()
    assert sum(sizes) == (64 + 2 * model.edge_halo) ** 2 < work_whole


def test_auto_prior_uses_the_hold_out_choice():
    psf = gaussian_psf((9, 9), 1.6)
    y = _blurred((64, 64), psf, seed=5, noise=0.002)
    model = train_ssi(y, psf, seed=2, steps=2, patch_size=32, restarts=0, lr_prior="auto")
    # data never below zero: the prior's zero is the normalisation's offset
    zero = model.training["lr_prior"]["background"]
    assert zero == pytest.approx(model.normalisation["offset"], abs=1e-7)
    expected = choose_iterations(y - np.float32(zero), psf / psf.sum(), seed=2).num_iter
    assert model.training["lr_prior"] == {
        "iterations": expected,
        "requested": "auto",
        "background": zero,
        "max_iter": TrainingRecipe().for_ndim(2).lr_prior_max_iter,
    }
    pool = RegionPool([y[:32, :32], y[32:, 32:]], [(0, 0), (32, 32)], y.shape)
    model = train_ssi(pool, psf, seed=2, steps=2, patch_size=32, restarts=0, lr_prior="auto")
    zero = np.float32(model.training["lr_prior"]["background"])
    counts = [
        choose_iterations(r - zero, psf / psf.sum(), n_samples=1, seed=2 + i).num_iter
        for i, r in enumerate(pool.regions)
    ]
    assert model.training["lr_prior"]["iterations"] == int(np.median(counts))


def test_auto_prior_scores_counts_up_to_lr_prior_max_iter():
    psf = gaussian_psf((9, 9), 1.6)
    y = _blurred((64, 64), psf, seed=5, noise=0.0005)
    counts = {}
    for cap in (2, 200):
        model = train_ssi(y, psf, seed=2, steps=2, patch_size=32, restarts=0, lr_prior_max_iter=cap)
        zero = np.float32(model.training["lr_prior"]["background"])
        expected = choose_iterations(y - zero, psf / psf.sum(), seed=2, max_iter=cap).num_iter
        counts[cap] = model.training["lr_prior"]["iterations"]
        assert counts[cap] == expected
    assert counts[2] <= 2 < counts[200]  # the cap binds at 2 and not at 200
    with pytest.raises(ParameterError, match=r"^lr_prior_max_iter must be an integer >= 1, got 0$"):
        TrainingRecipe(lr_prior_max_iter=0)
    assert TrainingRecipe().for_ndim(2).lr_prior_max_iter == 50
    assert TrainingRecipe().for_ndim(3).lr_prior_max_iter == 100


def test_auto_prior_paired_rule_is_the_hold_out_rules_and_recorded():
    psf = gaussian_psf((9, 9), 1.6)
    y = _blurred((64, 64), psf, seed=5, noise=0.002)
    model = train_ssi(y, psf, seed=2, steps=2, patch_size=32, restarts=0, lr_prior_rule="paired")
    zero = np.float32(model.training["lr_prior"]["background"])
    paired = choose_iterations(y - zero, psf / psf.sum(), seed=2, rule="paired").num_iter
    one_se = choose_iterations(y - zero, psf / psf.sum(), seed=2).num_iter
    assert model.training["lr_prior"]["iterations"] == paired > one_se  # the rule matters here
    assert model.training["lr_prior"]["rule"] == "paired"
    with pytest.raises(
        ParameterError, match=r"^lr_prior_rule must be one of one-se, paired, got 'plain'$"
    ):
        TrainingRecipe(lr_prior_rule="plain")
    assert TrainingRecipe().for_ndim(2).lr_prior_rule == "one-se"
    assert TrainingRecipe().for_ndim(3).lr_prior_rule == "paired"


def test_accelerated_prior_is_chosen_recorded_kept_and_chunks_agree(tmp_path):
    psf = gaussian_psf((9, 9), 1.6)
    y = _blurred((96, 120), psf, seed=3, noise=0.002)
    model = train_ssi(
        y,
        psf,
        seed=2,
        steps=4,
        patch_size=48,
        batch_size=2,
        restarts=0,
        lr_prior_acceleration="nesterov",
    )
    zero = np.float32(model.training["lr_prior"]["background"])
    choice = choose_iterations(y - zero, psf / psf.sum(), seed=2, acceleration="nesterov")
    record = model.training["lr_prior"]
    assert record["iterations"] == choice.num_iter and record["acceleration"] == "nesterov"
    assert choice.num_iter > 2  # the momentum acts
    assert model.network.prior_acceleration == "nesterov"
    assert model.network.config["prior_acceleration"] == "nesterov"
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.network.prior_acceleration == "nesterov"
    whole = predict(model, y)
    np.testing.assert_array_equal(predict(loaded, y), whole)
    chunked = _chunked(model, y)
    np.testing.assert_allclose(chunked, whole, atol=1e-3 * float(whole.max()))
    with pytest.raises(
        ParameterError,
        match=r"^lr_prior_acceleration must be one of none, nesterov, got 'yes'$",
    ):
        TrainingRecipe(lr_prior_acceleration="yes")
    # the 3D default (twelfth session); 2D keeps classic iterations
    assert TrainingRecipe().for_ndim(3).lr_prior_acceleration == "nesterov"
    assert TrainingRecipe().for_ndim(2).lr_prior_acceleration == "none"
    assert TrainingRecipe(lr_prior_acceleration="none").for_ndim(3).lr_prior_acceleration == "none"


def test_prior_zero_is_the_datas_zero_under_zero_centred_noise():
    # noise around a zero background (no pedestal, not clipped): the normalisation's offset
    # lies ~3.7 sigmas below zero; the prior restores the data above their own zero instead
    from scipy.signal import fftconvolve

    psf = gaussian_psf((9, 9), 1.6)
    rng = np.random.default_rng(4)
    y = fftconvolve(_scene((64, 64), 4), psf, mode="same")
    y = (y + 0.004 * rng.standard_normal(y.shape)).astype(np.float32)
    model = train_ssi(y, psf, seed=2, steps=2, patch_size=32, restarts=0, lr_prior=3)
    offset, zero = model.normalisation["offset"], model.training["lr_prior"]["background"]
    # the zero: the data's (0), or the darkest noise-free level estimated from the noise
    # model (offset + 3.7 sigma) where lower; most of the pedestal is gone either way
    assert offset < -0.01 and offset / 2 < zero <= 0
    assert model.network.prior_background == pytest.approx(
        (zero - offset) / model.normalisation["scale"]
    )
    # the prior channel is the package's LR above that zero
    scale = model.normalisation["scale"]
    x = torch.from_numpy((y - np.float32(offset)) / np.float32(scale))[None, None]
    prior = model.network.prior(x)[0, 0].numpy() * scale + offset
    reference = richardson_lucy(np.clip(y - zero, 0, None), psf, num_iter=3) + zero
    np.testing.assert_allclose(prior, reference, atol=2e-4)
    assert np.abs(reference - richardson_lucy(y - offset, psf, num_iter=3) - offset).max() > 0.005


def test_train_settings_check_lr_prior_from_python():
    from ssi_dask.config import TrainSettings

    assert TrainSettings(lr_prior="auto").recipe().lr_prior == "auto"
    assert TrainSettings().recipe().lr_prior is None  # the per-dimensionality default
    with pytest.raises(ParameterError, match=r"^lr_prior must be an integer >= 0, got -2$"):
        TrainSettings(lr_prior=-2)


def _masked_lucy_richardson(y, psf, visible, n, edge_threshold=1e-3, eps=1e-6):
    """Reference: Lucy-Richardson on the PSF-extended domain with the pixels outside
    ``visible`` unmeasured (no data term there, edge weights ``h^T 1_visible``), in NumPy."""
    from scipy.signal import fftconvolve

    y = y.astype(np.float64).clip(0) + eps
    flipped = psf[::-1, ::-1].astype(np.float64)
    visible = visible.astype(np.float64)
    full = fftconvolve(np.ones_like(y), flipped, mode="full")
    valid = full > edge_threshold * full.max()
    weights = fftconvolve(visible, flipped, mode="full")
    weights = np.where(valid, np.maximum(weights, edge_threshold * full.max()), 1.0)
    est = np.full(full.shape, (y * visible).sum() / visible.sum()) * valid
    for _ in range(n):
        ratio = visible * y / np.maximum(fftconvolve(est, psf, mode="valid"), eps)
        est = est * fftconvolve(ratio, flipped, mode="full") / weights
    r = [(k - 1) // 2 for k in psf.shape]
    return est[r[0] : r[0] + y.shape[0], r[1] : r[1] + y.shape[1]]


def test_prior_of_a_masked_step_ignores_the_hidden_pixels():
    # at a training step the masked pixels are not measured data for the prior: it does not
    # depend on their values (J-invariance without a fill's bias), matches a NumPy reference,
    # and with nothing hidden it is the package's Lucy-Richardson
    psf = gaussian_psf((9, 9), 1.8)
    y = _blurred((48, 56), psf, noise=0.02)
    rng = np.random.default_rng(3)
    hidden = rng.random(y.shape) < 0.1
    prior = LucyRichardsonPrior(psf, 6)
    batch = torch.from_numpy(y)[None, None]
    mask = torch.from_numpy(hidden)[None, None]
    ours = prior(batch, mask)[0, 0].numpy()
    reference = _masked_lucy_richardson(y, psf, ~hidden, 6)
    np.testing.assert_allclose(ours, reference, atol=2e-4 * float(reference.max()))
    assert np.abs(reference - _masked_lucy_richardson(y, psf, np.ones_like(hidden), 6)).max() > 0.01
    scrambled = y.copy()
    scrambled[hidden] = rng.uniform(0, 10, int(hidden.sum()))
    changed = prior(torch.from_numpy(scrambled)[None, None], mask)[0, 0].numpy()
    np.testing.assert_array_equal(changed, ours)
    nothing = prior(batch, torch.zeros_like(mask))[0, 0].numpy()
    np.testing.assert_allclose(nothing, richardson_lucy(y, psf, num_iter=6), atol=2e-4)


def test_prior_restores_the_data_above_its_background():
    # the prior's zero level: Lucy-Richardson of the data minus it, plus it; a network keeps
    # it in its config (a checkpoint's) and its untrained output is that prior
    psf = gaussian_psf((9, 9), 1.6)
    y = _blurred((40, 44), psf, seed=1, noise=0.002) + 0.3
    ours = LucyRichardsonPrior(psf, 5, background=0.3)(torch.from_numpy(y)[None, None])[0, 0]
    reference = richardson_lucy(np.clip(y - 0.3, 0, None), psf, num_iter=5) + 0.3
    np.testing.assert_allclose(ours.numpy(), reference, atol=2e-4 * float(reference.max()))
    plain = richardson_lucy(y, psf, num_iter=5)
    assert np.abs(plain - reference).max() > 0.05  # the pedestal matters
    net = UNet(
        levels=2,
        base_channels=4,
        prior_iterations=5,
        prior_psf_shape=psf.shape,
        prior_background=0.3,
    )
    net.prior_psf.copy_(torch.from_numpy(psf))
    assert build_network(net.config).prior_background == 0.3
    torch.testing.assert_close(net(torch.from_numpy(y)[None, None])[0, 0], ours)


def test_samples_served_again_keep_their_prior_under_the_psf_symmetries():
    # prior_reuse: a prepared sample served again goes through a random symmetry of the PSF;
    # its kept prior must then still be the prior of its (transformed) masked patch
    from ssi_dask.ssi.masking import mask_input
    from ssi_dask.ssi.symmetry import psf_symmetries
    from ssi_dask.ssi.train import _PreparedSamples

    psf = gaussian_psf((7, 9, 9), (1.5, 1.2, 1.2))
    symmetries = psf_symmetries(psf)
    assert len(symmetries) == 16  # flips of three axes, lateral swap
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.random((3, 1, 12, 20, 20)).astype(np.float32))
    m = torch.from_numpy(rng.random(x.shape) < 0.2)
    scored = torch.from_numpy(rng.random(x.shape) < 0.9)
    prior = LucyRichardsonPrior(psf, 5)
    pool = _PreparedSamples(4, 8, symmetries, torch.Generator().manual_seed(0))
    pool.add(x, scored, m, prior(mask_input(x, m), m))
    seen = set()
    for _ in range(8):
        xs, ss, ms, ps = pool.again(2)
        np.testing.assert_allclose(ps, prior(mask_input(xs, ms), ms), atol=1e-5)
        assert xs.shape == x[:2].shape and ss.dtype == torch.bool and ms.dtype == torch.bool
        # each sample comes back as some kept sample under some symmetry, with its own mask
        for i in range(2):
            seen.update(
                (j, k)
                for j in range(3)
                for k, t in enumerate(symmetries)
                if torch.equal(apply_symmetry(x[j : j + 1], t), xs[i : i + 1])
                and torch.equal(apply_symmetry(m[j : j + 1], t), ms[i : i + 1])
            )
    assert len({j for j, _ in seen}) > 1 and len({k for _, k in seen}) > 4


def apply_symmetry(x, t):
    from ssi_dask.ssi.symmetry import apply

    return apply(x, t)


@pytest.mark.parametrize("reuse, batch", [(1, 2), (2, 2), (4, 2), (3, 16)])
def test_prior_reuse_prepares_one_fresh_sample_per_reuse_served(reuse, batch):
    from ssi_dask.ssi.train import _PreparedSamples

    pool = _PreparedSamples(reuse, 8 * batch, [((), False)], torch.Generator().manual_seed(0))
    fresh = []
    for _ in range(60):
        n = pool.fresh_count(batch)
        fresh.append(n)
        if n:
            pool.add(torch.zeros(n, 1, 4, 4))
        pool.served += batch
    assert fresh[0] == batch  # nothing kept yet: all fresh
    assert abs(sum(fresh) - 60 * batch / reuse) <= batch
    assert len(pool.samples) <= 8 * batch


def test_training_with_prior_reuse_records_it_and_checks_it():
    psf = gaussian_psf((5, 7, 7), (1.2, 1.0, 1.0))
    y = _blurred((16, 40, 40), psf, seed=2)
    model = train_ssi(
        y,
        psf,
        seed=0,
        steps=8,
        patch_size=16,
        batch_size=2,
        restarts=0,
        lr_prior=3,
        prior_reuse=4,
    )
    assert model.training["lr_prior"]["reuse"] == 4
    assert np.isfinite(predict(model, y)).all()
    plain = train_ssi(y, psf, seed=0, steps=2, patch_size=16, batch_size=2, restarts=0, lr_prior=3)
    assert "reuse" not in plain.training["lr_prior"]  # recorded only when used
    with pytest.raises(ParameterError, match=r"^prior_reuse must be an integer >= 1, got 0$"):
        TrainingRecipe(prior_reuse=0)
    with pytest.raises(ParameterError, match=r"^prior_reuse=2 needs a Lucy-Richardson prior"):
        TrainingRecipe(prior_reuse=2, lr_prior=0)
