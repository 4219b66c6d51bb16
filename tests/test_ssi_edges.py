"""SSI at the volume's edges (issue 16): ``edges="background"`` training patches reach past the
edges, hold the background level there and score the pixels up to the edge; inference pads the
volume's edges with the same level on every path (whole image, map_overlap, store tasks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssi_dask import deconvolve
from ssi_dask.errors import ParameterError
from ssi_dask.ssi import SSIModel, UNet, predict, predict_chunk, train_ssi
from ssi_dask.ssi.predict import run_network
from ssi_dask.ssi.regions import RegionPool
from ssi_dask.ssi.sampler import PatchSampler, inside_mask


def test_patch_sampler_overhang_holds_fill_outside_and_the_image_inside():
    image = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    sampler = PatchSampler(image, (8, 10), seed=1, overhang=(4, 5), fill=-1.0)
    patches, origins = sampler.batch(400)
    assert origins[:, 0].min() == -4 and origins[:, 0].max() == 20 - 8 + 4
    assert origins[:, 1].min() == -5 and origins[:, 1].max() == 30 - 10 + 5
    for patch, (oy, ox) in zip(patches, origins):
        inside = inside_mask((oy, ox), (8, 10), image.shape)
        ys, xs = np.nonzero(inside)
        np.testing.assert_array_equal(patch[inside], image[ys + oy, xs + ox])
        assert np.all(patch[~inside] == -1.0)
    # without overhang every patch lies inside, as before
    plain = PatchSampler(image, (8, 10), seed=1)
    _, origins = plain.batch(200)
    assert origins.min() >= 0 and origins[:, 0].max() <= 12 and origins[:, 1].max() <= 20


def test_region_patches_overhang_only_past_the_volume_edges():
    volume = np.arange(40 * 40, dtype=np.float32).reshape(40, 40) + 1
    origins = [(0, 0), (12, 12)]  # one region at the volume's corner, one inside
    regions = [volume[y : y + 16, x : x + 16] for y, x in origins]
    pool = RegionPool(regions, origins, volume.shape)
    patches, where = pool.patch_sampler((8, 8), seed=0, overhang=(4, 4), fill=0.0).batch(600)
    for patch, (oy, ox) in zip(patches, where):
        inside = inside_mask((oy, ox), (8, 8), volume.shape)
        ys, xs = np.nonzero(inside)
        np.testing.assert_array_equal(patch[inside], volume[ys + oy, xs + ox])
        assert np.all(patch[~inside] == 0.0)
    assert where.min() == -4  # the corner region reaches past the volume's edge
    interior = (where >= 12).all(axis=1)
    assert interior.any() and where[interior].max() <= 12 + 16 - 8  # never past its own sides


def _model(edges: str, offset: float = 0.25) -> SSIModel:
    torch.manual_seed(2)
    network = UNet(2, levels=2, base_channels=4, batch_norm=False).eval()
    training = (
        {"edges": {"mode": "background", "overhang": [8, 8]}} if edges == "background" else {}
    )
    return SSIModel(
        network,
        {"offset": offset, "scale": 2.0, "output_range": (-10.0, 10.0)},
        np.ones((3, 3), np.float32) / 9,
        training,
    )


def test_predict_pads_with_the_background_and_chunked_runs_equal_it():
    image = np.random.default_rng(0).random((64, 48), dtype=np.float32)
    model = _model("background")
    assert model.edge_fill == 0.25 and _model("inside").edge_fill is None
    whole = predict(model, image, tta=1)
    # independent reference: the network on the image padded with the background level
    halo = model.halo
    padded = np.pad((image - 0.25) / 2.0, halo, mode="constant", constant_values=0)
    reference = run_network(model.network, padded[None], torch.device("cpu"))[0]
    reference = reference[halo:-halo, halo:-halo] * 2.0 + 0.25
    np.testing.assert_allclose(whole, reference, atol=1e-5)
    mirrored = predict(_model("inside"), image, tta=1)
    assert np.abs(mirrored - whole).max() > 1e-3  # the padding matters at the edges
    # map_overlap path, chunks at and away from the edges
    chunked = deconvolve(image, model.psf, "ssi", model=model, chunks=(32, 24), tta=1)
    np.testing.assert_allclose(np.asarray(chunked), whole, atol=1e-5)
    # one chunk with its halo as map_overlap(boundary="reflect") gives it, told which of its
    # voxels lie past the edges
    block = np.pad(image, halo, mode="symmetric")[: 32 + 2 * halo, : 32 + 2 * halo]
    out = predict_chunk(model, block, halo, tta=1, outside=[(halo, 0), (halo, 0)])
    np.testing.assert_allclose(out[halo : halo + 32, halo : halo + 32], whole[:32, :32], atol=1e-5)
    with pytest.raises(ParameterError, match=r"outside must give \(before, after\) >= 0 voxels"):
        predict_chunk(model, block, halo, tta=1, outside=[(halo, 0)])
    unfilled = predict_chunk(model, block, halo, tta=1)
    assert np.abs(unfilled[halo : halo + 32, halo : halo + 32] - whole[:32, :32]).max() > 1e-3


def test_edges_background_training_records_the_mode_and_refuses_unknown_modes():
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    psf = np.ones((5, 5), np.float32) / 25
    options = dict(steps=4, patch_size=32, batch_size=2, restarts=0, device="cpu", seed=0)
    model = train_ssi(image, psf, edges="background", **options)
    assert model.training["edges"] == {"mode": "background", "overhang": [16, 16]}
    assert model.edge_fill == pytest.approx(model.normalisation["offset"])
    inside = train_ssi(image, psf, **options)
    assert "edges" not in inside.training and inside.edge_fill is None
    with pytest.raises(ParameterError, match="edges must be one of background, inside, got 'zero'"):
        train_ssi(image, psf, edges="zero", **options)
