"""OME-Zarr (NGFF 0.4 and 0.5) images: read axes, voxel sizes and resolution levels; write
an OME-Zarr result with its multiscale pyramid and metadata.

Reading goes through ``ngff-zarr`` (which knows both NGFF versions); the multiscales metadata
is written with ``ome-zarr-py``'s writer. Orchestration-side only: kernels never import this.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .errors import InputError, OutputError, ParameterError, PSFError

#: Factor from an NGFF space unit to micrometres (the unit of every voxel size in ssi-dask).
SPACE_UNITS_UM = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}
NGFF_VERSIONS = ("0.4", "0.5")
SPATIAL_ORDER = ("z", "y", "x")


def ome_attributes(attrs: dict) -> tuple[dict | None, str | None]:
    """The OME block of a group's attributes and its NGFF version (0.5 nests it under "ome").

    Never fails on malformed metadata: the version is None when it cannot be found, and
    :func:`check_multiscales` says what is wrong.
    """
    if isinstance(attrs.get("ome"), dict) and "multiscales" in attrs["ome"]:
        return attrs["ome"], str(attrs["ome"].get("version", "0.5"))
    if "multiscales" in attrs:
        multiscales = attrs["multiscales"]
        first = multiscales[0] if isinstance(multiscales, list) and multiscales else None
        version = first.get("version") if isinstance(first, dict) else None
        return attrs, str(version) if version else None
    return None, None


def _is_number_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _check_transformations(transforms: Any, n_axes: int, where: str, bad) -> None:
    """One ``scale`` (first), then at most one ``translation``; one finite value per axis,
    scales above zero (NGFF 0.4/0.5)."""
    if not isinstance(transforms, list) or not transforms:
        raise bad(
            f"{where} has coordinateTransformations {_short(transforms)}, not a non-empty list"
        )
    if not all(isinstance(t, dict) for t in transforms):
        raise bad(f"{where} has coordinateTransformations that are not objects")
    types = [t.get("type") for t in transforms]
    if types not in (["scale"], ["scale", "translation"]):
        raise bad(
            f"{where} has coordinateTransformations of types {types}; NGFF needs a "
            "scale, optionally followed by a translation"
        )
    for transform in transforms:
        kind = transform["type"]
        values = transform.get(kind)
        if not _is_number_list(values, n_axes):
            raise bad(
                f"{where} has a {kind} of {values!r}; NGFF needs {n_axes} numbers, one per axis"
            )
        if not all(math.isfinite(v) for v in values):
            raise bad(f"{where} has a {kind} {values} with NaN or Inf")
        if kind == "scale" and min(values) <= 0:
            raise bad(f"{where} has a scale {values}; every scale (voxel size) must be above 0")


def check_multiscales(block: dict, path: str | os.PathLike) -> None:
    """Check the shape of OME-NGFF ``multiscales`` metadata (0.4/0.5) before it is used.

    Checks what ssi-dask relies on: a non-empty list whose first entry has ``axes`` (a list
    of objects with a name) and ``datasets`` (a list of objects with a ``path`` and valid
    ``coordinateTransformations``: finite values, one per axis, scales above 0).

    Raises
    ------
    InputError
        Naming the first problem found and what to do.
    """

    def bad(problem: str) -> InputError:
        return InputError(
            f"input {str(path)!r} has invalid OME-NGFF metadata: {problem}; fix the "
            "multiscales metadata (see ngff.openmicroscopy.org) or re-export the image"
        )

    multiscales = block.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise bad(
            f"multiscales is {type(multiscales).__name__} {_short(multiscales)}, not a "
            "non-empty list"
        )
    image = multiscales[0]
    if not isinstance(image, dict):
        raise bad(f"multiscales[0] is {type(image).__name__} {_short(image)}, not an object")
    axes = image.get("axes")
    if not isinstance(axes, list) or not axes:
        raise bad(f"axes is {type(axes).__name__} {_short(axes)}, not a list of axis objects")
    for number, axis in enumerate(axes):
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            raise bad(f"axis {number} is {_short(axis)}, not an object with a name")
        for key in ("type", "unit"):
            if key in axis and not isinstance(axis[key], str):
                raise bad(f"axis {axis['name']!r} has a {key} of {_short(axis[key])}, not text")
    names = [axis["name"] for axis in axes]
    if len(set(names)) != len(names):
        raise bad(f"axis names {names} repeat")
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise bad(f"datasets is {type(datasets).__name__} {_short(datasets)}, not a non-empty list")
    for number, dataset in enumerate(datasets):
        if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str):
            raise bad(f"dataset {number} is {_short(dataset)}, not an object with a path")
        if not dataset["path"] or dataset["path"].startswith("/") or ".." in dataset["path"]:
            raise bad(
                f"dataset {number} has path {dataset['path']!r}, not a relative path "
                "inside the group"
            )
        _check_transformations(
            dataset.get("coordinateTransformations"), len(names), f"dataset {number}", bad
        )
    if "coordinateTransformations" in image:
        _check_transformations(
            image["coordinateTransformations"], len(names), "the multiscale", bad
        )


def check_omero(block: dict, path: str | os.PathLike) -> None:
    """Check the ``omero`` display metadata ssi-dask reads (channel labels and colours).

    Raises
    ------
    InputError
        When ``omero`` is not an object, its ``channels`` not a list of objects, or a
        channel's label or colour not text.
    """
    if "omero" not in block:
        return
    omero = block["omero"]

    def bad(problem: str) -> InputError:
        return InputError(
            f"input {str(path)!r} has invalid omero metadata: {problem}; fix it or remove the "
            "omero block (display settings only)"
        )

    if not isinstance(omero, dict):
        raise bad(f"omero is {type(omero).__name__} {_short(omero)}, not an object")
    channels = omero.get("channels", [])
    if not isinstance(channels, list):
        raise bad(f"channels is {type(channels).__name__} {_short(channels)}, not a list")
    for number, channel in enumerate(channels):
        if not isinstance(channel, dict):
            raise bad(f"channel {number} is {_short(channel)}, not an object")
        for key in ("label", "color"):
            if key in channel and not isinstance(channel[key], str):
                raise bad(f"channel {number} has a {key} of {_short(channel[key])}, not text")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Zarr group with OME-NGFF multiscales metadata."""
    import zarr  # noqa: PLC0415

    path = Path(path)
    if not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
        return False
    try:
        node = zarr.open(str(path), mode="r")
    except Exception:
        return False
    if hasattr(node, "shape"):
        return False
    return ome_attributes(dict(node.attrs))[0] is not None


@dataclass
class OmeImage:
    """One resolution level of an OME-Zarr image, opened lazily.

    Attributes
    ----------
    path : str
        The image group.
    version : str
        NGFF version, "0.4" or "0.5".
    axes : list of dict
        NGFF axes (``name``, ``type``, optional ``unit``) in array order.
    level : int
        The resolution level opened (0 is full resolution).
    level_path : str
        Path of that level's array inside the group.
    scale, translation : list of float
        The level's coordinate transformations, one value per axis.
    array : zarr.Array
        The level's array, read-only.
    n_levels : int
        Number of resolution levels in the group.
    level_shapes : list of tuple
        Shape of every level (to mirror the pyramid's factors).
    attrs : dict
        The group's attributes (``omero`` channel metadata, name, ...).
    is_ome : bool
        False for a plain Zarr array or TIFF seen as a one-level image (:func:`plain_image`).
    """

    path: str
    version: str
    axes: list[dict]
    level: int
    level_path: str
    scale: list[float]
    translation: list[float]
    array: Any
    n_levels: int
    level_shapes: list[tuple[int, ...]] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    is_ome: bool = True

    @property
    def zarr_format(self) -> int | None:
        """2 or 3 for a Zarr array, None for a TIFF."""
        metadata = getattr(self.array, "metadata", None)
        return int(metadata.zarr_format) if metadata is not None else None

    @property
    def axis_names(self) -> list[str]:
        return [axis["name"] for axis in self.axes]

    @property
    def spatial_axes(self) -> list[int]:
        """Positions of the space axes (the last 2 or 3)."""
        return [i for i, axis in enumerate(self.axes) if axis.get("type") == "space"]

    @property
    def channel_axis(self) -> int | None:
        found = [i for i, axis in enumerate(self.axes) if axis.get("type") == "channel"]
        return found[0] if found else None

    @property
    def voxel_size_um(self) -> tuple[float, ...] | None:
        """Voxel size of the spatial axes in micrometres, or None when a unit is missing."""
        sizes = []
        for i in self.spatial_axes:
            unit = self.axes[i].get("unit")
            if unit not in SPACE_UNITS_UM:
                return None
            sizes.append(float(self.scale[i]) * SPACE_UNITS_UM[unit])
        return tuple(sizes)

    @property
    def channel_names(self) -> list[str] | None:
        channels = (self.attrs.get("omero") or {}).get("channels")
        if not channels:
            return None
        return [str(c.get("label", i)) for i, c in enumerate(channels)]


def open_ome_zarr(path: str | os.PathLike, level: int = 0) -> OmeImage:
    """Open one resolution level of an OME-Zarr image group (NGFF 0.4 or 0.5).

    Parameters
    ----------
    path : str or path-like
        The image group (the folder holding the ``multiscales`` metadata).
    level : int
        Resolution level, 0 for full resolution.

    Returns
    -------
    OmeImage

    Raises
    ------
    InputError
        When the metadata cannot be read or the axes are not ``[t][c][z]yx``.
    ParameterError
        When ``level`` does not exist.
    """
    import ngff_zarr  # noqa: PLC0415
    import zarr  # noqa: PLC0415

    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    block, version = ome_attributes(attrs)
    if block is None:
        raise InputError(f"input {str(path)!r} has no OME-NGFF multiscales metadata")
    check_multiscales(block, path)
    check_omero(block, path)
    if version is None:
        raise InputError(
            f"input {str(path)!r} declares no OME-NGFF version; add it to the metadata "
            f"(ssi-dask reads versions {' and '.join(NGFF_VERSIONS)})"
        )
    if version not in NGFF_VERSIONS:
        raise InputError(
            f"input {str(path)!r} is OME-NGFF {version}; ssi-dask reads versions "
            f"{' and '.join(NGFF_VERSIONS)} (convert it, e.g. with ngff-zarr)"
        )
    raw = block["multiscales"][0]
    _check_level_arrays(
        path, [d["path"] for d in raw["datasets"]], [a["name"] for a in raw["axes"]]
    )
    try:
        multiscales = ngff_zarr.from_ngff_zarr(str(path), version=version)
    except Exception as exc:
        raise InputError(
            f"input {str(path)!r} has unreadable OME-NGFF metadata ({type(exc).__name__}: {exc})"
        ) from None
    datasets = multiscales.metadata.datasets
    if not 0 <= level < len(datasets):
        raise ParameterError(
            f"level={level} does not exist in {str(path)!r}; it has levels 0 to "
            f"{len(datasets) - 1} (0 is full resolution)"
        )
    axes = [
        {k: v for k, v in (("name", a.name), ("type", a.type), ("unit", a.unit)) if v is not None}
        for a in multiscales.metadata.axes
    ]
    _check_axes(axes, path)
    image = multiscales.images[level]
    names = [a["name"] for a in axes]
    level_path = datasets[level].path
    array = zarr.open_array(str(path / level_path), mode="r")
    scale = [float(image.scale.get(n, 1.0)) for n in names]
    translation = [float(image.translation.get(n, 0.0)) for n in names]
    if not all(math.isfinite(v) and v > 0 for v in scale) or not all(
        math.isfinite(v) for v in translation
    ):
        raise InputError(
            f"input {str(path)!r} has level {level} scale {scale} and translation "
            f"{translation}; scales must be finite and above 0, translations finite: fix the "
            "multiscales metadata"
        )
    return OmeImage(
        path=str(path.resolve()),
        version=version,
        axes=axes,
        level=level,
        level_path=level_path,
        scale=scale,
        translation=translation,
        array=array,
        n_levels=len(datasets),
        level_shapes=[tuple(int(s) for s in im.data.shape) for im in multiscales.images],
        attrs={k: v for k, v in block.items() if k not in ("multiscales", "version")},
    )


def _check_level_arrays(path: Path, level_paths: Sequence[str], names: Sequence[str]) -> None:
    """Every level is an array with one dimension per axis (an array that does not match
    its axes would be cut into the wrong volumes and written as invalid OME-Zarr)."""
    import zarr  # noqa: PLC0415

    for level_path in level_paths:
        try:
            node = zarr.open(str(path / level_path), mode="r")
        except Exception:
            node = None
        if node is None or not hasattr(node, "shape"):
            raise InputError(
                f"input {str(path)!r} lists the level {level_path!r}, which is not a Zarr "
                "array in the group; fix the multiscales datasets or restore the level"
            )
        if len(node.shape) != len(names):
            raise InputError(
                f"input {str(path)!r} has axes {list(names)} but its level {level_path!r} has "
                f"{len(node.shape)} dimensions {tuple(node.shape)}; fix the axes in the "
                "multiscales metadata (one per array dimension)"
            )


def _check_axes(axes: list[dict], path: Path) -> None:
    types = [a.get("type") for a in axes]
    names = [a["name"] for a in axes]
    n_space = types.count("space")
    spatial = [a for a, t in zip(names, types) if t == "space"]
    lead = [t for t in types[: len(types) - n_space]]
    ok = (
        n_space in (2, 3)
        and types[len(types) - n_space :] == ["space"] * n_space
        and lead in ([], ["time"], ["channel"], ["time", "channel"])
    )
    if not ok:
        raise InputError(
            f"input {str(path)!r} has axes {names} ({types}); ssi-dask needs [time] [channel] "
            "then 2 or 3 space axes, space last"
        )
    if tuple(spatial) != SPATIAL_ORDER[-n_space:]:
        raise InputError(
            f"input {str(path)!r} has space axes {spatial}; "
            f"expected {list(SPATIAL_ORDER[-n_space:])}"
        )


# --------------------------------------------------------------------------- voxel sizes


def declared_psf_voxel_size(path: str | os.PathLike) -> tuple[float, ...] | None:
    """Voxel size (micrometres, ``z, y, x`` order) a PSF file declares, or None.

    Read from the TIFF metadata written by ``ssi-dask psf`` (``voxel_size_um``), from ImageJ
    metadata (``spacing`` and the resolution tags, unit micron) or from an OME-Zarr PSF group.
    ``.npy`` files declare nothing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile  # noqa: PLC0415

        try:
            with tifffile.TiffFile(path) as tif:
                shaped = tif.shaped_metadata
                if shaped and "voxel_size_um" in shaped[0]:
                    return tuple(float(v) for v in shaped[0]["voxel_size_um"])
                imagej = tif.imagej_metadata
                if imagej and str(imagej.get("unit", "")).lower() in ("micron", "um", "µm"):
                    page = tif.pages.first
                    xres = page.tags.get("XResolution")
                    yres = page.tags.get("YResolution")
                    if xres is None or yres is None:
                        return None
                    dx = xres.value[1] / xres.value[0]
                    dy = yres.value[1] / yres.value[0]
                    if "spacing" in imagej and len(tif.series[0].shape) > 2:
                        return (float(imagej["spacing"]), float(dy), float(dx))
                    return (float(dy), float(dx))
        except Exception:
            return None
        return None
    if is_ome_zarr(path):
        return open_ome_zarr(path).voxel_size_um
    return None


def check_psf_voxel_size(
    psf_path: str | os.PathLike,
    image_voxel_size: Sequence[float] | None,
    *,
    rtol: float = 0.02,
) -> tuple[float, ...] | None:
    """Refuse a PSF file sampled at another voxel size than the image.

    Returns the PSF's declared voxel size (None when it declares none, or the image's is
    unknown: nothing to compare).

    Raises
    ------
    PSFError
        When both are known and differ by more than ``rtol`` on any axis.
    """
    declared = declared_psf_voxel_size(psf_path)
    if declared is None or image_voxel_size is None:
        return declared
    image = tuple(float(v) for v in image_voxel_size)
    if len(declared) != len(image) or not np.allclose(declared, image, rtol=rtol, atol=0):
        wanted = ",".join(f"{v:g}" for v in image)
        raise PSFError(
            f"PSF file {str(psf_path)!r} was sampled at voxel size "
            f"{tuple(round(v, 6) for v in declared)} um but the image has "
            f"{tuple(round(v, 6) for v in image)} um; regenerate it "
            f"(ssi-dask psf --voxel-size {wanted}) or use the image's level= that matches"
        )
    return declared


def default_psf_shape(
    voxel_size: Sequence[float], na: float, wavelength: float, refractive_index: float = 1.33
) -> tuple[int, ...]:
    """A PSF size covering the main lobes: lateral radius 1.5 lambda/NA, axial 3 n lambda/NA^2.

    Lateral sizes are equal and odd (as :func:`ssi_dask.psf.widefield_psf` needs).
    """
    lateral = 2 * int(np.ceil(1.5 * wavelength / na / float(voxel_size[-1]))) + 1
    lateral = max(lateral, 7)
    if len(voxel_size) == 2:
        return (lateral, lateral)
    axial = 2 * int(np.ceil(3.0 * refractive_index * wavelength / na**2 / float(voxel_size[0]))) + 1
    return (max(axial, 3), lateral, lateral)


# --------------------------------------------------------------------------- writing


def pyramid_factors(
    shape: Sequence[int],
    spatial_axes: Sequence[int],
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    min_size: int = 64,
    max_levels: int = 5,
) -> list[tuple[int, ...]]:
    """Per-level downsampling factors (relative to the previous level) for the pyramid.

    Mirrors the input's pyramid (the integer ratios between its consecutive levels) when
    it has one; otherwise halves y and x until the smaller of them would drop below
    ``min_size``.
    """
    factors: list[tuple[int, ...]] = []
    if input_shapes and len(input_shapes) > 1:
        for upper, lower in zip(input_shapes[:-1], input_shapes[1:]):
            step = tuple(max(int(round(u / max(l_, 1))), 1) for u, l_ in zip(upper, lower))
            factors.append(step)
        current = list(shape)
        kept = []
        for step in factors:
            if any(current[a] // step[a] < 1 for a in range(len(current))):
                break
            current = [c // s for c, s in zip(current, step)]
            kept.append(step)
        return kept
    current = list(shape)
    yx = list(spatial_axes)[-2:]
    while len(factors) < max_levels and min(current[a] // 2 for a in yx) >= min_size:
        step = tuple(2 if a in yx else 1 for a in range(len(shape)))
        current = [c // s for c, s in zip(current, step)]
        factors.append(step)
    return factors


def level_transforms(
    scale: Sequence[float], translation: Sequence[float], factors: Sequence[Sequence[int]]
) -> list[tuple[list[float], list[float]]]:
    """Scale and translation of every level: each coarse voxel covers ``factor`` fine ones,
    so its centre moves by ``(factor - 1) / 2`` fine voxels."""
    out = [([float(s) for s in scale], [float(t) for t in translation])]
    for step in factors:
        prev_scale, prev_translation = out[-1]
        out.append(
            (
                [s * f for s, f in zip(prev_scale, step)],
                [t + (f - 1) / 2 * s for t, s, f in zip(prev_translation, prev_scale, step)],
            )
        )
    return out


def _downsample_block_mean(level: da.Array, step: Sequence[int], write_chunks: Sequence[int]):
    """Mean over ``step``-sized blocks, read in chunks that give whole ``write_chunks``."""
    shape = [s // f * f for s, f in zip(level.shape, step)]
    trimmed = level[tuple(slice(0, s) for s in shape)]
    trimmed = trimmed.rechunk(tuple(c * f for c, f in zip(write_chunks, step)))
    return da.coarsen(np.mean, trimmed, dict(enumerate(step)), trim_excess=True).astype(np.float32)


def write_pyramid(
    group_path: str | os.PathLike,
    base: str,
    factors: Sequence[Sequence[int]],
    *,
    chunks: Sequence[int],
    shards: Sequence[int] | None = None,
    zarr_format: int = 3,
    dimension_names: Sequence[str] | None = None,
    client: Any = None,
    replace: bool = False,
) -> list[str]:
    """Write the coarser levels ``1, 2, ...`` of a pyramid below the level at ``base``.

    With ``replace`` (a resumed run) existing coarser levels are replaced: they are derived
    from the level above and always computed again.

    Each level is the block mean of the level above it, read back from disk (the
    deconvolution is not recomputed); every task writes whole chunks (whole shards).

    Returns
    -------
    list of str
        The paths (inside the group) of the levels written.
    """
    import zarr  # noqa: PLC0415

    group_path = Path(group_path)
    paths = []
    source = base
    for number, step in enumerate(factors, start=1):
        upper = da.from_zarr(str(group_path / source))
        shape = tuple(s // f for s, f in zip(upper.shape, step))
        level_chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
        level_shards = None
        if shards is not None:
            level_shards = tuple(
                min(max(sh // c, 1) * c, -(-s // c) * c)
                for sh, c, s in zip(shards, level_chunks, shape)
            )
        write_chunks = level_shards or level_chunks
        lower = _downsample_block_mean(upper, step, write_chunks)
        path = str(number)
        options: dict[str, Any] = {}
        if zarr_format == 3 and dimension_names is not None:
            options["dimension_names"] = list(dimension_names)
        if level_shards is not None:
            options["shards"] = level_shards
        target = zarr.create_array(
            store=str(group_path / path),
            shape=shape,
            chunks=level_chunks,
            dtype=np.float32,
            zarr_format=zarr_format,
            fill_value=0,
            overwrite=replace,
            **options,
        )
        stored = da.store(lower, target, lock=False, compute=False)
        if client is not None:
            client.compute(stored).result()
        else:
            stored.compute()
        paths.append(path)
        source = path
    return paths


def write_ome_metadata(
    group_path: str | os.PathLike,
    *,
    version: str,
    axes: Sequence[dict],
    paths: Sequence[str],
    transforms: Sequence[tuple[Sequence[float], Sequence[float]]],
    name: str,
    provenance: dict,
    omero: dict | None = None,
) -> None:
    """Write the multiscales metadata (ome-zarr-py's writer) and the provenance."""
    import zarr  # noqa: PLC0415
    from ome_zarr.format import FormatV04, FormatV05  # noqa: PLC0415
    from ome_zarr.writer import write_multiscales_metadata  # noqa: PLC0415

    fmt = {"0.4": FormatV04, "0.5": FormatV05}[version]()
    group = zarr.open_group(str(group_path), mode="r+")
    datasets = [
        {
            "path": path,
            "coordinateTransformations": [
                {"type": "scale", "scale": [float(v) for v in scale]},
                {"type": "translation", "translation": [float(v) for v in translation]},
            ],
        }
        for path, (scale, translation) in zip(paths, transforms)
    ]
    extra = {"metadata": {"description": "ssi-dask deconvolution; coarser levels are block means"}}
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=list(axes), name=name, **extra)
    if omero is not None:  # channel names and colours, copied as the input had them
        if version == "0.4":
            group.attrs["omero"] = omero
        else:
            group.attrs["ome"] = {**dict(group.attrs["ome"]), "omero": omero}
    group.attrs["ssi_dask"] = provenance


def create_ome_group(path: str | os.PathLike, *, zarr_format: int) -> None:
    """Create the (empty) output image group."""
    import zarr  # noqa: PLC0415

    path = Path(path)
    if any((path / name).exists() for name in (".zgroup", ".zarray", "zarr.json")):
        raise OutputError(f"cannot create output {str(path)!r}: it already holds a Zarr node")
    try:
        # mode "a": the folder was just claimed for this run (it holds this tool's marker and
        # lock, which mode "w-" would count as existing data)
        zarr.open_group(str(path), mode="a", zarr_format=zarr_format)
    except OSError as exc:
        raise OutputError(f"cannot create output {str(path)!r}: {exc.strerror or exc}") from None


def output_omero(
    group_path: str | os.PathLike,
    smallest: str,
    *,
    channel_axis: int | None,
    input_omero: dict | None,
    channels: Sequence[int] | None,
) -> dict | None:
    """``omero`` display metadata for the output: the input's channel labels and colours,
    with contrast windows from the output's own range (read on its smallest level)."""
    if channel_axis is None:
        return None
    level = da.from_zarr(str(Path(group_path) / smallest))
    other = tuple(a for a in range(level.ndim) if a != channel_axis)
    low, high = da.compute(level.min(axis=other), level.max(axis=other))
    entries = list((input_omero or {}).get("channels") or [])
    chosen = list(channels) if channels is not None else list(range(len(low)))
    result = []
    for position, index in enumerate(chosen):
        source = entries[index] if index < len(entries) else {}
        color = source.get("color")
        result.append(
            {
                "label": str(source.get("label", f"channel {index}")),
                "color": color if isinstance(color, str) and len(color) == 6 else "FFFFFF",
                "active": True,
                "window": {
                    "min": float(low[position]),
                    "max": float(high[position]),
                    "start": float(low[position]),
                    "end": float(high[position]),
                },
            }
        )
    return {"channels": result}


def plain_image(source: str | os.PathLike, voxel_size: Sequence[float] | None = None) -> OmeImage:
    """A plain Zarr array or TIFF seen as a one-level image with axes ``(z)yx``.

    The scale is ``voxel_size`` (micrometres), or 1 without a unit, so that the run can write
    such an input as OME-Zarr too.
    """
    from .io import TiffArray, open_zarr_array  # noqa: PLC0415

    path = Path(source)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        try:
            array = TiffArray(path)
        except Exception as exc:
            raise InputError(f"input {str(path)!r} could not be read as TIFF ({exc})") from None
    else:
        array = open_zarr_array(path)
    if array.ndim not in (2, 3):
        raise InputError(
            f"input {str(path)!r} has {array.ndim} dimensions {tuple(array.shape)}; give a 2D "
            "(y, x) or 3D (z, y, x) image (select one channel/time point first)"
        )
    if voxel_size is not None and len(voxel_size) != array.ndim:
        raise ParameterError(
            f"voxel_size needs {array.ndim} positive values for a {array.ndim}D image, got "
            f"{len(voxel_size)}"
        )
    names = "zyx"[-array.ndim :]
    unit = {"unit": "micrometer"} if voxel_size else {}
    zarr_format = getattr(getattr(array, "metadata", None), "zarr_format", None)
    return OmeImage(
        path=str(path.resolve()),
        version="0.4" if zarr_format == 2 else "0.5",
        axes=[{"name": n, "type": "space", **unit} for n in names],
        level=0,
        level_path="",
        scale=[float(v) for v in (voxel_size or (1.0,) * array.ndim)],
        translation=[0.0] * array.ndim,
        array=array,
        n_levels=1,
        level_shapes=[tuple(int(v) for v in array.shape)],
        attrs=dict(getattr(array, "attrs", None) or {}),
        is_ome=False,
    )


def select_channels(chosen: Sequence[int | str] | None, image: OmeImage) -> list[int] | None:
    """Channel indices chosen by index or omero label; None for all channels."""
    if chosen is None:
        return None
    axis = image.channel_axis
    if axis is None:
        if not image.is_ome:
            raise InputError(
                f"channels= applies to OME-Zarr image groups; {image.path!r} is a plain array"
            )
        raise ParameterError(f"channels= was given but {image.path!r} has no channel axis")
    n = int(image.array.shape[axis])
    names = image.channel_names or []
    result = []
    for part in chosen:
        text = str(part).strip()
        if text.lstrip("-").isdigit() and 0 <= int(text) < n:
            result.append(int(text))
        elif text in names:
            result.append(names.index(text))
        else:
            described = f" ({', '.join(names)})" if names else ""
            raise ParameterError(
                f"channel {text!r} does not exist; the image has channels 0 to {n - 1}{described}"
            )
    return result
