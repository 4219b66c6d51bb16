"""The napari plugin: manifest, reader of ssi-dask outputs (no Qt needed), the widget's work
in-process and on a scheduler; the Qt widget itself where a Qt binding exists."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tomllib
import zarr

import ssi_dask
from ssi_dask.example import make_example
from ssi_dask.napari_plugin import reader, widget

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "ssi_dask" / "napari_plugin" / "napari.yaml"


def test_manifest_is_valid_and_declared():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands == {
        "ssi-dask.get_reader": "ssi_dask.napari_plugin.reader:get_reader",
        "ssi-dask.deconvolve_widget": "ssi_dask.napari_plugin.widget:deconvolve_widget",
    }
    assert callable(reader.get_reader)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["napari.manifest"]["ssi-dask"] == (
        "ssi_dask.napari_plugin:napari.yaml"
    )
    assert any(r.startswith("napari") for r in project["optional-dependencies"]["napari"])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, local_client):
    """A plain Zarr and an OME-Zarr output of real LR runs on a small generated volume."""
    folder = tmp_path_factory.mktemp("napari")
    paths = make_example(folder / "ex", shape=(20, 48, 48), overwrite=True)
    job = ssi_dask.Job(
        input=str(paths["volume"]),
        output=str(folder / "plain.zarr"),
        psf=ssi_dask.PSFSettings(files=(str(paths["psf"]),)),
        lr=ssi_dask.LRSettings(num_iter=2),
        voxel_size=(0.4, 0.2, 0.2),
        progress=False,
    )
    ssi_dask.run(job, client=local_client, echo=None)
    ome = dataclasses.replace(
        job,
        output=str(folder / "out.ome.zarr"),
        layout=ssi_dask.LayoutSettings(output_format="ome-zarr"),
    )
    ssi_dask.run(ome, client=local_client, echo=None)
    return folder, paths


def test_reader_opens_plain_and_ome_outputs_with_scale_and_provenance(outputs):
    folder, paths = outputs
    assert reader.get_reader(str(paths["volume"])) is None  # not an ssi-dask output
    assert reader.get_reader(str(folder / "nowhere.zarr")) is None
    plain = reader.get_reader(str(folder / "plain.zarr"))
    [(data, kwargs, kind)] = plain(str(folder / "plain.zarr"))
    stored = zarr.open_array(str(folder / "plain.zarr"), mode="r")
    assert kind == "image" and data.shape == stored.shape
    np.testing.assert_array_equal(np.asarray(data), stored[...])
    assert kwargs["scale"] == [0.4, 0.2, 0.2]
    assert kwargs["metadata"]["ssi_dask"]["method"] == "lr"
    assert kwargs["metadata"]["ssi_dask"]["complete"] is True

    [(levels, kwargs, kind)] = reader.get_reader(str(folder / "out.ome.zarr"))(
        str(folder / "out.ome.zarr")
    )
    group = zarr.open_group(str(folder / "out.ome.zarr"), mode="r")
    assert kind == "image"
    full = levels[0] if isinstance(levels, list) else levels
    np.testing.assert_array_equal(np.asarray(full), group["0"][...])
    assert kwargs["scale"] == [0.4, 0.2, 0.2]
    assert kwargs["units"] == ["micrometer"] * 3
    assert kwargs["metadata"]["ssi_dask"] == dict(group.attrs)["ssi_dask"]
    if isinstance(levels, list):
        assert kwargs["multiscale"] and levels[1].shape[-1] < levels[0].shape[-1]


def test_widget_work_in_process_and_on_a_scheduler(tmp_path, local_client):
    rng = np.random.default_rng(0)
    image = rng.poisson(50 * np.ones((40, 48)) + 30 * (rng.random((40, 48)) > 0.97)).astype(
        np.float32
    )
    yy, xx = np.mgrid[-3:4, -3:4]
    psf = np.exp(-(yy**2 + xx**2) / 4.0).astype(np.float32)
    tifffile.imwrite(tmp_path / "psf.tif", psf)
    expected = ssi_dask.richardson_lucy(image, psf / psf.sum(), num_iter=5)
    seen = []
    data, kwargs, kind = widget.deconvolve_layer(
        image, method="lr", psf=tmp_path / "psf.tif", iterations=5, name="cells",
        scale=(0.1, 0.1), progress=lambda d, t: seen.append((d, t)),
    )  # fmt: skip
    assert kind == "image" and kwargs["name"] == "cells (LR 5)" and kwargs["scale"] == (0.1, 0.1)
    np.testing.assert_allclose(data, expected, rtol=1e-4, atol=1e-4)
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] >= 1
    remote, kwargs, _ = widget.deconvolve_layer(
        image, method="lr", psf=tmp_path / "psf.tif", iterations=5,
        scheduler=local_client.scheduler.address,
    )  # fmt: skip
    np.testing.assert_allclose(remote, expected, rtol=1e-4, atol=1e-4)
    assert kwargs["metadata"]["ssi_dask"]["scheduler"] == local_client.scheduler.address


def test_qt_widget_builds_headless():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        import qtpy.QtWidgets  # noqa: F401
    except Exception as exc:  # qtpy raises its own error without a binding
        pytest.skip(f"no Qt binding: {exc}")
    pytest.importorskip("napari")
    factory = widget.deconvolve_widget
    built = factory()
    assert {w.name for w in built} >= {"layer", "method", "psf", "iterations", "model", "scheduler"}


def test_qt_widget_call_runs_in_the_background_and_returns_the_layer(tmp_path):
    """The button's path without a viewer (no OpenGL on a headless machine): the magicgui
    widget called with an Image layer starts the work in the background thread with a napari
    progress bar and returns a Future of the layer data tuple magicgui adds to the viewer."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        import qtpy.QtWidgets  # noqa: F401
    except Exception as exc:
        pytest.skip(f"no Qt binding: {exc}")
    napari = pytest.importorskip("napari")
    from concurrent.futures import Future

    from ssi_dask.lr import richardson_lucy

    paths = make_example(tmp_path / "ex", shape=(20, 32, 32), overwrite=True)
    volume = np.asarray(zarr.open_array(str(paths["volume"]))[...], dtype=np.float32)
    layer = napari.layers.Image(volume, name="raw", scale=(0.4, 0.2, 0.2))
    built = widget.deconvolve_widget()
    future = built(layer=layer, method="lr", psf=Path(paths["psf"]), iterations=3)
    assert isinstance(future, Future)
    data, kwargs, kind = future.result(timeout=300)
    assert kind == "image" and kwargs["name"] == "raw (LR 3)"
    assert tuple(kwargs["scale"]) == pytest.approx((0.4, 0.2, 0.2))
    assert kwargs["metadata"]["ssi_dask"]["method"] == "lr"
    reference = richardson_lucy(volume, ssi_dask.load_psf(paths["psf"], ndim=3), num_iter=3)
    np.testing.assert_allclose(data, reference, rtol=1e-4, atol=1e-4 * reference.max())
