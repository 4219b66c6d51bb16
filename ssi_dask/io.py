"""Open inputs and create outputs: Zarr arrays (v2/v3), TIFF stacks, in-memory arrays.

Everything here is orchestration-side I/O; kernels never import this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .errors import InputError, OutputError
from .safety import check_output_target

ZARR_METADATA_FILES = (".zarray", ".zgroup", "zarr.json")


@dataclass
class Volume:
    """A lazily opened image: the Dask array plus what is known about it.

    Attributes
    ----------
    data : dask.array.Array
        The image, chunked along the store's chunks (or multiples of them).
    store_chunks : tuple of int or None
        Chunk shape of the on-disk array (None for in-memory inputs).
    path : str or None
        Where the image came from.
    zarr_format : int or None
        2 or 3 for Zarr inputs.
    attrs : dict
        Attributes stored with the input.
    source : array-like or None
        The on-disk array behind ``data`` (Zarr array, TIFF reader), when there is one.
    """

    data: da.Array
    store_chunks: tuple[int, ...] | None = None
    path: str | None = None
    zarr_format: int | None = None
    attrs: dict = field(default_factory=dict)
    source: Any = None

    def chunked(self, chunks: tuple[int, ...]) -> da.Array:
        """The image as a Dask array with ``chunks``, one read task per chunk when on disk.

        Reading each working chunk straight from the store (instead of rechunking a graph of
        store-sized pieces) keeps the graph at one read task per chunk.
        """
        chunks = tuple(int(c) for c in chunks)
        if tuple(c[0] for c in self.data.chunks) == chunks:
            return self.data
        if self.source is not None:
            return da.from_array(self.source, chunks=chunks, asarray=False, lock=False)
        return self.data.rechunk(chunks)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding Zarr v2 or v3 metadata."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in ZARR_METADATA_FILES)


def check_image_array(shape: tuple[int, ...], dtype: Any, *, name: str) -> None:
    """Refuse arrays this tool cannot deconvolve (wrong dimensionality or dtype, empty)."""
    dtype = np.dtype(dtype)
    if len(shape) not in (2, 3):
        raise InputError(
            f"{name} has {len(shape)} dimensions {tuple(shape)}; give a 2D (y, x) or 3D (z, y, x) "
            "image (select one channel/time point first)"
        )
    if 0 in shape:
        raise InputError(f"{name} is empty (shape {tuple(shape)})")
    if dtype.kind not in "uif" or dtype.kind == "c":
        raise InputError(
            f"{name} has dtype {dtype}; convert it to an integer or floating-point image first"
        )


def open_zarr_array(path: str | os.PathLike):
    """Open an on-disk Zarr array read-only, with clear errors for missing or wrong paths."""
    import zarr  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist; check the path")
    if not is_zarr_path(path):
        raise InputError(
            f"input {str(path)!r} is not a Zarr array (no .zarray or zarr.json inside); "
            "give the path of a Zarr array"
        )
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(
            f"input {str(path)!r} could not be opened as Zarr ({type(exc).__name__}: {exc})"
        ) from None
    if not hasattr(node, "shape"):
        members = sorted(name for name, _ in node.arrays())
        hint = f"e.g. {str(path / members[0])!r}" if members else "it holds no arrays"
        raise InputError(
            f"input {str(path)!r} is a Zarr group, not an array; give the path of an array inside "
            f"it ({hint})"
        )
    return node


def open_volume(source: Any, *, chunks: tuple[int, ...] | None = None) -> Volume:
    """Open an image lazily as a :class:`Volume`.

    Parameters
    ----------
    source : str, path-like, numpy.ndarray, dask.array.Array, zarr.Array or Volume
        A path to a Zarr array (v2 or v3) or a TIFF file, or an array; a :class:`Volume`
        (without ``chunks``) is returned as it is, keeping its path.
    chunks : tuple of int, optional
        Chunk shape for the Dask array (defaults to the store's chunks).

    Returns
    -------
    Volume
    """
    if isinstance(source, Volume) and chunks is None:
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
            return _open_tiff(path, chunks)
        array = open_zarr_array(path)
        check_image_array(array.shape, array.dtype, name=f"input {str(path)!r}")
        store_chunks = tuple(int(c) for c in array.chunks)
        data = da.from_array(array, chunks=chunks or store_chunks, asarray=True, lock=False)
        return Volume(
            data=data,
            store_chunks=store_chunks,
            path=str(path.resolve()),
            zarr_format=int(array.metadata.zarr_format),
            attrs=dict(array.attrs),
            source=array,
        )
    if isinstance(source, da.Array):
        check_image_array(source.shape, source.dtype, name="input array")
        data = source if chunks is None else source.rechunk(chunks)
        return Volume(data=data)
    if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
        check_image_array(tuple(source.shape), source.dtype, name="input array")
        store_chunks = getattr(source, "chunks", None)
        if isinstance(store_chunks, tuple) and all(isinstance(c, int) for c in store_chunks):
            store_chunks = tuple(store_chunks)
        else:
            store_chunks = None
        data = da.from_array(source, chunks=chunks or store_chunks or "auto", lock=False)
        return Volume(data=data, store_chunks=store_chunks)
    raise InputError(
        f"cannot use an object of type {type(source).__name__} as an image; give a NumPy, Dask or "
        "Zarr array or a path to a Zarr array"
    )


class TiffArray:
    """A TIFF file as a lazily indexed array that pickles by path (for Dask workers).

    Reads go through tifffile's Zarr interface, one region at a time; the open store is
    cached per process and dropped when the object is pickled.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._array = None
        array = self._open()
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in array.chunks)

    def _open(self):
        if self._array is None:
            import tifffile  # noqa: PLC0415
            import zarr  # noqa: PLC0415

            array = zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
            if not hasattr(array, "shape"):  # multi-resolution TIFF: take level 0
                array = array["0"]
            self._array = array
        return self._array

    def __getitem__(self, region):
        return np.asarray(self._open()[region])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def _open_tiff(path: Path, chunks: tuple[int, ...] | None) -> Volume:
    """Open a TIFF lazily through tifffile's Zarr interface (never loaded whole)."""
    try:
        array = TiffArray(path)
    except Exception as exc:
        raise InputError(f"input {str(path)!r} could not be read as TIFF ({exc})") from None
    check_image_array(array.shape, array.dtype, name=f"input {str(path)!r}")
    data = da.from_array(array, chunks=chunks or array.chunks, lock=False, asarray=False)
    return Volume(data=data, store_chunks=array.chunks, path=str(path.resolve()), source=array)


def check_output_path(
    output: str | os.PathLike,
    *,
    input_path: str | os.PathLike | Sequence[str | os.PathLike | None] | None,
    overwrite: bool,
) -> Path:
    """Refuse an output that would destroy data; return the resolved output path.

    A read-only check (see :mod:`ssi_dask.safety`): nothing is created or deleted here.

    Raises
    ------
    OutputError
        When the output equals, lies inside or contains the input (after resolving symbolic
        links), exists without ``overwrite``, exists and is not a store this tool made (or is a
        symbolic link), or its parent folder is missing or read-only.
    """
    if input_path is None or isinstance(input_path, (str, os.PathLike)):
        inputs = [input_path]
    else:
        inputs = list(input_path)
    return check_output_target(output, inputs=inputs, overwrite=overwrite)


def create_output_array(
    path: str | os.PathLike,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any = np.float32,
    zarr_format: int = 3,
    attrs: dict | None = None,
    shards: tuple[int, ...] | None = None,
    dimension_names: tuple[str, ...] | None = None,
):
    """Create an empty on-disk Zarr array in a folder claimed for it.

    ``path`` is a folder made by :func:`ssi_dask.safety.claim_output` (empty but for this
    tool's marker and lock), or a new path inside such an output (an OME-Zarr level).
    ``shards`` (Zarr v3 only) stores that many chunks per file; ``dimension_names`` (v3)
    names the axes (OME-Zarr 0.5 needs them).
    """
    import zarr  # noqa: PLC0415

    path = Path(path)
    extra: dict[str, Any] = {}
    if shards is not None:
        if zarr_format != 3:
            raise OutputError("sharding needs Zarr format 3; drop shards=True or use zarr_format=3")
        extra["shards"] = tuple(int(s) for s in shards)
    if dimension_names is not None and zarr_format == 3:
        extra["dimension_names"] = list(dimension_names)
    try:
        array = zarr.create_array(
            store=str(path),
            shape=tuple(int(s) for s in shape),
            chunks=tuple(int(c) for c in chunks),
            dtype=np.dtype(dtype),
            zarr_format=zarr_format,
            fill_value=0,
            attributes=attrs or {},
            overwrite=False,
            **extra,
        )
    except OSError as exc:
        raise OutputError(f"cannot create output {str(path)!r}: {exc.strerror or exc}") from None
    return array
