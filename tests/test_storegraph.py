"""Zarr-to-Zarr runs with one task per working chunk (issue 15): bit-identical to the
``map_overlap`` path, about one scheduler task per chunk, resumable and verifiable."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import zarr
from conftest import smooth_volume, tree_digest
from distributed.diagnostics.plugin import SchedulerPlugin

import ssi_dask
from ssi_dask import deconvolve, write_zarr
from ssi_dask.progress import progress_folder


class CountTasks(SchedulerPlugin):
    """Every key the scheduler sends to a worker, from registration on."""

    name = "ssi-dask-count-tasks"

    def __init__(self) -> None:
        self.keys: set = set()

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "processing":
            self.keys.add(key)


def _counting(client):
    client.register_plugin(CountTasks())

    def count() -> int:
        n = client.run_on_scheduler(
            lambda dask_scheduler: len(dask_scheduler.plugins[CountTasks.name].keys)
        )
        client.unregister_scheduler_plugin(CountTasks.name)
        return n

    return count


def _tiny_model(ndim: int, psf: np.ndarray, edges: str = "inside", prior: int = 0):
    """An untrained network whose output varies with the data (so a difference shows), with
    the PSF's symmetries for test-time averaging; ``edges="background"``: a model trained with
    the background past the volume's edges (padded with it at inference); ``prior``: a
    Lucy-Richardson prior of that many iterations."""
    import torch

    from ssi_dask.ssi import SSIModel, UNet
    from ssi_dask.ssi.symmetry import psf_symmetries

    torch.manual_seed(3)
    extra = {"prior_iterations": prior, "prior_psf_shape": psf.shape} if prior else {}
    network = UNet(ndim, levels=2, base_channels=4, batch_norm=False, **extra).eval()
    if prior:
        with torch.no_grad():
            network.prior_psf.copy_(torch.from_numpy(psf / psf.sum()))
            torch.nn.init.normal_(network.head.weight, std=0.5)  # the correction is not 0
    symmetries = [[list(flips), swap] for flips, swap in psf_symmetries(psf)]
    training = {"symmetries": symmetries}
    if edges == "background":
        training["edges"] = {"mode": "background", "overhang": [8] * ndim}
    return SSIModel(
        network,
        # the data (uint16 up to ~3000) normalised to about [0, 1]
        {
            "offset": 200.0 if edges == "background" else 0.0,
            "scale": 3000.0,
            "output_range": (-5.0, 5.0),
        },
        psf.astype(np.float32),
        training,
    )


CASES = {
    # ndim, method, shape, store chunks, working chunks (none divides the shape)
    "2d-lr": (2, "lr", (150, 170), (25, 25), (50, 75)),
    "3d-lr": (3, "lr", (21, 70, 90), (21, 10, 10), (21, 30, 40)),
    "2d-ssi": (2, "ssi", (90, 110), (16, 16), (32, 48)),
    "3d-ssi": (3, "ssi", (20, 44, 60), (20, 8, 8), (20, 16, 24)),
    # a model trained with the background past the volume's edges: both paths pad with it
    "2d-ssi-edges": (2, "ssi", (90, 110), (16, 16), (32, 48)),
    # a model with a Lucy-Richardson prior: both paths compute it on the volume's part of a block
    "2d-ssi-prior": (2, "ssi", (96, 96), (16, 16), (32, 48)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_store_graph_is_bit_identical_with_one_task_per_chunk(tmp_path, local_client, case):
    from ssi_dask.psf import widefield_psf

    ndim, method, shape, store_chunks, chunks = CASES[case]
    volume = (smooth_volume(shape, seed=5) * 3000).astype(np.uint16)
    source = tmp_path / "input.zarr"
    zarr.create_array(store=str(source), shape=shape, chunks=store_chunks, dtype="uint16")[...] = (
        volume
    )
    before = tree_digest(source)
    if ndim == 3:
        psf = widefield_psf((5, 7, 7), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)
    else:
        psf = widefield_psf((7, 7), (0.15, 0.15), na=1.0, wavelength=0.52)
    import tifffile

    psf_file = tmp_path / "psf.tif"
    tifffile.imwrite(psf_file, psf)
    edges = "background" if case.endswith("-edges") else "inside"
    prior = 3 if case.endswith("-prior") else 0
    model = _tiny_model(ndim, psf, edges, prior) if method == "ssi" else None
    depth = None
    if model is not None:
        depth = (min(model.halo, min(chunks)),) * ndim  # the tiny test chunks bound the halo
        # 3D: a test-time transform count other than the default reaches the chunks
        tta = 4 if ndim == 3 else None
        options = {"model": model, "depth": depth, "tta": tta}
    else:
        options = {"num_iter": 4}

    # the map_overlap path (deconvolve + write_zarr), tasks counted on the scheduler
    count = _counting(local_client)
    reference = deconvolve(str(source), psf, method, chunks=chunks, **options)
    write_zarr(reference, tmp_path / "reference.zarr", client=local_client)
    overlap_tasks = count()

    job = ssi_dask.Job(
        input=source,
        output=tmp_path / "out.zarr",
        method=method,
        psf=ssi_dask.PSFSettings(files=(str(psf_file),)),
        lr=ssi_dask.LRSettings(num_iter=4) if method == "lr" else ssi_dask.LRSettings(),
        layout=ssi_dask.LayoutSettings(chunks=chunks, depth=depth),
        ssi=ssi_dask.SSISettings(model=model, tta=tta)
        if model is not None
        else ssi_dask.SSISettings(),
        progress=False,
    )
    count = _counting(local_client)
    report = ssi_dask.run(job, client=local_client, echo=None)
    store_tasks = count()

    expected = zarr.open_array(str(tmp_path / "reference.zarr"), mode="r")[...]
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    np.testing.assert_array_equal(out[...], expected)  # bit-identical, edges included
    assert out.attrs["ssi_dask"]["complete"] is True
    assert ssi_dask.verify_output(tmp_path / "out.zarr", check_data=True).ok
    n_chunks = report.chunks
    assert n_chunks == int(np.prod([-(-s // c) for s, c in zip(shape, chunks)]))
    assert store_tasks == n_chunks + 1  # one per chunk plus the shared PSF/model task
    assert store_tasks / n_chunks <= 1.5 < overlap_tasks / n_chunks
    assert report.plan.n_tasks == n_chunks + 1
    assert tree_digest(source) == before
    if edges == "background":  # the background padding reached the chunks at the edges
        mirrored = _tiny_model(ndim, psf)
        mirrored.normalisation = dict(model.normalisation)
        other = np.asarray(
            deconvolve(str(source), psf, method, chunks=chunks, model=mirrored, depth=depth)
        )
        differs = np.abs(other - expected) > 1e-3
        inner = tuple(slice(model.halo, -model.halo) for _ in depth)
        assert differs.any() and not differs[inner].any()  # at the edges only
    if method == "ssi" and ndim == 3:  # the count given, not the default, was applied
        assert out.attrs["ssi_dask"]["computation"]["tta"] == 4
        default = deconvolve(str(source), psf, method, chunks=chunks, model=model, depth=depth)
        assert not np.array_equal(np.asarray(default), expected)


def test_store_graph_resume_recomputes_only_lost_chunks(tmp_path, local_client, psf3d_file):
    shape = (16, 40, 60)
    volume = smooth_volume(shape, seed=2)
    source = tmp_path / "input.zarr"
    zarr.create_array(store=str(source), shape=shape, chunks=(16, 20, 20), dtype="f4")[...] = volume
    out = tmp_path / "out.zarr"
    job = ssi_dask.Job(
        input=source,
        output=out,
        psf=ssi_dask.PSFSettings(files=(str(psf3d_file),)),
        lr=ssi_dask.LRSettings(num_iter=3),
        layout=ssi_dask.LayoutSettings(chunks=(16, 20, 20)),
        progress=False,
    )
    ssi_dask.run(job, client=local_client, echo=None)
    first = zarr.open_array(str(out), mode="r")[...]
    records = sorted(p for p in progress_folder(out).iterdir() if not p.name.startswith("."))
    assert len(records) == 6
    records[0].unlink()  # an interrupted run: one record and one chunk's files gone
    shutil.rmtree(out / "c" / "0" / "1")
    kept = records[1:3]  # 0.0.1 and 0.0.2: intact, so not rewritten
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert not ssi_dask.verify_output(out).ok
    count = _counting(local_client)
    ssi_dask.run(dataclasses.replace(job, resume=True), client=local_client, echo=None)
    # chunk (0,0,0) lost its record, (0,1,*) their files: 1 + 3 chunks, plus the shared task
    assert count() == 5
    assert np.array_equal(zarr.open_array(str(out), mode="r")[...], first)
    assert ssi_dask.verify_output(out, check_data=True).ok
    assert [p.stat().st_mtime_ns for p in kept] == stamps


@pytest.mark.parametrize("dtype", ["uint16", "float16", "same"])
def test_output_dtype_rounds_clips_counts_and_records(tmp_path, local_client, psf3d_file, dtype):
    shape = (16, 40, 40)
    volume = (smooth_volume(shape, seed=4) * 60000).astype(np.uint16)  # LR overshoots 65535
    source = tmp_path / "input.zarr"
    zarr.create_array(store=str(source), shape=shape, chunks=(16, 20, 20), dtype="u2")[...] = volume
    job = ssi_dask.Job(
        input=source,
        output=tmp_path / "f32.zarr",
        psf=ssi_dask.PSFSettings(files=(str(psf3d_file),)),
        lr=ssi_dask.LRSettings(num_iter=5),
        layout=ssi_dask.LayoutSettings(chunks=(16, 20, 20)),
        progress=False,
    )
    ssi_dask.run(job, client=local_client, echo=None)
    full = zarr.open_array(str(tmp_path / "f32.zarr"), mode="r")[...]
    layout = dataclasses.replace(job.layout, output_dtype=dtype)
    report = ssi_dask.run(
        dataclasses.replace(job, output=tmp_path / "out.zarr", layout=layout),
        client=local_client,
        echo=None,
    )
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    stored = "uint16" if dtype == "same" else dtype
    assert out.dtype == np.dtype(stored)
    if stored == "uint16":
        expected = np.clip(np.rint(full.astype(np.float64)), 0, 65535)
        assert out.attrs["scale_factor"] == 1.0 and out.attrs["add_offset"] == 0.0
    else:
        expected = np.clip(full, -65504, 65504)
        assert "scale_factor" not in out.attrs
    if stored == "uint16":
        clipped = int(np.count_nonzero((np.rint(full) > 65535) | (np.rint(full) < 0)))
    else:
        clipped = int(np.count_nonzero(np.abs(full) > 65504))
    np.testing.assert_array_equal(out[...], expected.astype(stored))
    assert clipped > 0  # LR overshoots the input's range: the test would miss clipping otherwise
    assert report.clipped == clipped == out.attrs["ssi_dask"]["clipped_values"]
    assert out.attrs["ssi_dask"]["output_dtype"] == stored
    assert out.attrs["ssi_dask"]["layout"]["dtype"] == stored
    assert f"stored as   {stored}, {clipped} values clipped" in report.summary()
    assert ssi_dask.verify_output(tmp_path / "out.zarr", check_data=True).ok
    # the dtype is part of the fingerprint: resuming the float32 output as uint16 is refused
    with pytest.raises(ssi_dask.errors.OutputError, match="layout.dtype"):
        ssi_dask.run(
            dataclasses.replace(job, layout=layout, resume=True), client=local_client, echo=None
        )


def _background_case(tmp_path, psf3d_file, volume):
    source = tmp_path / "bg.zarr"
    zarr.create_array(store=str(source), shape=volume.shape, chunks=(16, 20, 20), dtype="f4")[
        ...
    ] = volume
    return ssi_dask.Job(
        input=source,
        output=tmp_path / "all.zarr",
        psf=ssi_dask.PSFSettings(files=(str(psf3d_file),)),
        lr=ssi_dask.LRSettings(num_iter=3),
        layout=ssi_dask.LayoutSettings(chunks=(16, 20, 20)),
        progress=False,
    )


def _background_chunks(volume, depth, threshold):
    """Chunks (16, 20, 20) whose input with halo is <= threshold, counted independently."""
    count = 0
    for y in range(0, volume.shape[1], 20):
        for x in range(0, volume.shape[2], 20):
            grown = volume[
                :,
                max(0, y - depth[1]) : y + 20 + depth[1],
                max(0, x - depth[2]) : x + 20 + depth[2],
            ]
            count += int(grown.max() <= threshold)
    return count


def test_skip_background_zero_threshold_is_identical_to_computing(
    tmp_path, local_client, psf3d_file
):
    volume = smooth_volume((16, 60, 120), seed=6)
    volume[:, :, :60] = 0  # an empty region: the chunks that read only zeros are skipped
    job = _background_case(tmp_path, psf3d_file, volume)
    full = ssi_dask.run(job, client=local_client, echo=None)
    lines: list[str] = []
    layout = dataclasses.replace(job.layout, skip_background=0.0)
    skipping = dataclasses.replace(job, output=tmp_path / "skip.zarr", layout=layout)
    report = ssi_dask.run(skipping, client=local_client, echo=lines.append)
    expected = _background_chunks(volume, full.plan.depth, 0.0)
    assert expected >= 3
    assert report.skipped == expected
    assert f"skipped {expected} background chunks (input <= 0)" in lines
    assert f"background  {expected} of 18 chunks written without computing" in report.summary()
    out = zarr.open_array(str(tmp_path / "skip.zarr"), mode="r")
    assert out.attrs["ssi_dask"]["skip_background"] == 0.0
    assert out.attrs["ssi_dask"]["skipped_chunks"] == expected
    np.testing.assert_array_equal(out[...], zarr.open_array(str(tmp_path / "all.zarr"))[...])
    assert ssi_dask.verify_output(tmp_path / "skip.zarr", check_data=True).ok


def test_skip_background_above_zero_writes_the_mean_and_never_skips_signal(
    tmp_path, local_client, psf3d_file
):
    rng = np.random.default_rng(0)
    volume = (100 + rng.random((16, 60, 120)) * 5).astype(np.float32)  # background 100-105
    volume[:, 20:40, 80:100] += 2000 * smooth_volume((16, 20, 20), seed=1)  # one bright patch
    job = _background_case(tmp_path, psf3d_file, volume)
    full = ssi_dask.run(job, client=local_client, echo=None)
    layout = dataclasses.replace(job.layout, skip_background=106.0)
    skipping = dataclasses.replace(job, output=tmp_path / "skip.zarr", layout=layout)
    report = ssi_dask.run(skipping, client=local_client, echo=None)
    expected = _background_chunks(volume, full.plan.depth, 106.0)
    assert report.skipped == expected and 0 < expected < 18
    computed = zarr.open_array(str(tmp_path / "all.zarr"))[...]
    skipped = zarr.open_array(str(tmp_path / "skip.zarr"))[...]
    # the patch and every chunk whose halo reaches it are computed exactly as without skipping
    near = (slice(None), slice(0, 60), slice(60, 120))
    np.testing.assert_array_equal(skipped[near], computed[near])
    # a skipped chunk holds one value, the background, close to what LR computes there
    corner = skipped[:, :20, :20]
    assert np.unique(corner).size == 1
    assert abs(float(corner[0, 0, 0]) - float(computed[:, :20, :20].mean())) < 2.0


def test_skip_background_is_refused_for_ssi(tmp_path, psf3d_file):
    with pytest.raises(ssi_dask.errors.ParameterError, match="skip_background must be a finite"):
        ssi_dask.LayoutSettings(skip_background=float("nan"))
    volume = smooth_volume((16, 40, 40), seed=6)
    job = _background_case(tmp_path, psf3d_file, volume)
    layout = dataclasses.replace(job.layout, skip_background=1.0)
    with pytest.raises(ssi_dask.errors.ParameterError, match="applies to method 'lr'"):
        ssi_dask.run(
            dataclasses.replace(job, method="ssi", lr=ssi_dask.LRSettings(), layout=layout),
            echo=None,
        )


def test_cli_output_dtype_and_skip_background(tmp_path, psf3d_file):
    from conftest import run_cli

    volume = (smooth_volume((16, 40, 60), seed=8) * 60000).astype(np.uint16)
    volume[:, :, :40] = 0
    source = tmp_path / "in.zarr"
    zarr.create_array(store=str(source), shape=volume.shape, chunks=(16, 20, 20), dtype="u2")[
        ...
    ] = volume
    out = tmp_path / "out.zarr"
    result = run_cli(
        "run", source, out, "--psf", psf3d_file, "--iterations", "3", "--chunks", "16,20,20",
        "--output-dtype", "same", "--skip-background", "0", "--workers", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stored = zarr.open_array(str(out), mode="r")
    attrs = stored.attrs["ssi_dask"]
    assert stored.dtype == np.uint16 and attrs["output_dtype"] == "uint16"
    assert f"stored as   uint16, {attrs['clipped_values']} values clipped" in result.stdout
    assert attrs["skip_background"] == 0.0 and attrs["skipped_chunks"] >= 1
    assert f"skipped {attrs['skipped_chunks']} background chunks (input <= 0)" in result.stdout
    assert "  output          (16, 40, 60) uint16, Zarr v3" in result.stdout
    refused = run_cli("run", source, tmp_path / "x.zarr", "--psf", psf3d_file,
                      "--output-dtype", "int8")  # fmt: skip
    assert refused.returncode == 2 and "--output-dtype: invalid choice: 'int8'" in refused.stderr


class LiveChunkTasks(SchedulerPlugin):
    """The most chunk tasks the scheduler held at once, and how many it ran."""

    name = "ssi-dask-live-chunks"

    def __init__(self) -> None:
        self.held: set = set()  # known to the scheduler (results not yet released included)
        self.running: set = set()  # waiting or processing
        self.ran: set = set()
        self.most_held = self.most_running = 0

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if not str(key).startswith("ssi-dask-chunk-"):
            return
        if finish in ("forgotten", "released"):
            self.held.discard(key)
        else:
            self.held.add(key)
        if finish in ("waiting", "processing", "no-worker", "queued"):
            self.running.add(key)
        else:
            self.running.discard(key)
        if finish == "processing":
            self.ran.add(key)
        self.most_held = max(self.most_held, len(self.held))
        self.most_running = max(self.most_running, len(self.running))


def test_chunk_tasks_are_submitted_in_bounded_waves(tmp_path, local_client, psf2d):
    import tifffile

    volume = smooth_volume((96, 400), seed=9)
    source = tmp_path / "in.zarr"
    zarr.create_array(store=str(source), shape=volume.shape, chunks=(16, 16), dtype="f4")[...] = (
        volume
    )
    tifffile.imwrite(tmp_path / "psf.tif", psf2d)
    job = ssi_dask.Job(
        input=source,
        output=tmp_path / "out.zarr",
        psf=ssi_dask.PSFSettings(files=(str(tmp_path / "psf.tif"),)),
        lr=ssi_dask.LRSettings(num_iter=0),
        layout=ssi_dask.LayoutSettings(chunks=(16, 16)),
        progress=False,
    )
    local_client.register_plugin(LiveChunkTasks())
    report = ssi_dask.run(job, client=local_client, echo=None)
    running, held, ran = local_client.run_on_scheduler(
        lambda dask_scheduler: (
            dask_scheduler.plugins[LiveChunkTasks.name].most_running,
            dask_scheduler.plugins[LiveChunkTasks.name].most_held,
            len(dask_scheduler.plugins[LiveChunkTasks.name].ran),
        )
    )
    local_client.unregister_scheduler_plugin(LiveChunkTasks.name)
    assert report.chunks == 6 * 25 == ran  # every chunk once
    assert running <= 16  # max(16, 4 x 2 worker threads) in flight, never the whole volume
    # finished tasks wait for the client's (batched) release: at most about one more wave
    assert held <= 3 * 16 < report.chunks
    expected = deconvolve(str(source), psf2d, num_iter=0, chunks=(16, 16)).compute()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], expected)


def test_plane_chunked_input_is_cut_and_matches_a_whole_volume_run(
    tmp_path, local_client, psf3d, psf3d_file, monkeypatch
):
    """An input stored in whole planes (chunks (1, Y, X)) whose planes hold far more than a
    working chunk's target: the run cuts them (each is read by several tasks) and the result
    equals Lucy-Richardson on the whole volume."""
    from ssi_dask.config import DEFAULT_TARGET_VOXELS
    from ssi_dask.lr import richardson_lucy

    shape = (12, 64, 80)
    monkeypatch.setitem(DEFAULT_TARGET_VOXELS, 3, 12 * 16 * 16)  # planes: 27x the target
    # the default target, not one sized from the test cluster's (large) worker memory
    monkeypatch.setattr(
        "ssi_dask.sizing.client_target_voxels", lambda *args, **kwargs: (None, "default", None)
    )
    volume = (smooth_volume(shape, seed=2) * 3000).astype(np.uint16)
    source = tmp_path / "planes.zarr"
    zarr.create_array(store=str(source), shape=shape, chunks=(1, 64, 80), dtype="uint16")[...] = (
        volume
    )
    before = tree_digest(source)
    job = ssi_dask.Job(
        input=source,
        output=tmp_path / "out.zarr",
        psf=ssi_dask.PSFSettings(files=(str(psf3d_file),)),
        lr=ssi_dask.LRSettings(num_iter=4),
        progress=False,
    )
    report = ssi_dask.run(job, client=local_client, echo=None)
    assert report.plan.working_chunks[0] == 12 and report.plan.input_reads > 1
    assert report.chunks > 1
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.chunks == report.plan.working_chunks
    assert out.attrs["ssi_dask"]["complete"] is True
    expected = richardson_lucy(volume.astype(np.float32), psf3d, num_iter=4)
    np.testing.assert_allclose(out[...], expected, rtol=1e-3, atol=1e-3 * expected.max())
    assert tree_digest(source) == before
