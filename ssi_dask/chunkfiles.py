"""The files behind a Zarr array's chunks, and what a working chunk read from the input.

One directory walk lists a store (:func:`store_listing`); Zarr itself names the file of each
chunk (``encode_chunk_key``: ``0.0`` or ``0/0`` in v2, ``c/0/0`` in v3, one file per shard when
sharded), so every layout is handled the same way. Three checks build on the listing:

* :func:`missing_chunk_files`: output chunks (or shards) that have no file although their
  working chunk is recorded as written (``verify`` and ``--resume``);
* :func:`missing_input_chunks`: input chunks without a file, which Zarr reads as the fill
  value (reported by ``--dry-run`` and the run summary);
* :class:`InputReference` and :func:`changed_input_chunks`: what a working chunk read from
  the input (its region plus halo), recorded with the chunk so that a resume can tell whether
  the input still holds the same data. Like rsync, a cheap signature first (the names, sizes
  and modification times of the input files under the region), and a content checksum (of
  those files' bytes, or of the decoded region for sharded Zarr and TIFF) only where the cheap
  signature differs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Folders inside a store that hold no Zarr chunks (completion records, lock files).
IGNORED_FOLDERS = frozenset({".ssi_dask_progress"})

#: A store listing: key relative to the array's folder (``/`` separated) -> (size, mtime_ns).
Listing = dict[str, tuple[int, int]]


def store_listing(root: str | os.PathLike) -> Listing:
    """Every file under ``root`` as ``{relative key: (size, mtime_ns)}``, in one directory walk.

    A single file (a TIFF) is listed under its own name.
    """
    root = Path(root)
    if root.is_file():
        info = root.stat()
        return {root.name: (int(info.st_size), int(info.st_mtime_ns))}
    listing: Listing = {}
    for key, file in _store_files(root):
        try:
            info = os.stat(file)
        except OSError:  # removed while listing
            continue
        listing[key] = (int(info.st_size), int(info.st_mtime_ns))
    return listing


def _store_files(root: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """``(key relative to root, "/"-separated; file path)`` of every file under ``root``, in one
    directory walk that skips :data:`IGNORED_FOLDERS`."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in IGNORED_FOLDERS]
        relative = os.path.relpath(folder, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        for name in files:
            yield prefix + name, os.path.join(folder, name)


def storage_grid(array: Any) -> tuple[int, ...]:
    """Shape of the pieces a Zarr array stores one file each: its shards, else its chunks."""
    shards = getattr(array, "shards", None)
    return tuple(int(s) for s in (shards or array.chunks))


def keys_for_region(array: Any, region: Sequence[slice]) -> list[str]:
    """Store keys of the files (chunks or shards) that hold any part of ``region``, C order."""
    grid = storage_grid(array)
    ranges = [
        range(int(s.start) // g, -(-int(s.stop) // g)) for s, g in zip(region, grid, strict=True)
    ]
    return [array.metadata.encode_chunk_key(coords) for coords in itertools.product(*ranges)]


def missing_chunk_files(
    array: Any, regions: Iterable[tuple[Any, Sequence[slice]]], listing: Listing
) -> dict[Any, list[str]]:
    """``{index: [missing keys]}`` for each ``(index, region)`` missing any chunk file."""
    missing = {}
    for index, region in regions:
        gone = [key for key in keys_for_region(array, region) if key not in listing]
        if gone:
            missing[index] = gone
    return missing


@dataclass(frozen=True)
class MissingInput:
    """Input chunks that have no file in the store (read as the fill value)."""

    count: int
    total: int
    first: tuple[str, ...]
    fill_value: Any

    def warning(self) -> str:
        """One line for the plan and the run summary (empty when nothing is missing)."""
        if not self.count:
            return ""
        return (
            f"warning: {self.count} of {self.total} input chunks have no file in INPUT and read "
            f"as the fill value {self.fill_value} (first: {', '.join(self.first)}); "
            "expected for a sparse image, otherwise the input is incomplete"
        )


def missing_input_chunks(path: str | None, listing: Listing | None = None) -> MissingInput | None:
    """Count the chunks (or shards) of the Zarr array at ``path`` that have no file.

    Without a ``listing`` the store is walked once and its chunk files counted as they come
    (nothing per file is kept: a store of millions of chunk files costs no memory), then,
    only when some are missing, the first three are found by checking the chunk keys in order.
    Returns None for anything that is not an on-disk Zarr array (a TIFF, an in-memory array).
    """
    array = _open_zarr(path)
    if array is None:
        return None
    grid = storage_grid(array)
    counts = [-(-int(n) // g) for n, g in zip(array.shape, grid)]
    total = math.prod(counts)
    encode = array.metadata.encode_chunk_key

    def present(coords: tuple[int, ...]) -> bool:
        key = encode(coords)
        return key in listing if listing is not None else Path(path, key).is_file()

    if listing is not None:
        grid_blocks = itertools.product(*(range(c) for c in counts))
        found = sum(1 for coords in grid_blocks if present(coords))
    else:
        found = _count_chunk_files(Path(path), encode, counts)
    missing, first = total - found, []
    if missing:
        for coords in itertools.product(*(range(c) for c in counts)):
            if present(coords):
                continue
            region = [
                slice(c * g, min((c + 1) * g, int(n))) for c, g, n in zip(coords, grid, array.shape)
            ]
            first.append("[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]")
            if len(first) == 3:
                break
    fill = array.fill_value
    fill = fill.item() if hasattr(fill, "item") else fill
    return MissingInput(int(missing), int(total), tuple(first), fill)


def _count_chunk_files(root: Path, encode: Any, counts: Sequence[int]) -> int:
    """How many files under ``root`` are chunk (shard) files of a grid of ``counts`` blocks.

    A file counts when the integers in its key, encoded back with the array's chunk key
    encoding, give exactly its key (so metadata and stray files never count), whatever the
    encoding (``c/0/1``, ``0.1``, ``0/1``).
    """
    import re  # noqa: PLC0415

    found = 0
    for key, _ in _store_files(root):
        coords = tuple(int(v) for v in re.findall(r"\d+", key))
        if len(coords) != len(counts) or not all(c < n for c, n in zip(coords, counts)):
            continue
        found += encode(coords) == key
    return found


def _open_zarr(path: str | None) -> Any:
    if path is None or not Path(path).is_dir():
        return None
    import zarr  # noqa: PLC0415

    try:
        return zarr.open_array(str(path), mode="r")
    except Exception:
        return None


@dataclass(frozen=True)
class InputReference:
    """Where the input of a computation lives, to fingerprint what each working chunk read.

    Attributes
    ----------
    path : str
        The on-disk input: a Zarr array's folder or a TIFF file.
    kind : {"zarr", "tiff"}
    shape : tuple of int
    depth : tuple of int
        Halo each working chunk read around its region (clipped at the volume's edges).
    lead : tuple of (tuple of int or None)
        For the leading (time, channel) axes of a multi-volume run: the input index of each
        result index along that axis (channels selected by ``--channel``), or None when they
        are the same. Working chunks hold one index of each leading axis.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    depth: tuple[int, ...]
    lead: tuple[tuple[int, ...] | None, ...] = ()

    def read_region(self, region: Sequence[slice]) -> tuple[tuple[slice, ...], np.ndarray]:
        """The input region a working chunk read (its region grown by the halo) and its data."""
        grown = self.grown(region)
        if self.kind == "tiff":
            from .io import TiffArray  # noqa: PLC0415

            return grown, np.asarray(TiffArray(self.path)[grown])
        return grown, np.asarray(_zarr_array(self.path)[grown])

    def keys(self, grown: Sequence[slice]) -> list[str]:
        """The files under an input region (the TIFF itself, or the Zarr chunk files)."""
        if self.kind == "tiff":
            return [Path(self.path).name]
        return keys_for_region(_zarr_array(self.path), grown)

    def quick_signature(self, grown: Sequence[slice], listing: Listing | None = None) -> str:
        """Hash of (key, size, mtime_ns) of the files under ``grown`` (``missing`` if absent)."""
        entries = []
        for key in self.keys(grown):
            if listing is not None:
                entry = listing.get(key)
            else:
                file = Path(self.path) if self.kind == "tiff" else Path(self.path, key)
                try:
                    info = file.stat()
                    entry = (int(info.st_size), int(info.st_mtime_ns))
                except OSError:
                    entry = None
            entries.append([key, list(entry) if entry else "missing"])
        return _digest(json.dumps(entries).encode())

    def content_signature(self, region: Sequence[slice]) -> str:
        """Checksum of the input a working chunk read (its region plus halo).

        For an unsharded Zarr input: the bytes of the chunk files under the region, streamed
        from disk (no decoding; usually from the page cache, as the task just read them), so
        a moved or copied store has the same checksum and a recompressed one does not (it is
        then refused as changed: the safe side). For a sharded Zarr input or a TIFF, where one
        file holds much more than the region: the decoded values of the region.
        """
        grown = self.grown(region)
        if self.kind == "zarr" and getattr(_zarr_array(self.path), "shards", None) is None:
            digest = hashlib.blake2b(b"files\0", digest_size=16)
            for key in self.keys(grown):
                digest.update(f"{key}\0".encode())
                try:
                    with open(Path(self.path, key), "rb") as handle:
                        digest.update(hashlib.file_digest(handle, "blake2b").digest())
                except FileNotFoundError:
                    digest.update(b"missing")
            return "files:" + digest.hexdigest()
        _, data = self.read_region(region)
        return "values:" + content_checksum(data)

    def grown(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """``region`` grown by the halo, clipped at the volume's edges."""
        grown = []
        for axis, (s, d, n) in enumerate(zip(region, self.depth, self.shape)):
            mapping = self.lead[axis] if axis < len(self.lead) else None
            if mapping is not None:
                start = int(mapping[int(s.start)])
                grown.append(slice(start, start + int(s.stop) - int(s.start)))
            else:
                grown.append(slice(max(0, int(s.start) - d), min(n, int(s.stop) + d)))
        return tuple(grown)

    def signature(self, region: Sequence[slice], read: bool = True) -> dict[str, str]:
        """What the working chunk at ``region`` read: ``quick`` and ``content`` signatures.

        Called in the write task, right after the chunk was computed (see
        :meth:`content_signature` for what is hashed). With ``read=False`` (a background
        chunk decided from a coarse pyramid level, whose input was never read) the content is
        ``"unread"``: nothing proves what the input held, so a resume trusts the chunk only
        while the quick signature still matches and otherwise counts it as changed.
        """
        return {
            "quick": self.quick_signature(self.grown(region)),
            "content": self.content_signature(region) if read else UNREAD,
        }


#: The content signature of a chunk whose input was not read (see InputReference.signature).
UNREAD = "unread"


@functools.lru_cache(maxsize=8)
def _zarr_array(path: str) -> Any:
    """The input Zarr array at ``path``, opened read-only once per process."""
    import zarr  # noqa: PLC0415

    return zarr.open_array(path, mode="r")


def content_checksum(data: np.ndarray) -> str:
    """Checksum of decoded array data: its dtype, shape and C-ordered bytes."""
    data = np.ascontiguousarray(data)
    digest = hashlib.blake2b(f"{data.dtype.str}{data.shape}".encode(), digest_size=16)
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def _digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def input_reference(volume: Any, depth: Sequence[int]) -> InputReference | None:
    """The :class:`InputReference` of an opened :class:`~ssi_dask.io.Volume` (None in memory)."""
    if volume.path is None:
        return None
    kind = "tiff" if Path(volume.path).is_file() else "zarr"
    return InputReference(
        path=str(volume.path),
        kind=kind,
        shape=tuple(int(s) for s in volume.shape),
        depth=tuple(int(d) for d in depth),
    )


def changed_input_chunks(
    reference: InputReference,
    records: Mapping[Any, dict[str, Any]] | Iterable[tuple[Any, dict[str, Any]]],
    regions: Mapping[Any, tuple[slice, ...]],
    unread: list | None = None,
) -> tuple[list[Any], int, int]:
    """Recorded working chunks whose input region no longer holds the data they were made from.

    ``records``: a dict of records by block index, or ``(index, record)`` pairs streamed from
    :func:`ssi_dask.progress.iter_records` (nothing then held per chunk but the changed ones).
    One listing of the input store; a record whose quick signature still matches is trusted,
    the others are re-read and compared by content. Returns the changed block indices (C order),
    how many chunks had to be re-read and how many were checked. A record without an input
    signature (written by an older ssi-dask) counts as changed: nothing proves what it read.
    ``unread``, when given, receives the changed chunks whose input was never read (decided
    from a pyramid level, content :data:`UNREAD`), so a caller can say why without reading
    their records again.
    """
    listing = store_listing(reference.path)
    pairs = records.items() if isinstance(records, Mapping) else records
    changed, reread, checked = [], 0, 0
    for index, record in pairs:
        checked += 1
        recorded = record.get("input") or {}
        if not recorded.get("content"):
            changed.append(index)
            continue
        grown = reference.grown(regions[index])
        if reference.quick_signature(grown, listing) == recorded.get("quick"):
            continue
        reread += 1
        if recorded["content"] == UNREAD:  # nothing to compare the input with
            changed.append(index)
            if unread is not None:
                unread.append(index)
        elif reference.content_signature(regions[index]) != recorded["content"]:
            changed.append(index)
    return sorted(changed), reread, checked


def block_regions(chunks: tuple[tuple[int, ...], ...]) -> list[tuple[tuple[int, ...], tuple]]:
    """List ``(block_index, region)`` for every block of a Dask chunk grid, in C order."""
    offsets = [np.concatenate([[0], np.cumsum(sizes)]).astype(int) for sizes in chunks]
    regions = []
    for index in itertools.product(*(range(len(sizes)) for sizes in chunks)):
        region = tuple(
            slice(int(offsets[axis][i]), int(offsets[axis][i + 1])) for axis, i in enumerate(index)
        )
        regions.append((index, region))
    return regions


class GridRegions(Mapping):
    """``{block index: region}`` of a chunk grid, computed on demand (nothing per chunk stored).

    Behaves like ``dict(block_regions(chunks))`` (C-ordered iteration, ``len``, lookup) in
    memory that grows with the number of chunks along each axis, not with their product, so
    a petabyte's grid costs kilobytes.
    """

    def __init__(self, chunks: Sequence[Sequence[int]]) -> None:
        self.chunks = tuple(tuple(int(s) for s in sizes) for sizes in chunks)
        self._offsets = [np.concatenate([[0], np.cumsum(s)]).astype(np.int64) for s in self.chunks]
        self._counts = tuple(len(sizes) for sizes in self.chunks)

    def __getitem__(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        try:
            if len(index) != len(self._counts) or not all(
                0 <= int(i) < n for i, n in zip(index, self._counts)
            ):
                raise KeyError(index)
        except TypeError:
            raise KeyError(index) from None
        return tuple(
            slice(int(offsets[i]), int(offsets[i + 1])) for offsets, i in zip(self._offsets, index)
        )

    def __iter__(self):
        return itertools.product(*(range(n) for n in self._counts))

    def __len__(self) -> int:
        return math.prod(self._counts)

    def __contains__(self, index: object) -> bool:
        try:
            self[index]  # type: ignore[index]
        except KeyError:
            return False
        return True
