"""Open ssi-dask outputs in napari: layers with their physical scale and provenance.

Pure Zarr and Dask (no Qt): testable headless. An OME-Zarr output becomes one multiscale
image layer (one per channel, ``channel_axis``), scaled by the level-0 ``scale`` transform,
with axis units; a plain Zarr output becomes one layer, scaled by the voxel size the run
recorded when it had one. ``layer.metadata["ssi_dask"]`` holds the provenance the run wrote
(method, parameters, PSF and model hashes, completeness).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

LayerData = tuple[Any, dict, str]


def _open(path: str | os.PathLike) -> Any:
    import zarr  # noqa: PLC0415

    try:
        return zarr.open(str(path), mode="r")
    except Exception:  # noqa: BLE001 - not a Zarr store: not ours
        return None


def _multiscales(attrs: dict) -> list | None:
    if "multiscales" in attrs:
        return attrs["multiscales"]
    ome = attrs.get("ome")
    return ome.get("multiscales") if isinstance(ome, dict) else None


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader hook: a reader for ssi-dask outputs, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not Path(path).exists():
        return None
    node = _open(path)
    if node is None or "ssi_dask" not in dict(node.attrs):
        return None
    return read_output


def read_output(path: str | os.PathLike) -> list[LayerData]:
    """Layer data of an ssi-dask output: ``[(data, kwargs, "image"), ...]``."""
    import dask.array as da  # noqa: PLC0415

    node = _open(path)
    attrs = dict(node.attrs)
    provenance = attrs.get("ssi_dask", {})
    name = Path(str(path).rstrip("/")).name
    metadata = {"ssi_dask": provenance, "source": str(Path(path).resolve())}
    multiscales = _multiscales(attrs)
    if not multiscales:  # a plain Zarr array
        data = da.from_zarr(node)
        kwargs: dict[str, Any] = {"name": name, "metadata": metadata}
        voxel = provenance.get("voxel_size_um")
        if voxel and len(voxel) == data.ndim:
            kwargs["scale"] = [float(v) for v in voxel]
            kwargs["units"] = ["um"] * data.ndim
        return [(data, kwargs, "image")]
    image = multiscales[0]
    axes = image.get("axes", [])
    levels = [da.from_zarr(node[entry["path"]]) for entry in image["datasets"]]
    scale = [1.0] * levels[0].ndim
    translate = [0.0] * levels[0].ndim
    for transform in image["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(v) for v in transform["scale"]]
        elif transform.get("type") == "translation":
            translate = [float(v) for v in transform["translation"]]
    names = [axis.get("name", "") for axis in axes] if axes else []
    units = [axis.get("unit") or "pixel" for axis in axes] if axes else None
    kwargs = {
        "name": name,
        "metadata": metadata,
        "multiscale": len(levels) > 1,
        "scale": scale,
        "translate": translate,
    }
    if units:
        kwargs["units"] = units
    if names:
        kwargs["axis_labels"] = names
    data: Any = levels if len(levels) > 1 else levels[0]
    if "c" in names:
        channel = names.index("c")
        keep = [i for i in range(len(names)) if i != channel]
        kwargs["channel_axis"] = channel
        kwargs["scale"] = [scale[i] for i in keep]
        kwargs["translate"] = [translate[i] for i in keep]
        if units:
            kwargs["units"] = [units[i] for i in keep]
        kwargs["axis_labels"] = [names[i] for i in keep]
    return [(data, kwargs, "image")]
