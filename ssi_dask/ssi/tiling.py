"""Apply an SSI model to one chunk in device-sized tiles, several tiles per network call.

A chunk of a large volume (with its halo, as ``map_overlap`` hands it over) can be far larger
than what a GPU holds in activations. :func:`predict_chunk` cuts the chunk's interior into tiles
on the network's pooling grid, gives each tile the model's halo of context from the chunk
itself, runs tiles of the same shape together as one batch, and stitches the tile centres. The
tile size comes from the device's free memory (:func:`tile_budget`, :func:`choose_tile`), and
the result equals :func:`ssi_dask.ssi.predict_block` on the whole chunk (the halo covers the
receptive field and every tile starts on the pooling grid).

Pure per-chunk code: array in, array out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ParameterError
from .device import resolve_device
from .forward import _fast_size, lucy_richardson_prior, prior_network
from .predict import _denormalise, _normalise, _prepare, run_network, test_time_transforms

__all__ = [
    "bytes_per_voxel",
    "choose_tile",
    "chunk_task_bytes",
    "predict_chunk",
    "prior_bytes",
    "tile_budget",
]

#: Memory budget for one network call on the CPU (activations of a batch of tiles), per
#: dimensionality. Since issue 16's thirteenth session the estimate per voxel is the inference
#: copy's measured one (:func:`bytes_per_voxel`, half the old figure) and 3D tiles get 1 GiB
#: (512 MiB before): a 64x256x256 chunk of the 3D default network runs in 64x128x128 tiles
#: instead of 32x64x64 ones, 1.33x the voxels/s per core with the 3D default prior, 2.4x
#: without a prior. 2D keeps the tiles it had (256 MiB at half the estimate): larger 2D tiles
#: measured 0.85x (``benchmarks/ssi_tile_budget.py``, RESULTS.md).
CPU_BUDGET_BYTES = {2: 256 * 2**20, 3: 1024 * 2**20}
#: Share of the GPU's free memory a network call may use.
GPU_FREE_FRACTION = 0.5
#: Peak bytes of a Lucy-Richardson prior per voxel of its FFT domain (the block extended by
#: the PSF, at the FFT's size): the estimate, its edge weights and mask, the previous
#: iterate, one convolution's spectrum and output, the two cached transfer functions and
#: temporaries. Measured ~29 on a 64x256x256 chunk of the 3D benchmark at 30 accelerated
#: iterations (``benchmarks/ssi_tile_budget.py``: the whole call added 0.58-0.64 of
#: :func:`chunk_task_bytes` there, whose prior term counts the block's mirrored z ends too).
PRIOR_BYTES_PER_VOXEL = 32


def bytes_per_voxel(network, device="cpu") -> int:
    """Estimated peak activation bytes per input voxel of one inference call (float32).

    The peak is at the finest decoder level: the skip tensor, the up-sampled coarse tensor,
    their concatenation and two convolution outputs are alive together (``3 c0 + 2 c1``
    channels), plus the input and output copies. That many float32 values per voxel is the
    estimate on the CPU with the inference copy (:func:`~ssi_dask.ssi.inference.
    inference_network`, the default): a whole chunk call, block copies included, added
    0.4-0.7 of it at its peak on the default networks (``benchmarks/ssi_tile_budget.py``).
    Four times that elsewhere: the network as trained added 1.35-1.7x the doubled figure with
    16 transforms on the CPU, and on a GPU convolution workspaces and the allocator's slack are
    not measured.
    """
    from .predict import FAST_INFERENCE  # noqa: PLC0415

    cfg = network.config
    c0 = min(cfg["base_channels"], cfg["max_channels"])
    c1 = min(2 * cfg["base_channels"], cfg["max_channels"]) if cfg["levels"] > 1 else 0
    values = 4 * (3 * c0 + 2 * c1 + 4)
    measured = FAST_INFERENCE and resolve_device(device).type == "cpu"
    return values if measured else 4 * values


def prior_bytes(network, block_shape: Sequence[int]) -> int:
    """Peak bytes of the Lucy-Richardson prior of ``network`` on a block (0 without one)."""
    network = prior_network(network)
    if not getattr(network, "prior_iterations", 0):
        return 0
    psf_shape = network.prior_psf.shape
    domain = math.prod(_fast_size(int(s) + int(k) - 1) for s, k in zip(block_shape, psf_shape))
    return PRIOR_BYTES_PER_VOXEL * domain


def chunk_task_bytes(
    model,
    chunk_shape: Sequence[int],
    margins: Sequence[int],
    device="cpu",
    budget: int | None = None,
) -> int:
    """Bytes :func:`predict_chunk` holds at its peak for a chunk with its halo.

    ``chunk_shape`` is the chunk's output voxels and ``margins`` the halo on each side, as
    ``map_overlap`` hands the block over (``interior_only``). The block in, normalised and out,
    and the prior on it (four float32 values per voxel each), plus the larger of the prior's
    computation (:func:`prior_bytes`) and one network call's activations (the chunk and the
    network's halo at :func:`bytes_per_voxel`, at most ``budget``, by default
    :func:`tile_budget`).
    """
    network = getattr(model, "network", model)
    padded = [int(c) + 2 * int(m) for c, m in zip(chunk_shape, margins)]
    edge_halo = int(network.edge_halo)
    tiled = math.prod(int(c) + 2 * edge_halo for c in chunk_shape)
    if budget is None:
        budget = tile_budget(device, ndim=len(chunk_shape))
    tiles = min(int(budget), tiled * bytes_per_voxel(network, device))
    return 16 * math.prod(padded) + max(tiles, prior_bytes(network, padded))


def tile_budget(device, fraction: float = GPU_FREE_FRACTION, ndim: int = 3) -> int:
    """Bytes one network call may use: a share of the free GPU memory, or the CPU budget of
    :data:`CPU_BUDGET_BYTES` for ``ndim`` dimensions."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * fraction)
    return CPU_BUDGET_BYTES[3 if int(ndim) >= 3 else 2]


def choose_tile(
    interior: Sequence[int], halo: int, alignment: int, budget: int, per_voxel: int
) -> tuple[int, ...]:
    """Largest tile (kept part, multiples of ``alignment``) whose input fits in ``budget``.

    Starts from the whole interior (rounded up to the alignment) and halves the longest side
    until ``prod(tile + 2 * halo) * per_voxel <= budget`` or every side is one alignment step.
    """
    a = int(alignment)
    tile = [max(-(-int(s) // a) * a, a) for s in interior]
    while math.prod(t + 2 * halo for t in tile) * per_voxel > budget:
        axis = max(range(len(tile)), key=lambda i: (tile[i], -i))
        if tile[axis] <= a:
            break
        tile[axis] = max(-(-(tile[axis] // 2) // a) * a, a)
    return tuple(tile)


def _axis_tiles(size: int, margin: int, tile: int, halo: int, a: int, interior_only: bool = False):
    """Per axis: (output start, output end, input start, input end) of each tile; with
    ``interior_only`` the tiles' outputs cover the block without its ``margin`` at each end."""
    interior = max(size - 2 * margin, 1)
    count = -(-interior // tile)
    cuts = [0] + [margin + k * tile for k in range(1, count)] + [size]
    if interior_only and size > 2 * margin:
        cuts[0], cuts[-1] = margin, size - margin
    spans = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        start = max(0, (lo - halo) // a * a)
        stop = min(size, start + -(-(hi + halo - start) // a) * a)
        spans.append((lo, hi, start, stop))
    return spans


def predict_chunk(
    model,
    block,
    margin: int | Sequence[int] | None = None,
    *,
    device="auto",
    tile_shape: int | Sequence[int] | None = None,
    budget: int | None = None,
    amp: bool = False,
    tta: int | bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    outside: Sequence[tuple[int, int]] | None = None,
    interior_only: bool = False,
) -> np.ndarray:
    """Apply ``model`` to one chunk with its halo, in batched tiles; same shape out.

    Parameters
    ----------
    model : SSIModel
        The trained model; its stored (global) normalisation is used for every chunk.
    block : numpy.ndarray
        The chunk with ``margin`` voxels of context on each side (``map_overlap``'s block).
    margin : int or sequence of int, optional
        The halo ``map_overlap`` added around the chunk (default ``model.halo``).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    tile_shape : int or sequence of int, optional
        Kept part of each tile; default from the memory budget (:func:`choose_tile`).
    budget : int, optional
        Bytes per network call (default :func:`tile_budget` of the device).
    amp, tta :
        As in :func:`ssi_dask.ssi.predict_block`.
    progress : callable, optional
        Called as ``progress(tiles_done, tiles_total)`` after each batch of tiles.
    outside : sequence of (int, int), optional
        Per axis, how many voxels at the block's start and end lie past the volume's edges
        (a chunk at the edge, whose halo there was mirrored). For a model trained with
        ``edges="background"`` they are set to its background level, as
        :func:`~ssi_dask.ssi.predict` pads the whole volume; otherwise they are left as given.
    interior_only : bool
        Run the network for the chunk only, not for its halo (``margin`` at each end), whose
        output is then 0: for callers that crop the halo away (``map_overlap``'s trim, the
        one-task-per-chunk graph). The halo is still the network's and the prior's context.

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``block``; equal to ``predict_block(model, block)`` (inside the
        halo, with ``interior_only``).
    """
    block = np.asarray(block)
    if block.ndim != model.ndim:
        raise ParameterError(f"the model is {model.ndim}D but the block has shape {block.shape}")
    net, dev = _prepare(model, device)
    a, halo = model.alignment, model.halo
    # the tiles need the network's halo only: a Lucy-Richardson prior (whose margin model.halo
    # includes, for the block's context) is computed below once on the whole block
    tile_halo = model.edge_halo
    ndim = block.ndim
    margins = (
        (halo,) * ndim
        if margin is None
        else ((int(margin),) * ndim if np.isscalar(margin) else tuple(int(m) for m in margin))
    )
    interior = [max(s - 2 * m, 1) for s, m in zip(block.shape, margins)]
    per_voxel = bytes_per_voxel(net, dev)
    budget = int(budget if budget is not None else tile_budget(dev, ndim=block.ndim))
    if tile_shape is None:
        tile = choose_tile(interior, tile_halo, a, budget, per_voxel)
    else:
        tile = (int(tile_shape),) * ndim if np.isscalar(tile_shape) else tuple(tile_shape)
        if len(tile) != ndim or min(tile) < 1:
            raise ParameterError(f"tile_shape {tile_shape} does not fit a {ndim}D block")
        tile = tuple(-(-int(t) // a) * a for t in tile)
    x = _normalise(model, block)
    if outside is not None:
        pairs = [tuple(int(v) for v in pair) for pair in outside]
        if len(pairs) != ndim or any(
            len(p) != 2 or min(p) < 0 or sum(p) > s for p, s in zip(pairs, block.shape)
        ):
            raise ParameterError(
                f"outside must give (before, after) >= 0 voxels per axis of the {ndim}D block "
                f"{block.shape}, got {outside!r}"
            )
        prior = block_prior(net, x, pairs, model.edge_fill is not None, dev)
        if model.edge_fill is not None:
            x = fill_outside(x, pairs, 0.0)  # the background level, normalised
    else:
        prior = block_prior(net, x, None, False, dev)
    axes = [
        _axis_tiles(s, m, t, tile_halo, a, interior_only)
        for s, m, t in zip(block.shape, margins, tile)
    ]
    groups: dict[tuple[int, ...], list] = {}
    for spans in itertools.product(*axes):
        in_shape = tuple(stop - start for _, _, start, stop in spans)
        groups.setdefault(in_shape, []).append(spans)
    out = (np.zeros if interior_only else np.empty)(block.shape, dtype=np.float32)
    transforms = test_time_transforms(model, tta)
    n_tiles, tiles_done = sum(len(m) for m in groups.values()), 0
    if progress is not None:
        progress(0, n_tiles)
    for in_shape, members in groups.items():
        per_call = max(1, budget // max(math.prod(in_shape) * per_voxel, 1))
        for i in range(0, len(members), per_call):
            batch = members[i : i + per_call]
            inputs = np.stack(
                [x[tuple(slice(start, stop) for _, _, start, stop in spans)] for spans in batch]
            )
            priors = None
            if prior is not None:
                priors = np.stack(
                    [
                        prior[tuple(slice(start, stop) for _, _, start, stop in spans)]
                        for spans in batch
                    ]
                )
            results = run_network(net, inputs, dev, amp, transforms, priors)
            for spans, res in zip(batch, results):
                dst = tuple(slice(lo, hi) for lo, hi, _, _ in spans)
                src = tuple(slice(lo - start, hi - start) for lo, hi, start, _ in spans)
                out[dst] = res[src]
            tiles_done += len(batch)
            if progress is not None:
                progress(tiles_done, n_tiles)
    return _denormalise(model, out)


def block_prior(
    net, x: np.ndarray, outside: Sequence[tuple[int, int]] | None, background: bool, dev
) -> np.ndarray | None:
    """The Lucy-Richardson prior of a normalised block (None for a network without one).

    It is computed on the part of the block inside the volume (``outside``: per axis, the
    voxels at each end past the volume's edges), whose edges Lucy-Richardson treats as unknown
    object, and padded back like the volume: with the prior's background level (its zero,
    ``background``) or mirrored, as :func:`~ssi_dask.ssi.predict` pads the whole image.
    """
    if not getattr(net, "prior_iterations", 0):
        return None
    pairs = [(0, 0)] * x.ndim if outside is None else [(int(b), int(a)) for b, a in outside]
    inner = x[tuple(slice(b, s - a) for (b, a), s in zip(pairs, x.shape))]
    if min(inner.shape) < 1:
        inner, pairs = x, [(0, 0)] * x.ndim
    batch = torch.from_numpy(np.ascontiguousarray(inner, dtype=np.float32))[None, None]
    prior = lucy_richardson_prior(net, batch.to(dev))[0, 0].cpu().numpy()
    if not any(b or a for b, a in pairs):
        return prior
    if background:
        level = np.float32(getattr(net, "prior_background", 0.0))  # the prior's zero level
        return np.pad(prior, pairs, mode="constant", constant_values=level)
    mode = "symmetric" if all(s >= max(p) for s, p in zip(prior.shape, pairs)) else "edge"
    return np.pad(prior, pairs, mode=mode)


def fill_outside(x: np.ndarray, outside: Sequence[tuple[int, int]], value: float) -> np.ndarray:
    """A copy of ``x`` with ``outside[axis] = (before, after)`` voxels at each end set to
    ``value``."""
    if not any(b or a for b, a in outside):
        return x
    x = np.array(x, copy=True)
    for axis, (before, after) in enumerate(outside):
        index = [slice(None)] * x.ndim
        if before:
            index[axis] = slice(0, int(before))
            x[tuple(index)] = value
        if after:
            index[axis] = slice(x.shape[axis] - int(after), None)
            x[tuple(index)] = value
    return x
