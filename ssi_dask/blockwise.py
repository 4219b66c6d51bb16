"""Chunk planning and the ``map_overlap`` orchestration (graph only; kernels live elsewhere).

The plan answers: how big is a working chunk, how deep is the halo, how are output chunks laid
out so that each task writes whole output chunks, and how much memory does a task need.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from .config import DEFAULT_TARGET_VOXELS, LRSettings, check_tta, refuse_lr_options, ssi_tta
from .errors import DeviceError, OutputError, ParameterError
from .lr import lr_default_depth

# Default working-chunk size in voxels: config.DEFAULT_TARGET_VOXELS, large enough that
# per-task compute dwarfs the scheduler's per-task overhead (DESIGN.md rule 4), small enough
# for ~1 GiB workers.

#: ``map_overlap`` boundary per method. LR keeps the Bertero-Boccacci treatment of the true
#: edges ("none": edge chunks see the same edge as a whole-volume run); the SSI network needs
#: context beyond the edge and gets the mirror image that ssi_dask.ssi.predict also uses.
METHOD_BOUNDARY = {"lr": "none", "ssi": "reflect"}


#: Relative tail energy of LR's response beyond the halo that :func:`lr_measured_depth`
#: allows: the README's promise (chunked within 1e-3 of whole) itself. Measured on
#: chunked-vs-whole runs (tests/test_blockwise.py): on the example data (`ssi-dask
#: make-example`, 17^3 widefield PSF, 10 iterations) 3e-3 left 1.0e-3 of the maximum, 1e-3
#: 6.3e-4; on the other cases tested 1e-3 leaves well below 1e-3.
HALO_TAIL_TOLERANCE = 1e-3

#: Largest working domain (voxels) on which :func:`lr_measured_depth` measures the response.
_RESPONSE_MAX_VOXELS = 2**22


def lr_measured_depth(
    psf: np.ndarray,
    num_iter: int,
    back_projector: str = "classic",
    *,
    back_projector_options: dict | None = None,
    tolerance: float = HALO_TAIL_TOLERANCE,
    image_shape: Sequence[int] | None = None,
    acceleration: str = "none",
) -> tuple[int, ...]:
    """Halo from the measured reach of ``num_iter`` Lucy-Richardson iterations with ``psf``.

    Linearised around a flat estimate, ``n`` iterations respond to a change of the data
    (a cut at a chunk's edge replaces the data beyond it) through the kernel
    ``R_n = sum_{j<n} (1 - B H)^j B`` (``H`` the PSF's transform, ``B`` the back projector's:
    ``conj(H)`` classic, the Wiener-Butterworth kernel otherwise). The halo along each axis is
    the smallest distance beyond which ``|R_n|``, summed over the other axes, holds at most
    ``tolerance`` of its total. It is computed once per plan (cached) on a domain that holds
    the kernel's whole support (``(2 n - 1)`` PSF radii, at most ``image_shape``) along the
    axis measured; where that exceeds about four million voxels, each axis is measured on its
    own domain with the other axes shrunk (wrap-around along them leaves the summed profile
    nearly unchanged). It takes up to a few seconds. Where the PSF spreads little energy far
    (a Gaussian cut at 2 sigma) this is wider than :func:`lr_default_depth`; along a widefield
    PSF's optical axis (the missing cone) much wider.

    Parameters
    ----------
    psf : numpy.ndarray
        Non-negative PSF (normalised here).
    num_iter : int
        Number of iterations (``>= 0``).
    back_projector : {"classic", "wiener-butterworth"}
        The back projector; ``back_projector_options`` (``wiener_alpha``,
        ``butterworth_order``, ``cutoff``) as for :func:`ssi_dask.lr.richardson_lucy`.
    tolerance : float
        Fraction of the response's energy allowed beyond the halo.
    image_shape : sequence of int, optional
        The image's shape: no halo needs to exceed it.
    acceleration : {"none", "nesterov"}
        The iterations' momentum (the linearised response includes it).

    Returns
    -------
    tuple of int
        The halo per axis.
    """
    from .lr import resolve_back_projector  # noqa: PLC0415

    psf = np.asarray(psf, dtype=np.float64)
    spec = resolve_back_projector(psf, back_projector, **(back_projector_options or {}))
    cap = tuple(int(s) for s in image_shape) if image_shape is not None else None
    digest = hashlib.blake2b(psf.tobytes(), digest_size=16).hexdigest()
    key = (digest, psf.shape, int(num_iter), spec, float(tolerance), cap, acceleration)
    if key not in _MEASURED_DEPTHS:  # plans are made many times (--iterations auto tries n)
        if len(_MEASURED_DEPTHS) > 256:
            _MEASURED_DEPTHS.clear()
        _MEASURED_DEPTHS[key] = _measure_depth(
            psf, int(num_iter), spec, float(tolerance), cap, acceleration
        )
    return _MEASURED_DEPTHS[key]


_MEASURED_DEPTHS: dict[tuple, tuple[int, ...]] = {}


def _measure_depth(
    psf: np.ndarray,
    num_iter: int,
    spec: Any,
    tolerance: float,
    image_shape: tuple[int, ...] | None,
    acceleration: str = "none",
) -> tuple[int, ...]:
    shape = psf.shape
    ndim = psf.ndim
    if num_iter <= 0:
        return (0,) * ndim
    psf = psf / psf.sum()
    radius = [s // 2 for s in shape]
    reach = [max(1, (2 * num_iter - 1) * r) for r in radius]  # the kernel's exact support
    if image_shape is not None:
        reach = [min(r, int(s)) for r, s in zip(reach, image_shape)]
    full = [2 * r + s for r, s in zip(reach, shape)]
    if math.prod(full) <= _RESPONSE_MAX_VOXELS:
        profiles = _response_profiles(psf, num_iter, spec, full, range(ndim), acceleration)
    else:  # per axis: that axis whole, the others shrunk (wrap-around there keeps the profile)
        profiles = {}
        for axis in range(ndim):
            size = list(full)
            while math.prod(size) > _RESPONSE_MAX_VOXELS:
                others = [a for a in range(ndim) if a != axis and size[a] > shape[a] + 2]
                if not others:
                    break
                widest = max(others, key=lambda a: size[a])
                size[widest] = max(shape[widest] + 2, int(size[widest] * 0.8))
            profiles.update(_response_profiles(psf, num_iter, spec, size, [axis], acceleration))
    depth = []
    for axis in range(ndim):
        profile = profiles[axis]
        index = np.arange(profile.size)
        distance = np.minimum(index, profile.size - index)
        within = np.cumsum(np.bincount(distance, weights=profile))  # energy at distance <= d
        beyond = within[-1] - within
        fits = np.nonzero(beyond <= tolerance * within[-1])[0]
        depth.append(int(fits[0]) if fits.size else reach[axis])
    return tuple(depth)


def _response_profiles(
    psf: np.ndarray,
    num_iter: int,
    spec: Any,
    size: Sequence[int],
    axes: Sequence[int],
    acceleration: str = "none",
) -> dict[int, np.ndarray]:
    """``|R_n|`` summed over all axes but one, for each of ``axes``, on a ``size`` domain.

    With ``acceleration="nesterov"``, ``R_n`` is the response of the linearised iterations
    with their momentum: ``r_k = p_k (1 - g) + b`` from ``p_k = r_{k-1} + w_k (r_{k-1} -
    r_{k-2})``, ``w_k = (k - 2) / (k + 1)``, per frequency (``g = b h``).
    """
    from scipy import fft  # noqa: PLC0415

    from .lr import wiener_butterworth_kernel  # noqa: PLC0415

    ndim = psf.ndim
    size = [fft.next_fast_len(int(n), real=True) for n in size]

    def transform(kernel: np.ndarray, origin: Sequence[int]) -> np.ndarray:
        work = np.zeros(size)
        work[tuple(slice(0, k) for k in kernel.shape)] = kernel
        work = np.roll(work, [-o for o in origin], axis=tuple(range(ndim)))
        return fft.rfftn(work)

    otf = transform(psf, [(k - 1) // 2 for k in psf.shape])
    if spec.kind == "classic":
        back = np.conj(otf)
    else:
        kernel = wiener_butterworth_kernel(psf.astype(np.float32), spec).astype(np.float64)
        back = transform(kernel, [k - 1 - (k - 1) // 2 for k in kernel.shape])
        back = back / back.flat[0].real  # the update divides by b * 1
    gain = back * otf
    tiny = np.abs(gain) < 1e-9
    safe = np.where(tiny, 1.0, gain)
    if acceleration == "nesterov":
        previous = current = np.zeros_like(gain)
        for k in range(1, num_iter + 1):
            point = current + max(k - 2, 0) / (k + 1) * (current - previous)
            previous, current = current, point * (1 - gain) + back
        response = current
    else:  # sum_{j<n} (1 - g)^j = (1 - (1 - g)^n) / g, and n where g -> 0
        response = np.where(tiny, num_iter * back, back * (1 - (1 - gain) ** num_iter) / safe)
    magnitude = np.abs(fft.irfftn(response, s=size))  # centred on index 0 (circular)
    return {axis: magnitude.sum(axis=tuple(a for a in range(ndim) if a != axis)) for axis in axes}


def parse_chunks(spec: str | int | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    """Parse a chunk spec like ``"64,256,256"`` or ``"256"`` (same for every axis)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return None
    if isinstance(spec, (int, np.integer)):
        spec = (int(spec),)
    if isinstance(spec, str):
        try:
            sizes = tuple(int(part) for part in spec.replace("x", ",").split(","))
        except ValueError:
            raise ParameterError(
                f"invalid chunk spec {spec!r}; give integers separated by commas, e.g. "
                f"{','.join(['256'] * ndim)}"
            ) from None
    else:
        sizes = tuple(int(s) for s in spec)
    if len(sizes) == 1:
        sizes = sizes * ndim
    if len(sizes) != ndim:
        raise ParameterError(
            f"chunk spec {spec!r} has {len(sizes)} sizes but the image has {ndim} dimensions"
        )
    if any(s <= 0 for s in sizes):
        raise ParameterError(f"chunk sizes must be positive, got {sizes}")
    return sizes


#: :func:`choose_working_chunks` cuts below the store's chunks only where they would make a
#: working chunk hold more than this many times the target (up to it, a few tasks' worth of
#: memory buys reads aligned with the store)
CUT_ABOVE = 8


def choose_working_chunks(
    shape: Sequence[int],
    unit: Sequence[int] | None = None,
    *,
    target_voxels: int | None = None,
    min_size: Sequence[int] | None = None,
    alignment: int = 1,
) -> tuple[int, ...]:
    """Grow a chunk shape from ``unit`` (the store's chunks) to about ``target_voxels``.

    Every side stays a multiple of the unit (so reads and writes align with the store) and at
    most the image size; the shortest side (relative to the image) is doubled first. In 3D the
    z side is first grown to about twice the cube root of the target (a widefield PSF spreads a
    cut far along z).

    A unit so large that the chunk would hold more than :data:`CUT_ABOVE` times the target
    (e.g. whole planes, chunks ``(1, Y, X)`` of a converted TIFF stack, where keeping z deep
    would put hundreds of planes in one task) is cut instead: the largest side is halved, in
    multiples of ``alignment``, never below ``min_size`` (nor, in 3D, z below the depth above),
    until the chunk holds at most twice the target. Reads then no longer align with the store
    (:func:`input_chunk_reads` counts the tasks that read each input chunk).
    """
    ndim = len(shape)
    unit = tuple(int(u) for u in (unit or (1,) * ndim))
    target = target_voxels or DEFAULT_TARGET_VOXELS.get(ndim, 2**22)
    chunk = [min(u, s) for u, s in zip(unit, shape)]
    floor = tuple(min_size or (1,) * ndim)
    for axis in range(ndim):  # respect a minimum (e.g. the halo) in whole units
        while chunk[axis] < min(floor[axis], shape[axis]):
            chunk[axis] = min(chunk[axis] + unit[axis], shape[axis])
    deepest = 2 * round(target ** (1 / 3))
    if ndim == 3:
        # Keep z deep (DESIGN.md rule 3): a widefield PSF spreads a cut far along z.
        while chunk[0] < min(shape[0], deepest):
            chunk[0] = min(max(chunk[0] // unit[0], 1) * 2 * unit[0], shape[0])
    while math.prod(chunk) < target:
        growable = [a for a in range(ndim) if chunk[a] < shape[a]]
        if not growable:
            break
        axis = min(growable, key=lambda a: (chunk[a], a))
        multiple = max(chunk[axis] // unit[axis], 1) * 2
        chunk[axis] = min(multiple * unit[axis], shape[axis])
    # a unit far above the target (e.g. whole planes): cut below it, back to the target's size
    cut = math.prod(chunk) > CUT_ABOVE * target
    while cut and math.prod(chunk) > 2 * target:
        floors = [max(f, deepest) if ndim == 3 and a == 0 else f for a, f in enumerate(floor)]
        halves = {a: _half(chunk[a], shape[a], alignment, floors[a]) for a in range(ndim)}
        cuttable = [a for a, h in halves.items() if h is not None]
        if not cuttable:
            break
        axis = max(cuttable, key=lambda a: (chunk[a], a))
        chunk[axis] = halves[axis]
    return tuple(chunk)


def _half(size: int, extent: int, alignment: int, floor: int) -> int | None:
    """``size`` halved (rounded up to a multiple of ``alignment``), or None where the half
    or the short chunk it leaves at the end of ``extent`` would be smaller than ``floor``."""
    half = -(-size // 2)
    half = -(-half // alignment) * alignment
    rest = extent % half
    if half >= size or half < max(floor, 1) or 0 < rest < floor:
        return None
    return half


def input_chunk_reads(
    working: Sequence[int], store_chunks: Sequence[int] | None, shape: Sequence[int]
) -> int:
    """How many tasks read each input chunk at most (1 where the working chunks are whole
    multiples of it; more where an input chunk is larger than a working chunk), halo aside."""
    if store_chunks is None:
        return 1
    return math.prod(
        max(-(-min(int(c), int(s)) // int(w)), 1) for w, c, s in zip(working, store_chunks, shape)
    )


#: The fewest voxels :func:`output_chunks_after_cut` leaves in an output chunk (4 MiB of float32).
OUTPUT_MIN_VOXELS = 2**20


def output_chunks_after_cut(working: Sequence[int], store_chunks: Sequence[int]) -> tuple[int, ...]:
    """Output chunks for a run whose working chunks cut the input store's chunks.

    The working chunks (e.g. ``(512, 128, 128)`` for an input stored in whole planes,
    ``(1, 2048, 2048)``) would make output chunks deep along an axis the input was thin in:
    a viewer showing one plane would read hundreds of megabytes a chunk. The working chunk is
    halved along the axis where it is deepest relative to the store's chunk, while that axis
    stays above the store's chunk, the halving divides evenly (every working boundary stays
    on an output boundary) and the chunk keeps at least :data:`OUTPUT_MIN_VOXELS`.
    """
    out = [int(w) for w in working]
    store = [int(c) for c in store_chunks]
    while True:
        axes = [
            a
            for a in range(len(out))
            if out[a] > store[a] and out[a] % 2 == 0 and math.prod(out) // 2 >= OUTPUT_MIN_VOXELS
        ]
        if not axes:
            return tuple(out)
        axis = max(axes, key=lambda a: (out[a] / store[a], -a))
        out[axis] //= 2


def check_write_alignment(
    working_chunks: tuple[tuple[int, ...], ...], output_chunks: Sequence[int], shape: Sequence[int]
) -> None:
    """Refuse a layout where two tasks would write into the same output chunk.

    Every working-chunk boundary must fall on an output-chunk boundary (DESIGN.md rule 5).
    """
    for axis, (sizes, out) in enumerate(zip(working_chunks, output_chunks)):
        edges = np.cumsum(sizes)[:-1]
        bad = [int(e) for e in edges if e % out != 0]
        if bad:
            raise OutputError(
                f"working chunks along axis {axis} end at {bad[:3]} which are not multiples of the "
                f"output chunk size {out}; choose chunks= as multiples of the output chunks "
                f"{tuple(output_chunks)}"
            )
    if any(c <= 0 for c in output_chunks) or len(output_chunks) != len(shape):
        raise OutputError(f"invalid output chunks {tuple(output_chunks)} for shape {tuple(shape)}")


@dataclass
class BlockPlan:
    """How a volume is cut into tasks. Printed by ``ssi-dask run --dry-run``."""

    shape: tuple[int, ...]
    input_dtype: str
    working_chunks: tuple[int, ...]
    output_chunks: tuple[int, ...]
    depth: tuple[int, ...]
    n_chunks: int
    n_tasks: int
    memory_per_task: int
    output_bytes: int
    output_dtype: str = "float32"
    #: tasks that read each input chunk at most (:func:`input_chunk_reads`), and those chunks
    input_reads: int = 1
    input_chunks: tuple[int, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable multi-line description."""
        reads = []
        if self.input_reads > 1:
            reads = [
                f"  input reads     each input chunk {self.input_chunks} is read by up to "
                f"{self.input_reads} tasks (it is larger than a working chunk); an input stored "
                "in chunks that divide the working chunks is read once"
            ]
        return "\n".join(
            [
                f"  shape           {self.shape} ({self.input_dtype} in, {self.output_dtype} out)",
                f"  working chunks  {self.working_chunks} -> {self.n_chunks} chunks",
                f"  output chunks   {self.output_chunks}",
                f"  halo (depth)    {self.depth}",
                f"  tasks in graph  {self.n_tasks} ({self.n_tasks / max(self.n_chunks, 1):.1f} "
                "per chunk)",
                f"  memory per task ~{_human_bytes(self.memory_per_task)}",
                f"  output size     {_human_bytes(self.output_bytes)} (uncompressed)",
                *reads,
            ]
        )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate_lr_task_memory(
    chunk: Sequence[int], depth: Sequence[int], psf_shape: Sequence[int]
) -> int:
    """Bytes one LR task holds at its peak: the padded block plus the FFT working buffers.

    Calibrated on the pipeline benchmark (benchmarks/RESULTS.md): about ten float32 arrays and
    two half-spectra of the working domain are alive at once (scipy.fft allocates its outputs),
    plus the input block in several dtypes and the result.
    """
    padded = [c + 2 * d for c, d in zip(chunk, depth)]
    domain = math.prod(p + s - 1 for p, s in zip(padded, psf_shape))
    return int(12 * math.prod(padded) + 4 * domain * 10 + 8 * domain * 2)


def _lr_chunk(
    block: np.ndarray,
    psf: np.ndarray,
    num_iter: int,
    options: dict,
    device: str = "cpu",
    offset: float = 0.0,
) -> np.ndarray:
    """Per-chunk task: Lucy-Richardson on one padded block.

    ``offset`` (the background) is subtracted first; values still negative are treated as 0
    by the kernel (:func:`ssi_dask.lr.richardson_lucy`). With ``device="gpu"`` the block goes
    to the worker's current CUDA device as a CuPy array, the same kernel runs there, and the
    result comes back to host memory for writing.
    """
    from .lr import richardson_lucy  # noqa: PLC0415

    if offset:
        block = block - np.float32(offset)
    _report_negative(block)

    if device == "gpu":
        import cupy  # noqa: PLC0415

        restored = richardson_lucy(cupy.asarray(block), psf, num_iter=num_iter, **options)
        return cupy.asnumpy(restored)
    options = {"workers": 1, **options}  # Dask runs chunks in parallel: one FFT thread each
    return richardson_lucy(block, psf, num_iter=num_iter, **options)


#: Topic of the Dask worker events that report negative input values (``ssi-dask run``
#: prints one warning line from them at the end).
NEGATIVE_INPUT_EVENT = "ssi-dask-negative-input"


def _report_negative(block: np.ndarray) -> None:
    """Tell the client (a Dask worker event) that this block has values below 0."""
    low = float(block.min()) if block.size else 0.0
    if low >= 0:
        return
    try:
        from distributed import get_worker  # noqa: PLC0415

        worker = get_worker()
    except (ImportError, ValueError):  # not on a distributed worker: nobody to tell
        return
    worker.log_event(NEGATIVE_INPUT_EVENT, {"min": low})


def negative_input_warning(client: Any, offset: float, since: float) -> str | None:
    """One warning line when chunks reported values below 0 since ``since`` (``time.time()``)."""
    if client is None:
        return None
    try:
        events = client.get_events(NEGATIVE_INPUT_EVENT)
    except Exception:  # a lost scheduler is reported elsewhere
        return None
    events = [(stamp, message) for stamp, message in events if stamp >= since - 1.0]
    if not events:
        return None
    low = min(float(message["min"]) for _, message in events)
    after = f" after subtracting offset={offset:g}" if offset else ""
    return (
        f"warning: the input has values below 0{after} (min {low:.4g}, in {len(events)} "
        f"chunk{'s' if len(events) != 1 else ''} with halo); Lucy-Richardson treated them as "
        "0: give the background level with offset=VALUE if they are not noise around a "
        "zero background"
    )


def _ssi_chunk(
    block: np.ndarray,
    model: Any,
    device: str = "cpu",
    margin: Sequence[int] | None = None,
    tta: int | None = None,
    outside: Sequence[tuple[int, int]] | None = None,
    block_info: dict | None = None,
) -> np.ndarray:
    """Per-chunk task: apply a trained SSI network to one padded block.

    The model object is a shared key of the graph: each worker receives it once and every task
    on that worker uses the same object (and the same copy of the weights on its device). The
    block is cut into tiles sized from the device's free memory and run in batches
    (:func:`ssi_dask.ssi.predict_chunk`); ``margin`` is the halo ``map_overlap`` added;
    ``tta`` the test-time transforms averaged. ``outside``: per axis, the voxels of the
    block past the volume's edges (found from ``block_info``, ``map_overlap``'s description of
    the block, when not given); a model trained with ``edges="background"`` sees its
    background level there instead of the mirrored volume.
    """
    from .ssi import predict_chunk  # noqa: PLC0415

    if outside is None and block_info is not None and margin is not None:
        where = block_info[None]
        outside = [
            (int(m) if i == 0 else 0, int(m) if i == n - 1 else 0)
            for m, i, n in zip(margin, where["chunk-location"], where["num-chunks"])
        ]
    torch_device = "cuda" if device == "gpu" else "cpu"
    return predict_chunk(
        model,
        block,
        margin,
        device=torch_device,
        tta=tta,
        progress=_tile_reporter(),
        outside=outside,
        interior_only=margin is not None,  # the caller crops the halo away
    )


#: Topic of the Dask worker events that report SSI tiles done within a chunk (the command
#: line shows them while chunks are few and each takes long).
SSI_TILES_EVENT = "ssi-dask-tiles"

#: Least seconds between two tile events of one chunk (the last one is always sent).
TILE_EVENT_INTERVAL = 1.0


def _tile_reporter() -> Any:
    """A ``progress(done, total)`` for one chunk's tiles that logs throttled worker events
    (:data:`SSI_TILES_EVENT`); None outside a distributed worker."""
    import time  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    try:
        from distributed import get_worker  # noqa: PLC0415

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    chunk, last = uuid.uuid4().hex[:12], [-math.inf]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if 0 < done < total and now - last[0] < TILE_EVENT_INTERVAL:
            return
        last[0] = now
        worker.log_event(SSI_TILES_EVENT, {"chunk": chunk, "done": done, "total": total})

    return report


def _shared_token(value: Any) -> str:
    """A content token for a shared object: the array's bytes, or the model's content hash."""
    if isinstance(value, np.ndarray):
        return dask.base.tokenize(value)
    if hasattr(value, "back_projector") and hasattr(value, "digest"):  # a PreparedPSF
        return dask.base.tokenize(value.digest, str(value.back_projector))
    from .ssi import model_hash  # noqa: PLC0415

    return model_hash(value)


def deconvolve(
    image: Any,
    psf: np.ndarray,
    method: str = "lr",
    *,
    num_iter: int | str | None = None,
    chunks: str | Sequence[int] | None = None,
    depth: int | Sequence[int] | None = None,
    target_voxels: int | None = None,
    device: str = "cpu",
    model: Any = None,
    **method_options: Any,
) -> da.Array:
    """Deconvolve an image chunk by chunk; returns a lazy Dask array (float32).

    Parameters
    ----------
    image : numpy.ndarray, dask.array.Array, zarr.Array, str or xarray.DataArray
        2D ``(y, x)`` or 3D ``(z, y, x)`` image, or a path to a Zarr array. A DataArray
        may have ``t``/``c`` dims before ``(z,) y, x``; every volume is deconvolved and a
        DataArray with the same dims, coords and attrs (plus ``attrs["ssi_dask"]``
        provenance) is returned (see :mod:`ssi_dask.xarray_support`).
    psf : numpy.ndarray
        Point spread function with as many dimensions as the image (normalised here).
    method : {"lr", "ssi"}
        ``"lr"``: Lucy-Richardson per chunk; ``"ssi"``: apply a trained SSI model per chunk.
    num_iter : int or "auto", optional
        Number of Lucy-Richardson iterations (default 10, ``ssi_dask.config.DEFAULT_NUM_ITER``;
        refused with ``method="ssi"``, like every other Lucy-Richardson option). ``"auto"``
        chooses it (and, with the
        Wiener-Butterworth back projector, its alpha unless ``wiener_alpha`` is given) with
        the self-supervised hold-out criterion of :func:`ssi_dask.lr_auto.choose_iterations`,
        computed now on a few sampled chunks (on the active Dask client, if any); the choice
        is attached to the result as ``result.auto_choice`` (an
        :class:`~ssi_dask.lr_auto.AutoChoice`; ``.as_dict()`` for provenance).
    chunks : str or sequence of int, optional
        Working chunk shape; by default grown from the store's chunks to an efficient size.
    depth : int or sequence of int, optional
        Halo per axis; by default derived from the PSF support and ``num_iter``.
    target_voxels : int, optional
        Size of the automatically chosen working chunks.
    device : {"cpu", "cuda"}
        Where each chunk is computed: NumPy/SciPy (or torch) on the CPU, or CuPy (or torch)
        on the worker's CUDA GPU (dask-cuda workers); the result is always returned in host
        memory. The same names as training's ``device`` (``"gpu"`` is accepted as an alias).
    model : SSIModel or path, optional
        For ``method="ssi"``: the trained model (see :func:`ssi_dask.ssi.train_ssi`) or the
        path of a checkpoint. The halo is the model's receptive-field radius rounded up to its
        pooling alignment, and working chunks are multiples of that alignment, so the chunked
        result equals a whole-image application.
    **method_options
        ``offset`` (LR, default 0): a background subtracted from every voxel before
        Lucy-Richardson; what is still negative then is treated as 0 (LR models Poisson
        counts; negative values would make it diverge to NaN). The result keeps the
        background-subtracted scale. The rest is passed to the per-chunk kernel (e.g.
        ``eps``, ``back_projector="wiener-butterworth"``, ``wiener_alpha`` for
        :func:`ssi_dask.lr.richardson_lucy`). With ``num_iter="auto"``,
        ``auto_options`` (a dict) is passed to :func:`~ssi_dask.lr_auto.choose_iterations`.

    Returns
    -------
    dask.array.Array
        The deconvolved image, float32, chunked like the working chunks; built with
        :func:`dask.array.map_overlap` with ``boundary="none"`` so that chunks at the volume's
        edge see the same boundary handling as a whole-volume run.
    """
    from .io import open_volume  # noqa: PLC0415
    from .psf import normalize_psf, validate_psf  # noqa: PLC0415
    from .xarray_support import deconvolve_dataarray, is_dataarray  # noqa: PLC0415

    # Every option is checked here, by name, before anything is opened or computed; options
    # of another method are refused rather than silently dropped.
    if method not in ("lr", "ssi"):
        raise ParameterError(f"unknown method {method!r}; choose 'lr' or 'ssi'")
    if method == "ssi":
        method_options = dict(method_options)
        tta = check_tta(method_options.pop("tta", None))
        refuse_lr_options("ssi", {"num_iter": num_iter, **method_options})
        if tta is not None:
            method_options["tta"] = tta
    else:
        settings = LRSettings.from_options(num_iter, **method_options)
        num_iter = settings.num_iter
        method_options = {**settings.kernel_options()}
        if settings.auto_options:
            method_options["auto_options"] = dict(settings.auto_options)
        if settings.offset:
            method_options["offset"] = settings.offset
    if is_dataarray(image):  # DataArray in, DataArray out (one volume per t, c)
        return deconvolve_dataarray(
            image, psf, method, deconvolve=deconvolve, resolve_model=_resolve_model,
            num_iter=num_iter, chunks=chunks, depth=depth,
            target_voxels=target_voxels, device=device, model=model, **method_options,
        )  # fmt: skip
    volume = open_volume(image)
    validate_psf(psf, volume.ndim)
    psf = normalize_psf(psf)
    # one device vocabulary with training (torch's names: "cpu", "cuda"); "gpu" is an alias
    if device not in ("cpu", "cuda", "gpu"):
        raise ParameterError(f"device must be 'cpu' or 'cuda', got {device!r}")
    device = "gpu" if device == "cuda" else device  # the chunk kernels' name for it
    if device == "gpu" and method == "lr":  # SSI needs torch's CUDA on the workers only
        from ._backend import cupy_or_none  # noqa: PLC0415

        if cupy_or_none() is None:
            raise DeviceError("device='cuda' needs CuPy and a CUDA device; use device='cpu'")
    if method == "ssi":
        model = _resolve_model(model, volume.ndim)
        method_options = {"tta": ssi_tta(method_options.get("tta"), volume.ndim)}
    method_options = dict(method_options)
    auto_options = method_options.pop("auto_options", None) or {}
    offset = check_offset(method_options.pop("offset", 0.0))
    if offset and method != "lr":
        raise ParameterError("offset applies to method 'lr' only")
    choice = None
    if method == "lr":

        def plan_for(count: int) -> BlockPlan:
            return plan_blocks(
                volume.shape,
                volume.data.dtype,
                psf.shape,
                num_iter=count,
                store_chunks=volume.store_chunks,
                chunks=chunks,
                depth=depth,
                target_voxels=target_voxels,
                boundary=METHOD_BOUNDARY["lr"],
                back_projector=method_options.get("back_projector", "classic"),
                psf=psf,
                back_projector_options=method_options,
            )

        user_chunks = chunks is not None and depth is None
        num_iter, choice = _lr_iterations(
            volume,
            psf,
            num_iter,
            method_options,
            auto_options,
            offset=offset,
            plan_for=plan_for if user_chunks else None,
        )
    plan = plan_blocks(
        volume.shape,
        volume.data.dtype,
        psf.shape,
        num_iter=num_iter if method == "lr" else 0,
        store_chunks=volume.store_chunks,
        chunks=chunks,
        depth=(model.halo,) * volume.ndim if method == "ssi" and depth is None else depth,
        edge_depth=(model.edge_halo,) * volume.ndim if method == "ssi" and depth is None else None,
        target_voxels=target_voxels,
        alignment=model.alignment if method == "ssi" else 1,
        boundary=METHOD_BOUNDARY[method],
        back_projector=method_options.get("back_projector", "classic"),
        psf=psf if method == "lr" else None,
        back_projector_options=method_options,
    )
    data = volume.chunked(plan.working_chunks)
    computation = computation_provenance(
        volume,
        psf,
        method=method,
        num_iter=num_iter,
        depth=plan.depth,
        working_chunks=plan.working_chunks,
        options=method_options,
        model=model if method == "ssi" else None,
        offset=offset,
    )
    result = _deconvolve_graph(
        data, psf, method, num_iter, plan, device, model, method_options, offset=offset
    )
    # What write_zarr fingerprints (resume) and what each chunk's record says it read.
    from .chunkfiles import input_reference  # noqa: PLC0415

    result.ssi_dask_provenance = computation
    result.ssi_dask_input = input_reference(volume, plan.depth)
    if choice is not None:
        result.auto_choice = choice
    return result


def computation_provenance(
    volume: Any,
    psf: np.ndarray,
    *,
    method: str,
    num_iter: int,
    depth: Sequence[int],
    working_chunks: Sequence[int],
    options: dict[str, Any],
    model: Any = None,
    offset: float = 0.0,
) -> dict[str, Any]:
    """Everything that determines the output of :func:`deconvolve`, as plain JSON values.

    :func:`ssi_dask.write_zarr` folds this into the output's fingerprint, so a resume with a
    different computation is refused. The input enters by its shape and dtype (its content is
    checked per chunk, see :mod:`ssi_dask.chunkfiles`), an in-memory NumPy input also by a
    token of its data; never by its path.

    Parameters
    ----------
    volume : ssi_dask.io.Volume
        The opened input.
    psf : numpy.ndarray
        The PSF (normalised here, as :func:`deconvolve` does).
    method : {"lr", "ssi"}
    num_iter : int
        Lucy-Richardson iterations (ignored for SSI).
    depth, working_chunks : sequence of int
        The plan's halo and working chunk shape.
    options : dict
        The LR kernel options (back projector and its parameters, ``eps``...).
    model : SSIModel, optional
        For SSI: the model, entered by :func:`ssi_dask.ssi.model_hash`.
    offset : float
        LR: the background subtracted before deconvolving.

    Returns
    -------
    dict
    """
    from .psf import describe_psf, normalize_psf  # noqa: PLC0415

    psf = normalize_psf(psf)
    input_array: dict[str, Any] = {
        "shape": [int(s) for s in volume.shape],
        "dtype": str(volume.data.dtype),
    }
    if volume.path is None:
        input_array["token"] = dask.base.tokenize(volume.data)
    computation: dict[str, Any] = {
        "method": method,
        "input_array": input_array,
        "psf_sha256": describe_psf(psf)["sha256"],
        "depth": [int(d) for d in depth],
        "working_chunks": [int(c) for c in working_chunks],
    }
    if method == "ssi":
        from .ssi import model_hash  # noqa: PLC0415

        computation["model_sha256"] = model_hash(model)
        computation["tta"] = ssi_tta(options.get("tta"), volume.ndim)
    else:
        from .lr import resolve_back_projector  # noqa: PLC0415

        bp_keys = ("back_projector", "wiener_alpha", "butterworth_order", "cutoff")
        computation["iterations"] = int(num_iter)
        computation["offset"] = float(offset)
        computation["back_projector"] = resolve_back_projector(
            psf, **{k: options[k] for k in bp_keys if k in options}
        ).as_dict()
        computation["options"] = json.loads(
            json.dumps(
                {k: v for k, v in sorted(options.items()) if k not in bp_keys},
                default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o),
            )
        )
    return computation


def _deconvolve_graph(
    data, psf, method, num_iter, plan, device, model, method_options, *, offset=0.0
):
    """The lazy per-chunk computation of :func:`deconvolve` (map_overlap)."""
    if method == "ssi":
        # The network needs context beyond the volume's edge too: mirror it there, exactly
        # as ssi_dask.ssi.predict pads a whole image, so chunked == whole everywhere.
        return apply_chunked(
            data,
            _ssi_chunk,
            depth=plan.depth,
            shared={"model": model},
            boundary=METHOD_BOUNDARY["ssi"],
            device=device,
            margin=tuple(plan.depth),
            tta=ssi_tta(method_options.get("tta"), data.ndim),
        )
    # The PSF is checked, normalised and paired with its back projector once, here; the
    # prepared object crosses the graph as one key and each chunk uses it as it is.
    from .lr import prepare_psf  # noqa: PLC0415

    bp_keys = ("back_projector", "wiener_alpha", "butterworth_order", "cutoff")
    prepared = prepare_psf(
        psf, data.ndim, **{k: method_options[k] for k in bp_keys if k in method_options}
    )
    kernel_options = {k: v for k, v in method_options.items() if k not in bp_keys}
    result = apply_chunked(
        data,
        _lr_chunk,
        depth=plan.depth,
        shared={"psf": prepared},
        num_iter=int(num_iter),
        options=kernel_options,
        device=device,
        offset=offset,
    )
    return result


def check_offset(offset: Any) -> float:
    """A background ``offset`` as a finite float (``ParameterError`` otherwise)."""
    try:
        value = float(offset)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(offset, bool) or not math.isfinite(value):
        raise ParameterError(f"offset must be a finite number, got {offset!r}")
    return value


def _lr_iterations(
    volume: Any,
    psf: np.ndarray,
    num_iter: Any,
    options: dict,
    auto_options: dict,
    *,
    offset: float = 0.0,
    plan_for: Any = None,
) -> tuple[int, Any]:
    """Validate the LR options; resolve ``num_iter="auto"`` (updating ``options``' alpha).

    ``plan_for(n)`` (with user-set chunks) limits the choice to counts whose halo fits.
    """
    from .lr import resolve_back_projector  # noqa: PLC0415

    bp_keys = ("back_projector", "wiener_alpha", "butterworth_order", "cutoff")
    bp_options = {k: options[k] for k in bp_keys if k in options}
    resolve_back_projector(psf, **bp_options)  # bad names or values fail here, not in a task
    if not (isinstance(num_iter, str) and num_iter == "auto"):
        if isinstance(num_iter, bool) or not isinstance(num_iter, (int, np.integer)):
            raise ParameterError(f"num_iter must be an integer >= 0 or 'auto', got {num_iter!r}")
        return int(num_iter), None
    from .lr_auto import choose_iterations_within  # noqa: PLC0415

    passed = {k: options[k] for k in ("edge_threshold", "eps") if k in options}
    choice = choose_iterations_within(
        volume.data, psf, plan_for=plan_for, offset=offset, **bp_options, **passed, **auto_options
    )
    if choice.wiener_alpha is not None:
        options["wiener_alpha"] = choice.wiener_alpha
    return choice.num_iter, choice


def _resolve_model(model: Any, ndim: int) -> Any:
    """The SSI model given as an object or a checkpoint path, checked against the image."""
    if model is None:
        raise ParameterError(
            "method 'ssi' needs a trained model: pass model= (train_ssi / load_checkpoint)"
        )
    if isinstance(model, (str, os.PathLike)):
        from .ssi import load_checkpoint  # noqa: PLC0415

        model = load_checkpoint(model)
    if model.ndim != ndim:
        from .errors import CheckpointError  # noqa: PLC0415

        raise CheckpointError(
            f"the model was trained on {model.ndim}D images but the input is {ndim}D; "
            "train a model on this kind of data"
        )
    return model


def apply_chunked(
    data: da.Array,
    chunk_function: Callable[..., np.ndarray],
    *,
    depth: Sequence[int],
    shared: dict[str, Any],
    boundary: str = "none",
    **kwargs: Any,
) -> da.Array:
    """``map_overlap`` a per-chunk function, sending each large shared object once.

    Objects in ``shared`` (the PSF, a model) become single keys of the graph, so the scheduler
    moves each to a worker once instead of embedding a copy in every task (DESIGN.md rule 6).
    The halo has already been checked against the chunks by :func:`plan_blocks`.
    """
    shared_keys = {
        name: dask.delayed(value, name=f"shared-{name}-{_shared_token(value)}", traverse=False)
        for name, value in shared.items()
    }
    # With boundary="none" an axis held in one chunk needs no halo: its edges stay as they are.
    depth_map = {
        axis: int(d) if len(data.chunks[axis]) > 1 or boundary != "none" else 0
        for axis, d in enumerate(depth)
    }
    return da.map_overlap(
        _as_float32(chunk_function),
        data,
        depth=depth_map,
        boundary=boundary,
        trim=True,
        dtype=np.float32,
        meta=np.empty((0,) * data.ndim, dtype=np.float32),
        **shared_keys,
        **kwargs,
    )


def _as_float32(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Wrap a per-chunk function so it receives float32 blocks (a picklable callable; a
    function with a ``block_info`` parameter receives ``map_overlap``'s block_info)."""
    if "block_info" in inspect.signature(function).parameters:
        return _Float32WithBlockInfo(function)
    return functools.partial(_call_on_float32, function)


class _Float32WithBlockInfo:
    """:func:`_call_on_float32` of a function that takes ``block_info`` (dask passes it to a
    callable whose signature names it)."""

    def __init__(self, function: Callable[..., np.ndarray]):
        self.function = function

    def __call__(self, block, *args, block_info=None, **kwargs):
        return _call_on_float32(self.function, block, *args, block_info=block_info, **kwargs)


def _call_on_float32(function, block, *args, **kwargs):
    block = block.astype(np.float32, copy=False)
    if not np.isfinite(block).all():  # one pass over the block: cheap next to the kernel
        from .errors import InputError  # noqa: PLC0415

        raise InputError(
            "the input contains NaN or Inf values; replace them (e.g. numpy.nan_to_num) "
            "before deconvolving"
        )
    return function(block, *args, **kwargs)


def plan_blocks(
    shape: Sequence[int],
    dtype: Any,
    psf_shape: Sequence[int],
    *,
    num_iter: int,
    store_chunks: Sequence[int] | None = None,
    chunks: str | Sequence[int] | None = None,
    output_chunks: str | Sequence[int] | None = None,
    depth: int | Sequence[int] | None = None,
    target_voxels: int | None = None,
    alignment: int = 1,
    boundary: str = "none",
    back_projector: str = "classic",
    psf: np.ndarray | Sequence[np.ndarray] | None = None,
    back_projector_options: dict | None = None,
    tasks_per_chunk: int | None = None,
    edge_depth: Sequence[int] | None = None,
) -> BlockPlan:
    """Choose working chunks, output chunks and halo for a volume; check write alignment.

    ``edge_depth`` (an SSI model with a Lucy-Richardson prior: :attr:`SSIModel.edge_halo`)
    is the smaller halo an axis held in one chunk needs with ``boundary="reflect"``: there
    the halo only mirrors the volume's edges.

    ``tasks_per_chunk`` (1 for a run from the store, :mod:`ssi_dask.storegraph`) gives the
    graph's task count without building the ``map_overlap`` stand-in that counts it otherwise
    (plus one shared task for the PSF or model).

    ``alignment`` (an SSI network's pooling grid) makes every working chunk a multiple of it.
    ``boundary`` is the ``map_overlap`` boundary: with ``"none"`` (LR) an axis held in one
    chunk needs no halo; with ``"reflect"`` (SSI) the volume's edges are mirrored by the halo.
    ``back_projector`` (LR) selects the default halo rule: without ``psf`` (the PSF itself, or
    one per channel) :func:`lr_default_depth`; with it, per axis the larger of that and
    :func:`lr_measured_depth` (``back_projector_options`` as for ``richardson_lucy``), which
    keeps the chunked result within 1e-3 of a whole-volume run for any chunk layout.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if depth is None:
        acceleration = (back_projector_options or {}).get("acceleration", "none")
        depth = lr_default_depth(psf_shape, num_iter, back_projector, acceleration)
        psfs = [] if psf is None else [psf] if isinstance(psf, np.ndarray) else list(psf)
        for one in psfs:
            measured = lr_measured_depth(
                one,
                num_iter,
                back_projector,
                back_projector_options=_projector_options(back_projector_options),
                image_shape=shape,
                acceleration=acceleration,
            )
            depth = tuple(max(d, m) for d, m in zip(depth, measured))
    elif isinstance(depth, int):
        depth = (depth,) * ndim
    depth = tuple(int(d) for d in depth)
    if len(depth) != ndim or any(d < 0 for d in depth):
        raise ParameterError(f"depth must be {ndim} non-negative integers, got {depth}")
    for axis, (p, s) in enumerate(zip(psf_shape, shape)):
        if p > s:
            raise ParameterError(
                f"the PSF ({p} along axis {axis}) is larger than the image ({s}); crop the PSF"
            )
    user_chunks = parse_chunks(chunks, ndim)
    if user_chunks is not None:
        working = tuple(min(c, s) for c, s in zip(user_chunks, shape))
        for axis, (c, s) in enumerate(zip(working, shape)):
            if c % alignment and c != s:
                raise ParameterError(
                    f"working chunk size {c} along axis {axis} is not a multiple of the model's "
                    f"alignment {alignment}; choose chunks= as multiples of {alignment}"
                )
    else:
        unit = tuple(math.lcm(int(u), alignment) for u in (store_chunks or (1,) * ndim))
        working = choose_working_chunks(
            shape, unit, target_voxels=target_voxels, min_size=depth, alignment=alignment
        )
    out_chunks = parse_chunks(output_chunks, ndim)
    if out_chunks is None:
        if store_chunks is not None and all(
            w % c == 0 or w == s for w, c, s in zip(working, store_chunks, shape)
        ):
            out_chunks = tuple(min(c, s) for c, s in zip(store_chunks, shape))
        elif store_chunks is not None:  # the store's chunks were cut: keep their thin axes
            out_chunks = output_chunks_after_cut(working, store_chunks)
        else:
            out_chunks = working
    full = chunk_grid(shape, working)
    check_write_alignment(full, out_chunks, shape)
    if edge_depth is not None:
        depth = tuple(
            min(d, int(e)) if len(sizes) == 1 else d for d, e, sizes in zip(depth, edge_depth, full)
        )
    for axis, (d, sizes) in enumerate(zip(depth, full)):
        if (len(sizes) > 1 or boundary != "none") and d > min(sizes):
            units = [
                math.lcm(int(u), alignment, *([int(o)] if output_chunks is not None else []))
                for u, o in zip(store_chunks or (1,) * ndim, out_chunks)
            ]
            fitting = _chunks_that_fit(shape, working, depth, units, boundary)
            raise ParameterError(
                f"halo {d} along axis {axis} exceeds the smallest working chunk {min(sizes)}; "
                f"use larger chunks= (e.g. chunks={tuple(int(c) for c in fitting)})"
            )
    n_chunks = math.prod(len(sizes) for sizes in full)
    effective_depth = tuple(
        d if len(sizes) > 1 or boundary != "none" else 0 for d, sizes in zip(depth, full)
    )
    return BlockPlan(
        shape=shape,
        input_dtype=str(np.dtype(dtype)),
        working_chunks=working,
        output_chunks=tuple(out_chunks),
        depth=effective_depth,
        n_chunks=n_chunks,
        n_tasks=(
            _count_tasks(shape, working, depth)
            if tasks_per_chunk is None
            else tasks_per_chunk * n_chunks + 1
        ),
        memory_per_task=estimate_lr_task_memory(working, effective_depth, psf_shape),
        output_bytes=4 * math.prod(shape),
        input_reads=input_chunk_reads(working, store_chunks, shape),
        input_chunks=None if store_chunks is None else tuple(int(c) for c in store_chunks),
    )


def _chunks_that_fit(
    shape: Sequence[int],
    working: Sequence[int],
    depth: Sequence[int],
    units: Sequence[int],
    boundary: str,
) -> tuple[int, ...]:
    """The working chunks grown, in whole ``units``, until every chunk holds the halo."""
    fitting = []
    for s, c, d, u in zip(shape, working, depth, units):
        size = int(c)
        while size < s:
            rest = s % size
            if size >= d and (rest == 0 or rest >= d):
                break
            size = min(s, (size // u + 1) * u)
        if boundary != "none" and size < d:  # mirrored edges need the halo even in one chunk
            size = s
        fitting.append(size)
    return tuple(fitting)


def _projector_options(options: dict | None) -> dict:
    """The Wiener-Butterworth parameters among ``richardson_lucy`` keyword arguments."""
    keys = ("wiener_alpha", "butterworth_order", "cutoff")
    return {k: options[k] for k in keys if (options or {}).get(k) is not None}


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The chunk sizes along each axis when ``shape`` is cut into ``chunks`` (last may be short)."""
    return tuple(tuple(_split(int(s), int(c))) for s, c in zip(shape, chunks))


def _split(size: int, chunk: int) -> list[int]:
    full, rest = divmod(size, chunk)
    return [chunk] * full + ([rest] if rest else [])


def _count_tasks(shape: Sequence[int], chunks: Sequence[int], depth: Sequence[int]) -> int:
    """Tasks Dask runs for the overlap graph, counted on a tiny stand-in with the same grid.

    The stand-in's creation tasks stand for the input reads; the per-chunk write that
    :func:`ssi_dask.write_zarr` maps over the result fuses with the kernel after Dask's graph
    optimisation, as does the trim of the halo.
    """
    grid = [len(_split(s, c)) for s, c in zip(shape, chunks)]
    stand_in = da.zeros(tuple(g * 4 for g in grid), chunks=(4,) * len(grid), dtype=np.float32)
    graph = da.map_overlap(
        np.negative,
        stand_in,
        depth={a: min(1, int(d)) for a, d in enumerate(depth)},
        boundary="none",
        dtype=np.float32,
    ).map_blocks(np.positive, dtype=np.float32)  # stands for the write
    (optimized,) = dask.optimize(graph)
    return len(optimized.__dask_graph__())
