"""Distributed SSI: regions sampled through Dask, training on them, chunked batched inference.

Real parts only: Zarr stores on disk, a real LocalCluster (``local_client``), real training of
a tiny UNet for a few steps.
"""

from __future__ import annotations

import importlib
import itertools
import math

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from conftest import smooth_volume

import ssi_dask
from ssi_dask.errors import ParameterError
from ssi_dask.ssi import (
    SSIModel,
    UNet,
    choose_tile,
    load_checkpoint,
    predict,
    predict_block,
    predict_chunk,
    save_checkpoint,
)
from ssi_dask.ssi.tiling import bytes_per_voxel
from ssi_dask.training import sample_regions

# A tiny UNet trained for a few steps: a wide output range keeps its output unclipped. No
# Lucy-Richardson prior (the 3D default; tests/test_ssi_prior.py): its halo would exceed the
# small chunks these tests cut the volume into.
TINY = dict(
    lr_prior=0,
    steps=6,
    restarts=0,
    patch_size=24,
    batch_size=2,
    levels=2,
    base_channels=4,
    eval_every=3,
    learning_rate=0.01,
    output_range=(-1.0, 2.0),
    # without the 3D default's noise penalty (tests/test_ssi_train.py): these tests are about
    # where and how a model runs, and the seam test's check that the 6-step model's output is
    # not flat was set on this recipe (with the penalty the same check read 0.08 of the
    # volume's range instead of >= 0.1: another 6-step trajectory, not a seam)
    noise_penalty_weight=0.0,
)
NO_TTA = [[[], False]]  # test-time averaging over the PSF's 16 symmetries is too slow here


class RecordingArray:
    """A NumPy-backed array-like that records every region read from it (for Dask)."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads = []

    def __getitem__(self, key):
        block = self.array[key]
        if block.size:
            self.reads.append(tuple((s.start or 0, s.stop) for s in key))
        return block


def _chunks_touched(origins, region, chunk):
    """Chunk indices of a regular grid that boxes at ``origins`` of size ``region`` touch."""
    touched = set()
    for org in origins:
        ranges = [range(o // c, (o + r - 1) // c + 1) for o, r, c in zip(org, region, chunk)]
        touched.update(itertools.product(*ranges))
    return touched


def test_sample_regions_reads_only_the_chunks_of_sampled_regions():
    volume = smooth_volume((32, 96, 96), seed=2)
    chunk = (8, 16, 16)
    recorder = RecordingArray(volume)
    data = da.from_array(recorder, chunks=chunk, meta=np.empty((0, 0, 0), np.float32))
    pool = sample_regions(data, (8, 24, 24), n_regions=3, background=0.0, seed=5)
    origins = pool.info["origins"]
    assert len(origins) == 3 and pool.info["kept"] == 3
    read_chunks = {tuple(lo // c for (lo, _), c in zip(r, chunk)) for r in recorder.reads}
    expected = _chunks_touched(origins, (8, 24, 24), chunk)
    assert read_chunks == expected
    assert len(read_chunks) < math.prod(s // c for s, c in zip(volume.shape, chunk)) / 4
    for region, org in zip(pool.regions, pool.origins):
        box = tuple(slice(int(o), int(o) + s) for o, s in zip(org, (8, 24, 24)))
        np.testing.assert_array_equal(region, volume[box])
    # the global statistics are the percentiles of every sampled voxel
    values = np.concatenate(
        [
            volume[tuple(slice(o, o + s) for o, s in zip(org, (8, 24, 24)))].ravel()
            for org in origins
        ]
    )
    assert pool.statistics((0.1, 99.9)) == pytest.approx(
        tuple(np.percentile(values, (0.1, 99.9))), rel=1e-6
    )


def test_background_regions_are_rejected_by_intensity():
    rng = np.random.default_rng(0)
    volume = (0.01 * rng.random((16, 64, 128))).astype(np.float32)  # empty, faint noise
    volume[:, :, 64:] += smooth_volume((16, 64, 64), seed=3)  # signal in the right half
    pool = sample_regions(volume, (8, 16, 16), n_regions=4, candidates=40, seed=1)
    info = pool.info
    assert info["rejected_as_background"] > 0 and info["kept"] == 4
    # every kept region overlaps the bright half (x >= 64)
    assert all(o[2] + 16 > 64 for o in info["origins"])
    # the statistics still describe the whole volume: the low percentile is background
    assert info["statistics"][0] < 0.01
    kept_all = sample_regions(volume, (8, 16, 16), n_regions=40, background=0.0, seed=1)
    assert kept_all.info["rejected_as_background"] == 0 and kept_all.info["kept"] == 40


def test_region_patches_carry_global_origins():
    volume = smooth_volume((16, 48, 64), seed=4)
    pool = sample_regions(volume, (16, 32, 32), n_regions=3, background=0.0, seed=2)
    sampler = pool.patch_sampler((8, 16, 16), seed=0)
    patches, origins = sampler.batch(12)
    for patch, org in zip(patches, origins):
        box = tuple(slice(int(o), int(o) + s) for o, s in zip(org, (8, 16, 16)))
        np.testing.assert_array_equal(patch, volume[box])


def test_sample_regions_bad_parameters():
    volume = np.zeros((16, 32, 32), np.float32)
    with pytest.raises(ParameterError, match="region_shape"):
        sample_regions(volume, (8, 8))
    with pytest.raises(ParameterError, match="background must be in"):
        sample_regions(volume, 8, background=1.5)
    with pytest.raises(ParameterError, match="on_worker=True needs a client"):
        ssi_dask.train(volume, np.ones((3, 3, 3)), on_worker=True)


@pytest.fixture(scope="module")
def sampled_model(tmp_path_factory, psf3d):
    """A tiny model trained with ``ssi_dask.train`` on regions of a Zarr volume on disk."""
    folder = tmp_path_factory.mktemp("distributed")
    volume = smooth_volume((32, 64, 96), seed=6)
    # a strong brightness ramp along x: per-chunk normalisation would show at chunk borders
    volume = volume * np.linspace(1.0, 6.0, volume.shape[2], dtype=np.float32)
    path = folder / "volume.zarr"
    array = zarr.create_array(store=str(path), shape=volume.shape, chunks=(16, 32, 32), dtype="f4")
    array[...] = volume
    model = ssi_dask.train(
        str(path), psf3d, seed=0, device="cpu", n_regions=4, region_shape=(24, 32, 32), **TINY
    )
    model.training["symmetries"] = NO_TTA
    checkpoint = folder / "model.pt"
    save_checkpoint(model, checkpoint)
    return path, volume, model, checkpoint


def test_train_stores_global_statistics_and_sampling(sampled_model):
    path, volume, model, checkpoint = sampled_model
    info = model.training["sampling"]
    assert info["volume_shape"] == [32, 64, 96] and info["kept"] == 4
    assert info["trained_on"] == "client"
    lo, hi = info["statistics"]
    assert model.normalisation["offset"] == pytest.approx(lo)
    assert model.normalisation["scale"] == pytest.approx(hi - lo)
    assert volume.min() <= lo < hi <= volume.max()
    loaded = load_checkpoint(checkpoint)
    assert loaded.normalisation == model.normalisation
    assert loaded.training["sampling"]["origins"] == info["origins"]
    assert loaded.training["steps"] == TINY["steps"]


def test_no_seams_chunked_equals_whole_volume(sampled_model, local_client, psf3d):
    path, volume, model, checkpoint = sampled_model
    chunks = (16, 32, 32)
    lazy = ssi_dask.deconvolve(str(path), psf3d, method="ssi", model=str(checkpoint), chunks=chunks)
    assert lazy.numblocks == (2, 2, 3)  # 12 chunks
    # Dask's active memory manager drops a replica that no waiting task on its worker needs
    # (every 2 s), and a later chunk there fetches it again: with it running, this check of
    # the graph (one model key, fetched once per worker) failed about once in 15 runs.
    local_client.amm.stop()
    try:
        chunked = local_client.compute(lazy).result()
    finally:
        local_client.amm.start()
    whole = predict(load_checkpoint(checkpoint), volume, device="cpu")
    data_range = float(np.ptp(whole))
    lo, hi = model.value_range
    assert data_range > 0.1 * float(np.ptp(volume)) and np.mean((whole > lo) & (whole < hi)) > 0.9
    assert np.abs(chunked - whole).max() <= 1e-3 * data_range
    # the model reached each worker at most once: one worker computed its key, the others
    # fetched it from a peer once
    model_key = next(k for k in lazy.__dask_graph__() if str(k).startswith("shared-model-"))
    logs = local_client.run(
        lambda dask_worker: [
            t["keys"].get(model_key)
            for t in dask_worker.transfer_incoming_log
            if model_key in t["keys"]
        ]
    )
    transfers = [len(v) for v in logs.values()]
    assert all(n <= 1 for n in transfers)
    assert sum(transfers) <= len(logs) - 1


def test_train_on_a_worker(sampled_model, local_client, psf3d):
    path, volume, model, _ = sampled_model
    remote = ssi_dask.train(
        str(path),
        psf3d,
        seed=0,
        device="cpu",
        n_regions=4,
        region_shape=(24, 32, 32),
        client=local_client,
        on_worker=True,
        **TINY,
    )
    assert remote.training["sampling"]["trained_on"] == "worker"
    remote.training["symmetries"] = NO_TTA
    # the same regions (same seed) and the same training: the same model up to float rounding
    assert remote.training["sampling"]["origins"] == model.training["sampling"]["origins"]
    a = predict(remote, volume[:, :32, :32], device="cpu")
    b = predict(model, volume[:, :32, :32], device="cpu")
    assert np.abs(a - b).max() <= 1e-3 * float(np.ptp(b))


def _random_model(levels=2, base=4):
    torch.manual_seed(1)
    net = UNet(3, levels=levels, base_channels=base, batch_norm=False).eval()
    symmetries = [[[], False], [[2], False]]
    return SSIModel(
        net,
        {"offset": 0.2, "scale": 2.0, "output_range": (-5.0, 5.0)},
        np.ones((3, 3, 3), np.float32) / 27,
        {"symmetries": symmetries},
    )


def test_predict_chunk_in_batched_tiles_equals_whole_block():
    model = _random_model(base=2)
    h = model.halo
    block = np.random.default_rng(0).random((2 * h + 10, 2 * h + 14, 2 * h + 9)).astype("f4")
    expected = predict_block(model, block, device="cpu")
    # explicit tiles: 3 x 4 x 3 tiles of 3 shapes, each shape one batch
    out = predict_chunk(model, block, device="cpu", tile_shape=(4, 4, 4))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # a small memory budget: the interior (10, 14, 10 after alignment) does not fit; halving
    # the longest side 14 -> 8, then 10 -> 6 gives an input of 26 * 28 * 30 <= 28^3 voxels
    per_voxel = bytes_per_voxel(model.network)
    budget = per_voxel * (2 * h + 8) ** 3
    assert choose_tile((10, 14, 9), h, 2, budget, per_voxel) == (6, 8, 10)
    small = predict_chunk(model, block, device="cpu", budget=budget)
    np.testing.assert_allclose(small, expected, atol=1e-5)


def test_choose_tile_fits_the_budget():
    # whole interior when it fits
    assert choose_tile((30, 64, 64), 10, 2, 10**12, 100) == (30, 64, 64)
    # halving the longest side (the first on ties) until prod(t + 2 h) * bytes fits:
    # (30, 64, 64) -> (30, 32, 64) -> (30, 32, 32) -> (30, 16, 32): 50 * 36 * 52 <= 36 * 52^2
    budget = (16 + 20) * (32 + 20) * (32 + 20) * 100
    assert choose_tile((30, 64, 64), 10, 2, budget, 100) == (30, 16, 32)
    # never below the alignment
    assert choose_tile((30, 64, 64), 10, 4, 1, 100) == (4, 4, 4)
    net = UNet(3, levels=3, base_channels=8, batch_norm=False)
    # on the CPU with the inference copy: the float32 values alive at the peak (measured
    # 0.63-0.71 of it, benchmarks/ssi_tile_budget.py); elsewhere (unmeasured): four times
    assert bytes_per_voxel(net) == 4 * (3 * 8 + 2 * 16 + 4) == 240


def test_bytes_per_voxel_is_four_times_without_the_inference_copy(monkeypatch):
    predict_module = importlib.import_module("ssi_dask.ssi.predict")  # not the function
    net = UNet(3, levels=3, base_channels=8, batch_norm=False)
    monkeypatch.setattr(predict_module, "FAST_INFERENCE", False)
    assert bytes_per_voxel(net) == 960


def test_chunk_task_bytes_counts_the_block_the_prior_and_the_tiles():
    from ssi_dask.ssi.forward import _fast_size
    from ssi_dask.ssi.tiling import (
        CPU_BUDGET_BYTES,
        PRIOR_BYTES_PER_VOXEL,
        chunk_task_bytes,
        prior_bytes,
        tile_budget,
    )

    plain = UNet(3, levels=3, base_channels=8, batch_norm=False)
    assert plain.edge_halo == 24
    chunk, margins = (64, 256, 256), (24, 84, 84)
    padded = 112 * 424 * 424
    tiled = (64 + 48) * (256 + 48) ** 2  # the tiles cover the chunk and the network's halo
    # without a prior: the block's arrays plus the tiles, capped by the budget
    assert prior_bytes(plain, (112, 424, 424)) == 0
    assert CPU_BUDGET_BYTES[3] < 240 * tiled
    assert chunk_task_bytes(plain, chunk, margins) == 16 * padded + CPU_BUDGET_BYTES[3]
    assert chunk_task_bytes(plain, chunk, margins, budget=2**20) == 16 * padded + 2**20
    # 2D keeps the tiles it had: 256 MiB at the halved estimate = 512 MiB at the old one
    assert tile_budget("cpu", ndim=2) == 256 * 2**20 and tile_budget("cpu") == 2**30
    assert (
        choose_tile((2048, 2048), 24, 4, 256 * 2**20, 240)
        == choose_tile((2048, 2048), 24, 4, 512 * 2**20, 480)
        == (512, 1024)
    )
    assert chunk_task_bytes(plain, chunk, margins, budget=2**40) == 16 * padded + 240 * tiled
    # with the 3D benchmark's prior: its FFT domain (block + PSF - 1, at fast sizes)
    prior = UNet(
        3, levels=3, base_channels=8, batch_norm=False, prior_iterations=30,
        prior_psf_shape=(17, 31, 31), prior_acceleration="nesterov",
    )  # fmt: skip
    assert (_fast_size(128), _fast_size(454), _fast_size(710)) == (128, 480, 720)
    assert prior_bytes(prior, (112, 424, 424)) == PRIOR_BYTES_PER_VOXEL * 128 * 480 * 480
    # a wider chunk: the prior, not the tiles (capped by the budget), sets the peak
    domain = 128 * 720 * 720
    assert PRIOR_BYTES_PER_VOXEL * domain > CPU_BUDGET_BYTES[3]
    wide = chunk_task_bytes(prior, (64, 512, 512), margins)
    assert wide == 16 * 112 * 680 * 680 + PRIOR_BYTES_PER_VOXEL * domain


@pytest.mark.gpu
def test_predict_chunk_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    model = _random_model()
    h = model.halo
    block = np.random.default_rng(0).random((2 * h + 32,) * 3).astype("f4")
    cpu = predict_chunk(model, block, device="cpu")
    gpu = predict_chunk(model, block, device="cuda")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@pytest.mark.gpu
def test_ssi_on_local_cuda_cluster_matches_cpu(sampled_model, psf3d):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    pytest.importorskip("dask_cuda", reason="dask-cuda is not installed")
    from ssi_dask.cluster import dask_client

    path, volume, model, checkpoint = sampled_model
    lazy = ssi_dask.deconvolve(
        str(path), psf3d, method="ssi", model=str(checkpoint), chunks=(16, 32, 32), device="gpu"
    )
    with dask_client(gpu=True) as client:
        result = client.compute(lazy).result()
    whole = predict(load_checkpoint(checkpoint), volume, device="cpu")
    assert np.abs(result - whole).max() <= 1e-3 * float(np.ptp(whole))
