"""OME-Zarr in and out: NGFF 0.4 and 0.5 inputs written by ome-zarr-py, outputs validated by
ngff-zarr and opened with napari's OME-Zarr reader, against whole-volume LR references."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import smooth_volume, tree_digest

from ssi_dask.cli import main
from ssi_dask.lr import richardson_lucy
from ssi_dask.psf import crop_psf, normalize_psf, save_psf, widefield_psf

ngff_zarr = pytest.importorskip("ngff_zarr")
pytest.importorskip("ome_zarr")

AXES = [
    {"name": "t", "type": "time", "unit": "second"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
VOXEL = (0.3, 0.15, 0.15)
TRANSLATION = [0.0, 0.0, 1.5, 3.0, -0.6]
SHAPE = (2, 2, 12, 48, 48)


def write_ome_input(path: Path, version: str, *, sharded: bool = False) -> np.ndarray:
    """A t=2, c=2 OME-Zarr image with two levels (y, x halved), written with ome-zarr-py."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscale

    data = np.stack(
        [np.stack([smooth_volume(SHAPE[2:], seed=2 * t + c) for c in range(2)]) for t in range(2)]
    )
    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    transforms = [
        [
            {"type": "scale", "scale": [1.0, 1.0, VOXEL[0], VOXEL[1] * f, VOXEL[2] * f]},
            {"type": "translation", "translation": TRANSLATION},
        ]
        for f in (1, 2)
    ]
    options = {"chunks": (1, 1, 12, 24, 24)}
    if sharded:
        options["shards"] = (1, 1, 12, 48, 48)
    write_multiscale(
        [data, data[..., ::2, ::2]],
        group,
        fmt=fmt,
        axes=AXES,
        coordinate_transformations=transforms,
        storage_options=options,
    )
    omero = {
        "channels": [
            {
                "label": "GFP",
                "color": "00FF00",
                "window": {"min": 0, "max": 2, "start": 0, "end": 1},
            },
            {
                "label": "RFP",
                "color": "FF0000",
                "window": {"min": 0, "max": 2, "start": 0, "end": 1},
            },
        ]
    }
    if version == "0.4":
        group.attrs["omero"] = omero
    else:
        group.attrs["ome"] = {**dict(group.attrs["ome"]), "omero": omero}
    return data


def psf_file(tmp_path: Path, voxel, *, wavelength=0.52, name="psf.tif") -> tuple[Path, np.ndarray]:
    psf = widefield_psf((7, 9, 9), voxel, na=1.0, wavelength=wavelength)
    path = tmp_path / name
    save_psf(path, psf, voxel)
    return path, normalize_psf(crop_psf(psf))


def run(*args) -> int:
    return main([str(a) for a in args])


def ome_block(attrs: dict) -> dict:
    return attrs["ome"] if "ome" in attrs else attrs


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_in_and_out(tmp_path, version, local_client, capsys):
    source = tmp_path / "image.ome.zarr"
    data = write_ome_input(source, version)
    before = tree_digest(source)
    psf_path, psf = psf_file(tmp_path, VOXEL)
    out = tmp_path / "deconvolved.ome.zarr"
    status = run(
        "run", source, out, "--psf", psf_path, "--iterations", 3,
        "--scheduler", local_client.scheduler.address,
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert tree_digest(source) == before

    # full resolution: every (t, c) volume equals a whole-volume LR of that volume
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == (2 if version == "0.4" else 3)
    full = group["0"][...]
    assert full.shape == SHAPE and full.dtype == np.float32
    for t in range(2):
        for c in range(2):
            expected = richardson_lucy(data[t, c], psf, num_iter=3)
            np.testing.assert_allclose(full[t, c], expected, rtol=1e-4, atol=1e-5)

    # metadata: validated by ngff-zarr, same axes, scale and translation as the input
    attrs = dict(group.attrs)
    ngff_zarr.validate(attrs, version=version)
    multiscales = ngff_zarr.from_ngff_zarr(str(out), validate=True, version=version)
    axes = [{"name": a.name, "type": a.type, "unit": a.unit} for a in multiscales.metadata.axes]
    assert axes == [{**a, "unit": a.get("unit")} for a in AXES]
    level0, level1 = multiscales.images
    assert level0.scale == {"t": 1.0, "c": 1.0, "z": 0.3, "y": 0.15, "x": 0.15}
    assert level0.translation == dict(zip("tczyx", TRANSLATION))
    # the pyramid mirrors the input's (y, x halved): a block mean, half a fine voxel shifted
    assert level1.scale == {"t": 1.0, "c": 1.0, "z": 0.3, "y": 0.3, "x": 0.3}
    assert level1.translation["y"] == pytest.approx(3.0 + 0.075)
    mean = full.reshape(2, 2, 12, 24, 2, 24, 2).mean(axis=(4, 6))
    np.testing.assert_allclose(np.asarray(level1.data), mean, rtol=1e-6, atol=1e-6)
    if version == "0.5":
        assert tuple(group["0"].metadata.dimension_names) == tuple("tczyx")

    # provenance and channel display metadata
    provenance = attrs["ssi_dask"]
    assert provenance["method"] == "lr" and provenance["iterations"] == 3
    assert provenance["complete"] is True and provenance["version"]
    assert provenance["psf"]["shape"] == list(psf.shape)
    assert provenance["psf"]["voxel_size_um"] == list(VOXEL)
    assert provenance["input"] == str(source.resolve())
    assert group["0"].attrs["ssi_dask"]["complete"] is True
    channels = ome_block(attrs)["omero"]["channels"]
    assert [c["label"] for c in channels] == ["GFP", "RFP"]
    assert channels[1]["window"]["max"] == pytest.approx(float(mean[:, 1].max()), rel=1e-5)

    # the progress bar (chunks done / total, throughput) and the end-of-run summary
    assert re.search(r"deconvolving: 100%.* 4/4 .*voxel/s", printed.err)
    assert "done in" in printed.out and "voxel/s" in printed.out
    assert f"napari --plugin napari-ome-zarr {out.resolve()}" in printed.out


def test_output_opens_with_napari_ome_zarr_reader(tmp_path, local_client, capsys):
    reader = pytest.importorskip(
        "napari_ome_zarr._reader", reason="napari-ome-zarr (test extra, Python >= 3.11)"
    )
    source = tmp_path / "image.ome.zarr"
    write_ome_input(source, "0.5")
    psf_path, _ = psf_file(tmp_path, VOXEL)
    out = tmp_path / "deconvolved.ome.zarr"
    assert run(
        "run", source, out, "--psf", psf_path, "--iterations", 2, "--no-progress",
        "--scheduler", local_client.scheduler.address,
    ) == 0, capsys.readouterr().err  # fmt: skip
    read = reader.napari_get_reader(str(out))
    assert read is not None
    (data, meta, kind), *_ = read(str(out))
    assert kind == "image"
    assert [level.shape for level in data] == [SHAPE, (*SHAPE[:3], 24, 24)]
    assert meta["channel_axis"] == 1
    assert list(meta["scale"]) == pytest.approx([1.0, 0.3, 0.15, 0.15])
    assert list(meta["name"]) == ["image deconvolved (lr): GFP", "image deconvolved (lr): RFP"]
    stored = zarr.open_array(str(out / "0"), mode="r")[...]
    np.testing.assert_array_equal(np.asarray(data[0]), stored)


def test_channels_with_their_own_psfs_sharded_output(tmp_path, local_client, capsys):
    source = tmp_path / "image.ome.zarr"
    data = write_ome_input(source, "0.5", sharded=True)
    green, psf_green = psf_file(tmp_path, VOXEL, wavelength=0.52, name="green.tif")
    red, psf_red = psf_file(tmp_path, VOXEL, wavelength=0.61, name="red.tif")
    out = tmp_path / "out.ome.zarr"
    status = run(
        "run", source, out, "--psf", f"{red},{green}", "--channel", "RFP,0",
        "--iterations", 3, "--chunks", "12,48,48", "--output-chunks", "12,24,24", "--shards",
        "--no-progress", "--scheduler", local_client.scheduler.address,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    full = zarr.open_array(str(out / "0"), mode="r")
    assert full.shards == (1, 1, 12, 48, 48) and full.chunks == (1, 1, 12, 24, 24)
    assert full.shape == SHAPE
    for t in range(2):
        np.testing.assert_allclose(
            full[t, 0], richardson_lucy(data[t, 1], psf_red, num_iter=3), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            full[t, 1], richardson_lucy(data[t, 0], psf_green, num_iter=3), rtol=1e-4, atol=1e-5
        )
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    ngff_zarr.validate(attrs, version="0.5")
    assert [c["label"] for c in attrs["ome"]["omero"]["channels"]] == ["RFP", "GFP"]
    assert attrs["ssi_dask"]["channels"] == [1, 0]
    assert [p["sha256"] for p in attrs["ssi_dask"]["psf"]] != [None, None]
    assert zarr.open_array(str(out / "1"), mode="r").shards is not None


def test_level_and_psf_computed_from_the_metadata(tmp_path, local_client, capsys):
    source = tmp_path / "image.ome.zarr"
    data = write_ome_input(source, "0.4")
    out = tmp_path / "out.ome.zarr"
    status = run(
        "run", source, out, "--level", 1, "--channel", 0, "--na", 1.0, "--wavelength", 0.52,
        "--iterations", 2, "--no-progress", "--scheduler", local_client.scheduler.address,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    group = zarr.open_group(str(out), mode="r")
    provenance = group.attrs["ssi_dask"]
    level1_voxel = [VOXEL[0], 2 * VOXEL[1], 2 * VOXEL[2]]
    assert provenance["psf"]["voxel_size_um"] == level1_voxel
    assert provenance["input_level"] == 1
    # the PSF is the widefield model sampled at the level's voxel size
    from ssi_dask.ome import default_psf_shape

    shape = default_psf_shape(level1_voxel, 1.0, 0.52)
    shape = (min(shape[0], 11), *shape[1:])  # no larger than the 12-plane image, odd
    psf = normalize_psf(crop_psf(widefield_psf(shape, level1_voxel, na=1.0, wavelength=0.52)))
    assert provenance["psf"]["shape"] == list(psf.shape)
    expected = richardson_lucy(data[0, 0, :, ::2, ::2], psf, num_iter=2)
    np.testing.assert_allclose(group["0"][0, 0], expected, rtol=1e-4, atol=1e-5)
    scale = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, 1.0, *level1_voxel]
    assert group["0"].shape == (2, 1, 12, 24, 24)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--psf", "{bad}"],
            "was sampled at voxel size (0.3, 0.2, 0.2) um but the image has (0.3, 0.15, 0.15) um; "
            "regenerate it (ssi-dask psf --voxel-size 0.3,0.15,0.15)",
        ),
        (
            ["--psf", "{good}", "--level", "2"],
            "--level 2 does not exist in '{source}'; it has levels 0 to 1 (0 is full resolution)",
        ),
        (
            ["--psf", "{good}", "--channel", "DAPI"],
            "channel 'DAPI' does not exist; the image has channels 0 to 1 (GFP, RFP)",
        ),
        (
            ["--psf", "{good},{good},{good}"],
            "--psf names 3 files for 2 channels; give one PSF for all channels or one per channel",
        ),
        (
            ["--na", "1.0"],
            "give --psf FILE, or --na and --wavelength to compute a widefield PSF",
        ),
        (
            ["--psf", "{good}", "--shards"],
            "--shards needs --zarr-format 3",
        ),
    ],
)
def test_bad_ome_runs_fail_with_one_line(tmp_path, capsys, extra, message):
    source = tmp_path / "image.ome.zarr"
    write_ome_input(source, "0.4")
    before = tree_digest(source)
    good, _ = psf_file(tmp_path, VOXEL)
    bad, _ = psf_file(tmp_path, (0.3, 0.2, 0.2), name="bad.tif")
    names = {"good": good, "bad": bad, "source": source}
    args = [part.format(**names) for part in extra]
    status = run("run", source, tmp_path / "out.zarr", *args)
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("ssi-dask: error: ") and err.count("\n") == 1
    assert message.format(**names) in err
    assert not (tmp_path / "out.zarr").exists()
    assert tree_digest(source) == before


def test_plain_input_refuses_ome_options(tmp_path, zarr3d, psf3d_file, capsys):
    status = run("run", zarr3d, tmp_path / "o.zarr", "--psf", psf3d_file, "--level", 1)
    assert status == 2
    err = capsys.readouterr().err
    assert "--level applies to OME-Zarr image groups" in err


def test_pyramid_factors_default_and_mirrored():
    from ssi_dask.ome import level_transforms, pyramid_factors

    assert pyramid_factors((10, 300, 260), [0, 1, 2], min_size=64) == [(1, 2, 2), (1, 2, 2)]
    mirrored = pyramid_factors(
        (1, 16, 64, 64), [1, 2, 3], input_shapes=[(1, 16, 64, 64), (1, 8, 32, 32), (1, 8, 8, 8)]
    )
    assert mirrored == [(1, 2, 2, 2), (1, 1, 4, 4)]
    (s0, t0), (s1, t1), _ = level_transforms([1, 0.5, 0.1, 0.1], [0, 0, 0, 0], mirrored)
    assert s1 == [1, 1.0, 0.2, 0.2] and t1 == pytest.approx([0, 0.25, 0.05, 0.05])


def test_psf_voxel_size_is_read_from_tiff_metadata(tmp_path):
    import tifffile

    from ssi_dask.ome import declared_psf_voxel_size

    path, _ = psf_file(tmp_path, (0.25, 0.1, 0.1))
    assert declared_psf_voxel_size(path) == (0.25, 0.1, 0.1)
    imagej = tmp_path / "imagej.tif"
    tifffile.imwrite(
        imagej,
        np.ones((5, 9, 9), np.float32),
        imagej=True,
        resolution=(1 / 0.08, 1 / 0.08),
        metadata={"spacing": 0.2, "unit": "micron", "axes": "ZYX"},
    )
    assert declared_psf_voxel_size(imagej) == pytest.approx((0.2, 0.08, 0.08))
    np.save(tmp_path / "p.npy", np.ones((3, 3), np.float32))
    assert declared_psf_voxel_size(tmp_path / "p.npy") is None
    with open(tmp_path / "p.json", "w") as fh:  # not a PSF format: nothing declared
        json.dump({}, fh)
    assert declared_psf_voxel_size(tmp_path / "p.json") is None


def test_resolve_psfs_one_per_wavelength():
    from ssi_dask.config import PSFSettings
    from ssi_dask.pipeline import resolve_psfs

    settings = PSFSettings(na=1.0, wavelength=(0.5, 0.6), refractive_index=1.33, shape=(7, 9, 9))
    psfs, info = resolve_psfs(settings, 3, VOXEL, n_channels=2)
    for psf, wavelength in zip(psfs, (0.5, 0.6)):
        reference = widefield_psf((7, 9, 9), VOXEL, na=1.0, wavelength=wavelength)
        np.testing.assert_allclose(psf, normalize_psf(crop_psf(reference)), rtol=1e-6)
    assert [i["wavelength_um"] for i in info] == [0.5, 0.6]
    assert not np.allclose(psfs[0].shape, psfs[1].shape) or not np.allclose(psfs[0], psfs[1])


@pytest.mark.slow
def test_ssi_model_on_a_2d_multichannel_ome_zarr(tmp_path, local_client, capsys):
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscale

    from ssi_dask.bench.synthetic import degrade, ground_truth_2d
    from ssi_dask.psf import protocol_psf
    from ssi_dask.ssi import load_checkpoint, model_hash, predict, save_checkpoint, train_ssi

    psf = protocol_psf(2)
    truth = ground_truth_2d("camera", size=96)
    data = np.stack([degrade(truth, psf, seed=s) for s in range(2)]).astype(np.float32)
    source = tmp_path / "cells.ome.zarr"
    group = zarr.open_group(str(source), mode="w", zarr_format=3)
    write_multiscale(
        [data],
        group,
        fmt=FormatV05(),
        axes=[AXES[1], AXES[3], AXES[4]],
        coordinate_transformations=[[{"type": "scale", "scale": [1.0, 0.406, 0.406]}]],
        storage_options={"chunks": (1, 48, 48)},
    )
    psf_path = tmp_path / "psf.tif"
    save_psf(psf_path, psf, (0.406, 0.406))
    model_path = tmp_path / "model.pt"
    small = {"base_channels": 4, "levels": 2, "batch_size": 2, "patch_size": 32}
    model = train_ssi(
        data[0], psf, seed=0, steps=2, restarts=0, device="cpu", validation_patches=2, **small
    )
    save_checkpoint(model, model_path)
    out = tmp_path / "out.ome.zarr"
    status = run(
        "run", source, out, "--psf", psf_path, "--method", "ssi", "--model", model_path,
        "--chunks", "48,48", "--no-progress", "--scheduler", local_client.scheduler.address,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    model = load_checkpoint(model_path)
    full = zarr.open_array(str(out / "0"), mode="r")[...]
    for c in range(2):
        expected = predict(model, data[c], device="cpu")
        np.testing.assert_allclose(full[c], expected, atol=1e-4 * float(np.ptp(expected)))
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    ngff_zarr.validate(attrs, version="0.5")
    provenance = attrs["ssi_dask"]
    assert provenance["method"] == "ssi"
    assert provenance["model"]["sha256"] == model_hash(model)
    assert provenance["psf"]["voxel_size_um"] == [0.406, 0.406]


def test_tiff_to_ome_zarr_with_voxel_size(tmp_path, local_client, capsys):
    import tifffile

    volume = smooth_volume((12, 130, 140), seed=7)
    source = tmp_path / "stack.tif"
    tifffile.imwrite(source, volume, tile=(32, 32))
    psf_path, psf = psf_file(tmp_path, VOXEL)
    out = tmp_path / "stack.ome.zarr"
    status = run(
        "run", source, out, "--psf", psf_path, "--voxel-size", "0.3,0.15,0.15",
        "--output-format", "ome-zarr", "--iterations", 2, "--no-progress",
        "--scheduler", local_client.scheduler.address,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    multiscales = ngff_zarr.from_ngff_zarr(str(out), validate=True, version="0.5")
    assert [a.name for a in multiscales.metadata.axes] == ["z", "y", "x"]
    assert [a.unit for a in multiscales.metadata.axes] == ["micrometer"] * 3
    assert multiscales.images[0].scale == {"z": 0.3, "y": 0.15, "x": 0.15}
    # default pyramid: y, x halved while both stay >= 64 (130 x 140 -> 65 x 70)
    assert [im.data.shape for im in multiscales.images] == [(12, 130, 140), (12, 65, 70)]
    expected = richardson_lucy(volume, psf, num_iter=2)
    full = np.asarray(multiscales.images[0].data)
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-5)
    mean = full[:, :130, :140].reshape(12, 65, 2, 70, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(multiscales.images[1].data), mean, rtol=1e-6, atol=1e-6)


def test_ome_input_to_plain_zarr_array(tmp_path, local_client, capsys):
    source = tmp_path / "image.ome.zarr"
    data = write_ome_input(source, "0.4")
    psf_path, psf = psf_file(tmp_path, VOXEL)
    out = tmp_path / "plain.zarr"
    status = run(
        "run", source, out, "--psf", psf_path, "--channel", "RFP", "--output-format", "zarr",
        "--iterations", 2, "--no-progress", "--scheduler", local_client.scheduler.address,
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    array = zarr.open_array(str(out), mode="r")
    assert array.shape == (2, 1, 12, 48, 48) and array.metadata.zarr_format == 2
    assert "multiscales" not in array.attrs and array.attrs["ssi_dask"]["channels"] == [1]
    expected = richardson_lucy(data[1, 1], psf, num_iter=2)
    np.testing.assert_allclose(array[1, 0], expected, rtol=1e-4, atol=1e-5)
