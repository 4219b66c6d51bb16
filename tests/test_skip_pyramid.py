"""Background chunks decided from a coarse level of the input's OME pyramid (issue 15, item 6):
identical to computing them at threshold 0, their full-resolution input left unread, resume
safe, and pyramids that cannot decide it refused."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import smooth_volume, tree_digest

import ssi_dask
from ssi_dask.progress import progress_folder

pytest.importorskip("ome_zarr")

SHAPE = (16, 60, 120)
CHUNKS = (16, 20, 20)


def block_mean(volume: np.ndarray) -> np.ndarray:
    """The 2x2x2 block mean (an independent pyramid level)."""
    z, y, x = (s // 2 for s in volume.shape)
    return volume[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))


def write_pyramid(
    path: Path, level0: np.ndarray, level1: np.ndarray, kind: str | None = "mean"
) -> Path:
    """A 3D OME-Zarr 0.5 input with two levels (the second halves every axis); ``kind`` is
    the multiscales ``type`` (None: none, as ome-zarr-py writes it)."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    transforms = [[{"type": "scale", "scale": [0.3 * f, 0.1 * f, 0.1 * f]}] for f in (1, 2)]
    write_multiscale(
        [level0, level1],
        group,
        fmt=FormatV05(),
        axes=axes,
        coordinate_transformations=transforms,
        storage_options={"chunks": CHUNKS},
    )
    ome = dict(group.attrs["ome"])
    multiscale = {k: v for k, v in ome["multiscales"][0].items() if k != "type"}
    ome["multiscales"] = [multiscale if kind is None else {**multiscale, "type": kind}]
    group.attrs["ome"] = ome
    return path


def job_for(tmp_path: Path, source: Path, psf3d_file: Path, **layout) -> ssi_dask.Job:
    return ssi_dask.Job(
        input=source,
        output=tmp_path / "out.zarr",
        psf=ssi_dask.PSFSettings(files=(str(psf3d_file),)),
        lr=ssi_dask.LRSettings(num_iter=3),
        layout=ssi_dask.LayoutSettings(chunks=CHUNKS, output_format="zarr", **layout),
        progress=False,
    )


def zero_footprint_chunks(volume: np.ndarray, depth) -> set:
    """(y, x) block indices whose input with halo is all zero, counted independently."""
    found = set()
    for j, y in enumerate(range(0, SHAPE[1], 20)):
        for i, x in enumerate(range(0, SHAPE[2], 20)):
            ys = slice(max(0, y - depth[1]), y + 20 + depth[1])
            grown = volume[:, ys, max(0, x - depth[2]) : x + 20 + depth[2]]
            if not grown.any():
                found.add((0, j, i))
    return found


def skipped_records(output: Path) -> dict:
    import json

    records = [json.loads(p.read_text()) for p in progress_folder(output).iterdir()]
    return {tuple(r["index"]): r.get("skipped") for r in records if r.get("skipped")}


def test_pyramid_decision_at_zero_is_identical_and_leaves_input_unread(
    tmp_path, local_client, psf3d_file
):
    volume = smooth_volume(SHAPE, seed=3).astype(np.float32)
    volume[:, :, :60] = 0  # an empty half: its chunks are background
    # no multiscales type (as ome-zarr-py writes): the sampled level is seen to hold means
    source = write_pyramid(
        tmp_path / "in.ome.zarr", volume, block_mean(volume).astype(np.float32), kind=None
    )
    plain = job_for(tmp_path, source, psf3d_file)
    full = ssi_dask.run(dataclasses.replace(plain, output=tmp_path / "all.zarr"), echo=None,
                        client=local_client)  # fmt: skip
    expected = zero_footprint_chunks(volume, full.plan.depth)
    assert len(expected) >= 3
    lines: list[str] = []
    job = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    report = ssi_dask.run(job, client=local_client, echo=lines.append)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    np.testing.assert_array_equal(out[...], zarr.open_array(str(tmp_path / "all.zarr"))[...])
    decided = skipped_records(tmp_path / "out.zarr")
    # the coarse level (footprint rounded outwards) finds the same empty chunks here
    assert set(decided) == expected and set(decided.values()) == {"pyramid"}
    assert report.skipped == report.skipped_unread == len(expected)
    attrs = out.attrs["ssi_dask"]
    assert attrs["skip_background_level"] == 1 and attrs["skipped_unread"] == len(expected)
    assert (
        f"skipped {len(expected)} background chunks (input <= 0); {len(expected)} decided "
        "from pyramid level 1, their full-resolution input not read"
    ) in lines
    assert f"({len(expected)} of them without reading their input)" in report.summary()
    assert ssi_dask.verify_output(tmp_path / "out.zarr", check_data=True).ok
    # a skipped chunk's record proves nothing about its input: once the input's files under
    # it change (here signal appears where there was none), a resume is refused, never trusted
    zarr.open_array(str(source / "s0"), mode="r+")[:, :20, :20] = 5.0
    with pytest.raises(ssi_dask.errors.OutputError, match="the input changed since"):
        ssi_dask.run(dataclasses.replace(job, resume=True), client=local_client, echo=None)


def test_pyramid_level_decides_even_where_the_full_resolution_differs(
    tmp_path, local_client, psf3d_file
):
    volume = smooth_volume(SHAPE, seed=4)
    volume[:, :, :60] = 0
    coarse = block_mean(volume)
    faint = volume.copy()
    faint[:, :, :60] = 1e-3  # above the threshold at full resolution, not in the level
    source = write_pyramid(
        tmp_path / "in.ome.zarr", faint.astype(np.float32), coarse.astype(np.float32)
    )
    exact = job_for(tmp_path, source, psf3d_file, skip_background=0.0)
    ssi_dask.run(dataclasses.replace(exact, output=tmp_path / "exact.zarr"), echo=None,
                 client=local_client)  # fmt: skip
    assert not skipped_records(tmp_path / "exact.zarr")  # every chunk reads 1e-3 or more
    layout = dataclasses.replace(exact.layout, skip_background_level=1)
    job = dataclasses.replace(exact, layout=layout)
    report = ssi_dask.run(job, client=local_client, echo=None)
    decided = skipped_records(tmp_path / "out.zarr")
    assert report.skipped_unread == len(decided) >= 3
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...]
    for _, j, i in decided:  # written as the level's background, 0, without reading 1e-3
        assert not out[:, 20 * j : 20 * j + 20, 20 * i : 20 * i + 20].any()
    # the other chunks are computed from the full-resolution input, as without the level
    computed = zarr.open_array(str(tmp_path / "exact.zarr"), mode="r")[...]
    np.testing.assert_array_equal(out[:, :, 80:], computed[:, :, 80:])


@pytest.mark.parametrize(
    ("where", "layout", "message"),
    [
        ("plain", {"skip_background": 0.0, "skip_background_level": 1},
         "skip_background_level=1 needs an OME-Zarr input with a pyramid; this input has one "
         "level: drop skip_background_level (each chunk then decides from its input)"),
        ("mean", {"skip_background": 0.0, "skip_background_level": 2},
         "skip_background_level=2 must be a level coarser than the input's (level 0): 1 to 1"),
        ("nearest", {"skip_background": 0.0, "skip_background_level": 1},
         "skip_background_level=1: the input's pyramid was made by 'nearest', which keeps one "
         "voxel of each block and can miss a bright one entirely"),
        (None, {"skip_background": 0.0, "skip_background_level": 1},
         "skip_background_level=1: level 1 holds exact copies of single input voxels (one per "
         "block: a nearest-neighbour or strided pyramid, whatever its metadata says)"),
    ],
)  # fmt: skip
def test_pyramid_levels_that_cannot_decide_are_refused(
    tmp_path, psf3d_file, where, layout, message
):
    volume = smooth_volume(SHAPE, seed=5)
    if where == "plain":
        source = tmp_path / "in.zarr"
        zarr.create_array(store=str(source), shape=SHAPE, chunks=CHUNKS, dtype="f4")[...] = volume
    else:
        source = write_pyramid(tmp_path / "in.ome.zarr", volume, volume[::2, ::2, ::2], kind=where)
    before = tree_digest(source)
    with pytest.raises(ssi_dask.errors.ParameterError, match=re.escape(message)):
        ssi_dask.run(job_for(tmp_path, source, psf3d_file, **layout), echo=None)
    assert not (tmp_path / "out.zarr").exists()
    assert tree_digest(source) == before  # the input is untouched by the refusal


def test_level_needs_a_threshold_and_the_cli_maps_it(tmp_path, psf3d_file):
    from conftest import run_cli

    with pytest.raises(ssi_dask.errors.ParameterError, match="needs skip_background=THRESHOLD"):
        ssi_dask.LayoutSettings(skip_background_level=1)
    with pytest.raises(ssi_dask.errors.ParameterError, match="a pyramid level >= 1, got 0"):
        ssi_dask.LayoutSettings(skip_background=0.0, skip_background_level=0)
    source = tmp_path / "in.zarr"
    zarr.create_array(store=str(source), shape=SHAPE, chunks=CHUNKS, dtype="f4")
    result = run_cli("run", source, tmp_path / "out.zarr", "--psf", psf3d_file,
                     "--skip-background-level", "1")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--skip-background-level needs --skip-background THRESHOLD" in result.stderr


def test_an_unread_record_is_trusted_only_while_its_files_are_unchanged(tmp_path):
    from ssi_dask.chunkfiles import UNREAD, InputReference, changed_input_chunks

    source = tmp_path / "in.zarr"
    array = zarr.create_array(store=str(source), shape=(40,), chunks=(10,), dtype="f4")
    array[...] = np.arange(40, dtype=np.float32)
    reference = InputReference(path=str(source), kind="zarr", shape=(40,), depth=(2,))
    regions = {(0,): (slice(0, 20),), (1,): (slice(20, 40),)}
    records = {}
    for index, region in regions.items():
        content = UNREAD if index == (0,) else reference.content_signature(region)
        quick = reference.quick_signature(reference.grown(region))
        records[index] = {"input": {"quick": quick, "content": content}}
    assert changed_input_chunks(reference, records, regions) == ([], 0, 2)
    for chunk_file in (source / "c").iterdir():  # the same bytes, another modification time
        os.utime(chunk_file, ns=(10**9, 10**9))
    changed, reread, _ = changed_input_chunks(reference, records, regions)
    assert reread == 2 and changed == [(0,)]  # the read chunk proves its input unchanged


def test_an_integer_level_counts_one_unit_higher(tmp_path, local_client, psf3d_file):
    volume = (smooth_volume(SHAPE, seed=6) * 1000).astype(np.uint16)
    volume[:, :, :60] = 0
    volume[::4, ::4, 0:60:4] = 1  # single faint voxels: their 2x2x2 means round to 0 in uint16
    coarse = np.floor(block_mean(volume)).astype(np.uint16)
    assert not coarse[:, :, :30].any()
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, coarse, kind="mean")
    zero = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    report = ssi_dask.run(zero, client=local_client, echo=None)
    assert report.skipped == report.skipped_unread == 0  # 0 + one unit > 0: nothing skipped
    one = dataclasses.replace(
        zero,
        output=tmp_path / "one.zarr",
        layout=dataclasses.replace(zero.layout, skip_background=1.0),
    )
    report = ssi_dask.run(one, client=local_client, echo=None)
    assert report.skipped_unread >= 3


def test_a_level_cut_short_never_decides_the_voxels_it_does_not_cover(
    tmp_path, local_client, psf3d_file
):
    # 59 rows: a level made by trimming to whole blocks (29 rows, as dask's coarsen or
    # block_mean above do) has no coarse voxel over input row 58, where a bright voxel sits
    volume = np.zeros((16, 59, 119), np.float32)
    volume[:, :, 80:] = smooth_volume((16, 59, 39), seed=7)
    volume[8, 58, 10] = 5.0
    coarse = block_mean(volume)
    assert coarse.shape == (8, 29, 59) and not coarse[:, :, :40].any()
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, coarse)
    exact = job_for(tmp_path, source, psf3d_file, skip_background=0.0)
    ssi_dask.run(dataclasses.replace(exact, output=tmp_path / "exact.zarr"), echo=None,
                 client=local_client)  # fmt: skip
    layout = dataclasses.replace(exact.layout, skip_background_level=1)
    job = dataclasses.replace(exact, layout=layout)
    report = ssi_dask.run(job, client=local_client, echo=None)
    decided = skipped_records(tmp_path / "out.zarr")
    assert (0, 2, 0) not in decided  # the chunk holding the bright voxel is computed
    assert report.skipped_unread == sum(v == "pyramid" for v in decided.values()) >= 3
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...],
        zarr.open_array(str(tmp_path / "exact.zarr"), mode="r")[...],
    )


def test_reading_the_coarsest_level_leaves_no_level_to_decide_from(tmp_path, psf3d_file):
    volume = smooth_volume(SHAPE, seed=8)
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, block_mean(volume))
    job = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    message = (
        "skip_background_level=1: the input is read at level 1, the coarsest of its pyramid, "
        "so no coarser level can decide background; drop skip_background_level"
    )
    with pytest.raises(ssi_dask.errors.ParameterError, match=re.escape(message)):
        ssi_dask.run(dataclasses.replace(job, level=1), echo=None)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(("value", "shown"), [("abc", "'abc'"), ("1.5", "'1.5'"), ("0", "0")])
def test_a_bad_level_on_the_command_line_is_one_line_naming_the_flag(tmp_path, value, shown):
    from conftest import run_cli

    result = run_cli("run", tmp_path / "in.zarr", tmp_path / "out.zarr", "--psf", "psf.tif",
                     "--skip-background", "0", "--skip-background-level", value)  # fmt: skip
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip().splitlines() == [
        f"ssi-dask: error: --skip-background-level must be a pyramid level >= 1, got {shown}"
    ]


@pytest.mark.parametrize(("shift", "refused"), [(0.05, False), (0.0, False), (2.0, True)])
def test_a_level_shifted_against_the_input_is_refused(tmp_path, psf3d_file, shift, refused):
    # a block-mean level sits 0 to (factor - 1) / 2 input voxels off (0.05 um = half an input
    # voxel here); one shifted further (a crop, 20 input voxels here) covers other voxels
    volume = smooth_volume(SHAPE, seed=9)
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, block_mean(volume))
    group = zarr.open_group(str(source), mode="r+")
    ome = dict(group.attrs["ome"])
    multiscale = ome["multiscales"][0]
    multiscale["datasets"][1]["coordinateTransformations"].append(
        {"type": "translation", "translation": [0.0, shift, shift]}
    )
    group.attrs["ome"] = ome
    job = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    job = dataclasses.replace(job, dry_run=True)
    if not refused:
        ssi_dask.run(job, echo=None)
        return
    message = (
        "skip_background_level=1: level 1 is shifted by (0.0, 20.0, 20.0) input voxels against "
        "the input (its translation); a level of block means is shifted by 0 to (factor - 1) / "
        "2 = (0.5, 0.5, 0.5): drop skip_background_level"
    )
    with pytest.raises(ssi_dask.errors.ParameterError, match=re.escape(message)):
        ssi_dask.run(job, echo=None)


def test_a_resume_from_a_copied_input_says_why_unread_chunks_are_not_trusted(
    tmp_path, local_client, psf3d_file
):
    import shutil

    volume = np.ones(SHAPE, np.float32)  # background 1 is stored: its chunk files exist
    volume[:, :, 60:] += 100 * smooth_volume((16, 60, 60), seed=10)
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, block_mean(volume))
    job = job_for(tmp_path, source, psf3d_file, skip_background=2.0, skip_background_level=1)
    report = ssi_dask.run(job, client=local_client, echo=None)
    assert report.skipped_unread == 6  # x < 40, 20 voxels from the signal with the halo
    copy = tmp_path / "copy.ome.zarr"  # same bytes, new modification times
    shutil.copytree(source, copy, copy_function=shutil.copy)
    message = (
        f"the input changed since {str(tmp_path / 'out.zarr')!r} was written (the names, sizes "
        "or times of its files): 6 of 18 chunks already written were decided from its pyramid "
        "level without reading it (skip_background_level), so nothing proves that they hold "
        "this input's data (first: [0:16, 0:20, 0:20], [0:16, 0:20, 20:40], [0:16, 20:40, 0:20])"
        "; pass overwrite=True to start again"
    )
    resumed = dataclasses.replace(job, input=copy, resume=True)
    with pytest.raises(ssi_dask.errors.OutputError, match=re.escape(message)):
        ssi_dask.run(resumed, client=local_client, echo=None)


def test_a_resume_with_other_parameters_names_only_parameters(tmp_path, local_client, psf3d_file):
    volume = smooth_volume(SHAPE, seed=11)
    volume[:, :, :60] = 0
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, block_mean(volume))
    job = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    job = dataclasses.replace(job, layout=dataclasses.replace(job.layout, output_dtype="uint16"))
    assert ssi_dask.run(job, client=local_client, echo=None).skipped_unread >= 3
    # the counts the finished run stored (skipped_chunks, skipped_unread, clipped_values) are
    # its results, not parameters: the message names only what differs
    other = dataclasses.replace(job.layout, skip_background_level=None)
    message = (
        f"output {str(tmp_path / 'out.zarr')!r} was made with different parameters "
        '(skip_background_level: 1 there, "<unset>" now); resume with the same parameters'
    )
    with pytest.raises(ssi_dask.errors.OutputError, match=re.escape(message)):
        ssi_dask.run(dataclasses.replace(job, layout=other, resume=True), echo=None)


@pytest.mark.parametrize("kind", ["dask_image_mode", "itkwasm_label_image", "median"])
def test_pyramids_of_block_modes_and_medians_are_refused(tmp_path, psf3d_file, kind):
    # ngff-zarr's label methods keep each block's most frequent value: like nearest-neighbour
    # subsampling, one bright voxel among background never reaches the level
    volume = smooth_volume(SHAPE, seed=12)
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, block_mean(volume), kind=kind)
    job = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    message = f"skip_background_level=1: the input's pyramid was made by {kind!r}, which keeps"
    with pytest.raises(ssi_dask.errors.ParameterError, match=re.escape(message)):
        ssi_dask.run(dataclasses.replace(job, dry_run=True), echo=None)


def test_a_level_whose_scale_is_rounded_still_decides_the_last_chunks(
    tmp_path, local_client, psf3d_file
):
    # scales written with 7 digits: 1.9999999 input voxels per coarse voxel, 30 of them cover
    # the 60 rows to within a millionth of a voxel, so the last row of chunks is decided too
    volume = smooth_volume(SHAPE, seed=13)
    volume[:, :, :60] = 0
    source = write_pyramid(tmp_path / "in.ome.zarr", volume, block_mean(volume))
    group = zarr.open_group(str(source), mode="r+")
    ome = dict(group.attrs["ome"])
    ome["multiscales"][0]["datasets"][1]["coordinateTransformations"] = [
        {"type": "scale", "scale": [0.3 * 1.9999999, 0.1 * 1.9999999, 0.1 * 1.9999999]}
    ]
    group.attrs["ome"] = ome
    job = job_for(tmp_path, source, psf3d_file, skip_background=0.0, skip_background_level=1)
    report = ssi_dask.run(job, client=local_client, echo=None)
    expected = zero_footprint_chunks(volume, report.plan.depth)
    assert {(0, 2, 0), (0, 2, 1)} <= expected
    assert skipped_records(tmp_path / "out.zarr") == dict.fromkeys(expected, "pyramid")
