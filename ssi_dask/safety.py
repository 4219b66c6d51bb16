"""Guards around what this tool writes: never the input, only its own stores, one run at a time.

Three rules, applied to every output (CLI and Python API alike):

1. **Never inside or above the input.** An output may not be the input, lie inside it, or
   contain any part of it. Paths are compared after resolving symbolic links, and the
   protected tree of a Zarr input is the whole Zarr hierarchy it belongs to (an array inside a
   group protects the group), so ``run in.zarr in.zarr/out.zarr`` and ``run img.ome.zarr
   img.ome.zarr/0`` are refused.
2. **Delete only what this tool made.** ``overwrite`` removes an existing output only when it
   is a real folder (not a symbolic link), carries this tool's marker file (or, for outputs of
   earlier versions, its ``ssi_dask`` attributes), and holds nothing but a Zarr store's own
   files. The old store is first renamed out of the way (one atomic step, so a crash never
   leaves a half-deleted store under the output's name), then removed.
3. **One run per output.** A run holds a lock file inside its output, created atomically; a
   second run on the same output is refused with one line. The lock is released when the run
   ends; a lock whose owner process is gone (same host) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import socket
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError

#: Marker file that identifies a store made by ssi-dask (written when the output is created).
MARKER_FILE = ".ssi_dask_output.json"

#: Lock file held inside an output while a run writes it.
LOCK_FILE = ".ssi_dask.lock"

#: Zarr's own metadata files (v2 and v3).
ZARR_METADATA = frozenset({".zarray", ".zgroup", ".zattrs", ".zmetadata", "zarr.json"})

#: Chunk keys: v2 "0.1.2" (or nested "0/1/2"), v3 "c/0/1/2" or "c.0.1.2", and "c" alone (0-d).
_CHUNK_KEY = re.compile(r"^(c|c[./]\d+([./]\d+)*|\d+([./]\d+)*)$")
_DIGITS = re.compile(r"^\d+$")


def resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with every symbolic link resolved (it need not exist).

    ``os.path.realpath`` resolves each component in order, as the operating system does, so
    ``link/../x`` names the folder *above the link's target*, never ``x`` beside the link.
    """
    return Path(os.path.realpath(os.fspath(path)))


def unresolved_leaf(path: str | os.PathLike) -> Path:
    """``path`` with its folder resolved but its last component kept as given.

    This is the entry the operating system would create or delete for ``path``; unlike
    :func:`resolved` it still shows whether that entry itself is a symbolic link.
    """
    text = os.fspath(path).rstrip(os.sep) or os.sep
    head, tail = os.path.split(text)
    if tail in ("", ".", ".."):
        return resolved(text)
    return resolved(head or os.curdir) / tail


def is_zarr_node(path: Path) -> bool:
    """True when ``path`` is a folder holding Zarr metadata (an array or a group)."""
    return path.is_dir() and any((path / name).is_file() for name in ZARR_METADATA)


def protected_root(input_path: str | os.PathLike) -> Path:
    """The tree an input occupies: the input itself, or the outermost Zarr hierarchy holding it.

    An array inside a Zarr group (``group.zarr/0``) belongs to the group's store, which is
    protected as a whole; a TIFF file protects itself.
    """
    root = resolved(input_path)
    if not is_zarr_node(root):
        return root
    while is_zarr_node(root.parent) and root.parent != root:
        root = root.parent
    return root


def check_not_input(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    *,
    what: str = "output",
) -> Path:
    """Refuse an ``output`` equal to, inside, or containing any input; return it resolved.

    Parameters
    ----------
    output : str or path-like
        Where something is about to be written (it need not exist).
    inputs : iterable of path-like or None
        The inputs of the run (``None`` entries, e.g. in-memory arrays, are skipped).
    what : str
        How the output is named in the message (e.g. ``"output"``, ``"--save-model"``).

    Raises
    ------
    OutputError
        When ``output`` and an input's protected tree overlap.
    """
    target = resolved(output)
    for source in inputs:
        if source is None:
            continue
        root = protected_root(source)
        if target == root:
            relation = "is the input"
        elif root in target.parents:
            relation = f"is inside the input {str(root)!r}"
        elif target in root.parents:
            relation = f"contains the input {str(root)!r}"
        else:
            continue
        raise OutputError(
            f"{what} {str(target)!r} {relation}; the input is never written or deleted: "
            "choose an output path outside it"
        )
    return target


def foreign_entries(store: str | os.PathLike, limit: int = 3) -> list[str]:
    """Entries under ``store`` that are not a Zarr store's own files (nor this tool's).

    Allowed: Zarr metadata files, chunk keys (v2 and v3 encodings), sub-groups/arrays, and
    this tool's own hidden files and folders (``.ssi_dask*``). Symbolic links never count as
    a store's own files. Returns up to ``limit`` offending paths, relative to ``store``.
    """
    store = Path(store)
    found: list[str] = []
    for folder, dirs, files in os.walk(store):
        here = Path(folder)
        relative = here.relative_to(store)
        for name in sorted(files):
            entry = here / name
            if entry.is_symlink() or not _own_file(relative, name):
                found.append(str(relative / name))
        kept = []
        for name in sorted(dirs):
            entry = here / name
            if entry.is_symlink():
                found.append(str(relative / name))
            elif _is_own_name(name):
                continue  # this tool's records and temporary files: not descended into
            elif _DIGITS.match(name) or name == "c":
                kept.append(name)  # chunk folders and OME levels ("0", "1", ...)
            else:  # any other folder, a Zarr group or array of the user's included
                found.append(str(relative / name) + "/")
        dirs[:] = [] if len(found) >= limit else kept
        if len(found) >= limit:
            break
    return found[:limit]


def _is_own_name(name: str) -> bool:
    """This tool's files and their temporary or stale siblings (``.ssi_dask*``, ``..ssi_dask*``)."""
    return name.startswith(".ssi_dask") or name.startswith("..ssi_dask")


def _own_file(relative: Path, name: str) -> bool:
    if name in ZARR_METADATA or _is_own_name(name):
        return True
    if name.endswith(".partial"):  # Zarr's temporary file of a chunk being written
        name = name.split(".", 1)[0]
    key = "/".join([*relative.parts, name])
    # chunk files live directly in an array folder or in its c/ and digit sub-folders
    return bool(_CHUNK_KEY.match(name)) or bool(_CHUNK_KEY.match(key.split("/", 1)[-1]))


def made_by_this_tool(store: str | os.PathLike) -> bool:
    """True when ``store`` carries this tool's marker (or an earlier version's attributes)."""
    store = Path(store)
    if (store / MARKER_FILE).is_file():
        return True
    for name in ("zarr.json", ".zattrs"):  # outputs written before the marker existed
        try:
            attributes = json.loads((store / name).read_text())
        except (OSError, ValueError):
            continue
        if name == "zarr.json":
            attributes = attributes.get("attributes") or {}
        legacy = isinstance(attributes, dict) and isinstance(attributes.get("ssi_dask"), dict)
        if legacy and "fingerprint" in attributes["ssi_dask"]:
            # an ssi-dask output of an earlier version also has its completion records
            return any((folder / ".ssi_dask_progress").is_dir() for folder in (store, store / "0"))
    return False


def check_deletable(output: str | os.PathLike, *, option: str = "overwrite=True") -> None:
    """Refuse to delete ``output`` unless it is a store this tool made (see the module notes).

    Raises
    ------
    OutputError
        When ``output`` is a symbolic link, not a folder, not made by ssi-dask, or holds
        files that are not a Zarr store's own.
    """
    path = unresolved_leaf(output)
    if path.is_symlink():
        raise OutputError(
            f"output {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); refusing to "
            f"delete through it with {option}: give the real path or remove the link yourself"
        )
    leftover = path.is_dir() and (path / MARKER_FILE).is_file() and not is_zarr_node(path)
    if leftover and not foreign_entries(path):  # a run that stopped before creating its array
        check_unlocked(path)
        return
    if not path.is_dir() or not is_zarr_node(path):
        raise OutputError(
            f"output {str(path)!r} exists and is not a Zarr store; refusing to delete it with "
            f"{option}, remove it yourself or choose another path"
        )
    if not made_by_this_tool(path):
        raise OutputError(
            f"output {str(path)!r} is a Zarr store that ssi-dask did not make; refusing to delete "
            f"it with {option}, remove it yourself or choose another path"
        )
    check_unlocked(path)  # never delete a store another run is writing
    foreign = foreign_entries(path)
    if foreign:
        raise OutputError(
            f"output {str(path)!r} holds files that are not part of a Zarr store "
            f"({', '.join(repr(f) for f in foreign)}); refusing to delete it with {option}, "
            "move those files out or choose another path"
        )


def remove_store(output: str | os.PathLike) -> None:
    """Delete an output store after :func:`check_deletable`: rename it away, then remove it.

    The rename is one atomic step in the same folder, so an interrupted deletion leaves a
    hidden ``.NAME.ssi-dask-deleting-*`` folder, never a half-deleted store under the
    output's own name.
    """
    path = unresolved_leaf(output)
    check_deletable(path)
    trash = path.with_name(f".{path.name}.ssi-dask-deleting-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError as exc:
        raise OutputError(
            f"cannot remove output {str(path)!r} ({exc.strerror or exc}); remove it yourself or "
            "choose another path"
        ) from None
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():
        from .quiet import SsiDaskWarning  # noqa: PLC0415

        warnings.warn(
            f"the old output could not be removed completely; what is left of it is in "
            f"{str(trash)!r}: remove it yourself to free the space",
            SsiDaskWarning,
            stacklevel=2,
        )


def write_marker(store: str | os.PathLike, **details) -> None:
    """Mark ``store`` as made by ssi-dask (what ``overwrite`` later checks)."""
    from ._version import __version__  # noqa: PLC0415

    record = {"tool": "ssi-dask", "version": __version__, "created": _now(), **details}
    write_atomically(Path(store) / MARKER_FILE, json.dumps(record))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file unique to this writer, fsync it, rename it over
    ``path``: readers see the old file or the whole new one, never a part."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


# ---------------------------------------------------------------------------------------------
# The output lock


_held: dict[Path, int] = {}  # outputs locked by this process
_held_guard = threading.Lock()


def _process_start(pid: int) -> float | None:
    try:
        import psutil  # noqa: PLC0415

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def _lock_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": _now(),
        "token": uuid.uuid4().hex,
    }


def _owner_alive(record: dict) -> bool | None:
    """True/False when the lock's owner can be checked (same host), None when it cannot."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    started = _process_start(pid)
    if started is None:
        return False  # no such process: the lock is stale
    try:
        recorded = float(record.get("process_start"))
    except (TypeError, ValueError):
        return None  # a process with that pid lives, but it cannot be told apart from the owner
    return abs(started - recorded) < 1.0


def _read_lock(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _create_lock(path: Path, record: dict) -> bool:
    """Create the lock file holding ``record`` atomically; False when one exists already."""
    temporary = path.with_name(f".{path.name}.{record['token']}.tmp")
    try:
        with open(temporary, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the lock file of output {str(path.parent)!r} "
            f"({exc.strerror or exc}); make the output writable or choose another output"
        ) from None
    try:
        os.link(temporary, path)  # atomic, and the lock is whole the moment it exists
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create instead
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        return True
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(store: str | os.PathLike) -> Iterator[Path]:
    """Hold ``store``'s lock file for the duration of the block.

    Not re-entrant: a second call for the same output, from another thread of this process
    too, is refused like a call from another process.

    Raises
    ------
    OutputError
        When another live run holds the lock (or one on another host, which cannot be
        checked: the message says which file to remove if that run is gone).
    """
    store = resolved(store)
    lock = store / LOCK_FILE
    with _held_guard:
        if store in _held:  # another call in this process (a thread, a notebook cell)
            raise OutputError(
                f"output {str(store)!r} is being written by another ssi-dask run in this "
                "process; wait for it to finish or choose another output"
            )
        _acquire(lock)
        _held[store] = 1
    try:
        yield lock
    finally:
        with _held_guard:
            del _held[store]
            _release(lock)


def _acquire(lock: Path) -> None:
    record = _lock_record()
    if lock.is_dir() or lock.is_symlink():
        raise OutputError(
            f"the lock {str(lock)!r} is a folder or a symbolic link, not an ssi-dask lock file; "
            "remove it yourself, then retry"
        )
    for _ in range(5):
        if _create_lock(lock, record):
            _mine[lock] = record["token"]
            return
        existing = _read_lock(lock)
        if existing is None:
            continue  # released meanwhile: try again
        check_unlocked(lock.parent)  # raises while a live (or unverifiable) owner holds it
        _remove_stale(lock, existing)
    raise OutputError(
        f"could not lock output {str(lock.parent)!r} (another run keeps taking it); retry later"
    )


def _remove_stale(lock: Path, judged: dict) -> None:
    """Move a stale lock away, putting it back if it changed since it was judged stale."""
    aside = lock.with_name(f".{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != judged:  # a new owner took it in the meantime: give it back
        try:
            os.link(aside, lock)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


_mine: dict[Path, str] = {}


def _release(lock: Path) -> None:
    token = _mine.pop(lock, None)
    existing = _read_lock(lock)
    if existing and token is not None and existing.get("token") == token:
        lock.unlink(missing_ok=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Outputs as a whole


def check_output_target(
    output: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> Path:
    """Check, without changing anything, that a new output may be written at ``output``.

    Returns the output's resolved path.

    Raises
    ------
    OutputError
        When the output overlaps an input, exists (without ``overwrite``), cannot be deleted
        safely (with ``overwrite``, see :func:`check_deletable`), or its folder is missing or
        read-only.
    """
    target = check_not_input(output, inputs)
    given = unresolved_leaf(output)
    if given.exists() or given.is_symlink():
        if not overwrite:
            raise OutputError(
                f"output {str(target)!r} already exists; choose a new path or pass overwrite=True"
            )
        check_deletable(given)
    if not target.parent.is_dir():
        raise OutputError(
            f"the folder of output {str(target)!r} does not exist; "
            f"create {str(target.parent)!r} first"
        )
    if not os.access(target.parent, os.W_OK):
        raise OutputError(
            f"cannot write to {str(target.parent)!r} (read-only); choose another output"
        )
    return target


@contextlib.contextmanager
def claim_output(
    output: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Make a new, empty, marked and locked output folder; hold its lock during the block.

    With ``overwrite``, an existing output is deleted first, only after the checks of
    :func:`check_output_target` pass and while holding its lock (a run still writing it is
    never deleted from under it).

    Yields
    ------
    pathlib.Path
        The output's resolved path (an empty folder holding the marker and the lock).
    """
    inputs = list(inputs)
    target = check_output_target(output, inputs=inputs, overwrite=overwrite)
    given = unresolved_leaf(output)
    if given.exists():
        with output_lock(given):
            remove_store(given)
    try:
        os.mkdir(target)
    except FileExistsError:
        raise OutputError(
            f"output {str(target)!r} already exists (another run created it just now?); "
            "choose a new path or pass overwrite=True"
        ) from None
    except OSError as exc:
        raise OutputError(f"cannot create output {str(target)!r}: {exc.strerror or exc}") from None
    with output_lock(target):
        write_marker(target)
        yield target


def source_paths(array) -> list[Path]:
    """The files or Zarr stores a lazy Dask array reads (its ``from_array`` sources).

    Lets :func:`ssi_dask.write_zarr` protect the inputs of any lazy result, also when the
    caller did not name them: sources kept as graph keys (``da.from_array``, ``da.from_zarr``)
    or inlined into the read tasks (``inline_array=True``), and xarray's lazy wrappers around a
    Zarr array (``xr.open_zarr``). Only the graph's source layers are looked at, never every
    task, so this stays cheap for large graphs. Sources it cannot see (e.g. a custom reader)
    are protected only when passed as ``input_path``.
    """
    graph = getattr(array, "__dask_graph__", lambda: None)()
    layers = getattr(graph, "layers", None) or {}
    candidates = []
    for name, layer in layers.items():
        if str(name).startswith("original-"):
            try:
                candidates.extend(layer.values())
            except Exception:
                continue
        for argument, _ in getattr(layer, "indices", None) or ():
            candidates.append(argument)  # an array inlined into a blockwise read
    paths: list[Path] = []
    for value in candidates:
        path = _source_path(getattr(value, "value", value))  # task-spec nodes wrap the data
        if path is not None and path not in paths:
            paths.append(path)
    return paths


def _source_path(value, depth: int = 0) -> Path | None:
    """The on-disk location behind an array-like, unwrapping xarray's lazy adapters."""
    if value is None or depth > 8 or isinstance(value, (str, bytes, int, float, tuple)):
        return None
    store = getattr(value, "store", None)
    if store is not None and hasattr(value, "shape"):  # a Zarr array
        root = getattr(store, "root", None) or getattr(store, "path", None)
        if isinstance(root, (str, os.PathLike)) and str(root):
            inner = str(getattr(value, "path", "") or "")
            return resolved(Path(root) / inner) if inner else resolved(root)
    path = getattr(value, "path", None)  # ssi-dask's TIFF reader
    if isinstance(path, str) and path and hasattr(value, "shape") and Path(path).is_file():
        return resolved(path)
    for attribute in ("array", "_array"):  # xarray's lazily indexed wrappers
        inner = getattr(value, attribute, None)
        if inner is not None and inner is not value:
            found = _source_path(inner, depth + 1)
            if found is not None:
                return found
    return None


def check_replaceable_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    option: str = "overwrite=True",
) -> Path:
    """Check that a single output file (PSF, checkpoint) may be written at ``path``.

    An existing file is replaced only with ``overwrite``, and only when it is a plain file:
    never a folder, never through a symbolic link; never an input or a file inside one.

    Returns the resolved path.
    """
    target = check_not_input(path, inputs)
    given = unresolved_leaf(path)
    if given.is_symlink():
        raise OutputError(
            f"{str(given)!r} is a symbolic link; refusing to write through it: give the real "
            "path or remove the link yourself"
        )
    if given.exists():
        if given.is_dir():
            raise OutputError(
                f"{str(given)!r} is a folder; refusing to replace it with a file, choose "
                "another name"
            )
        if not overwrite:
            raise OutputError(f"{str(given)!r} already exists; choose a new name or pass {option}")
    return target


def check_unlocked(store: str | os.PathLike) -> None:
    """Refuse, without taking it, an output whose lock a live run holds (a fast early check).

    The lock itself is taken later, when the run starts writing (:func:`output_lock`).
    """
    lock = resolved(store) / LOCK_FILE
    existing = _read_lock(lock)
    token = existing.get("token") if existing else None
    if not existing or (token is not None and _mine.get(lock) == token):
        return
    alive = _owner_alive(existing)
    if alive is None:
        raise OutputError(
            f"output {str(lock.parent)!r} is locked by a run on {existing.get('host')!r} "
            f"(pid {existing.get('pid')}, started {existing.get('started')}) that cannot be "
            f"checked from here; wait for it, or if no ssi-dask run is writing it any more, "
            f"delete {str(lock)!r} and retry"
        )
    if alive:
        raise OutputError(
            f"output {str(lock.parent)!r} is being written by another ssi-dask run (pid "
            f"{existing.get('pid')}, started {existing.get('started')}); wait for it to "
            "finish or choose another output"
        )
