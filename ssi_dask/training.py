"""Train SSI on a volume larger than memory: sample regions through Dask, train on one device.

Orchestration only (the training itself is :func:`ssi_dask.ssi.train_ssi`):

1. draw candidate regions uniformly over the whole volume and read *only those* through Dask
   (a distributed client's workers when one is given, else Dask's local threads): the slices
   are cut from the lazy array before anything is computed, so the graph keeps only the chunks
   they touch;
2. compute the global normalisation statistics from all candidates (background included), so
   every chunk is later normalised with the same numbers;
3. reject candidates from empty background by an intensity criterion (a region whose 99th
   percentile stays within ``background`` of the dynamic range above the low percentile);
4. train on the kept regions on one device: the client's CPU or GPU, or (``on_worker=True``)
   a worker of the cluster, e.g. a ``dask cuda worker``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .config import DEFAULT_REGIONS
from .errors import ParameterError
from .ssi.regions import RegionPool, background_scores

__all__ = ["sample_regions", "train"]

#: Side of a training region in patches (the number of regions: config.DEFAULT_REGIONS).
REGION_PATCHES = 2


def _region_shape(shape: Sequence[int], region_shape, patch_size: int | None) -> tuple[int, ...]:
    from .ssi import DEFAULTS  # noqa: PLC0415

    ndim = len(shape)
    if region_shape is None:
        side = REGION_PATCHES * int(patch_size or DEFAULTS[ndim]["patch_size"])
        region_shape = (side,) * ndim
    elif np.isscalar(region_shape):
        region_shape = (int(region_shape),) * ndim
    region_shape = tuple(int(r) for r in region_shape)
    if len(region_shape) != ndim or min(region_shape) < 1:
        raise ParameterError(
            f"region_shape {region_shape} does not fit a {ndim}D volume; give {ndim} positive sizes"
        )
    return tuple(min(r, s) for r, s in zip(region_shape, shape))


def sample_regions(
    volume: Any,
    region_shape: int | Sequence[int] | None = None,
    n_regions: int = DEFAULT_REGIONS,
    *,
    candidates: int | None = None,
    background: float = 0.05,
    percentiles: tuple[float, float] = (0.1, 99.9),
    seed: int = 0,
    client: Any = None,
    patch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RegionPool:
    """Read random regions of a (large) volume through Dask and keep those with signal.

    Parameters
    ----------
    volume : numpy.ndarray, dask.array.Array, zarr.Array or str
        2D or 3D image, or the path of a Zarr array / TIFF (see :func:`ssi_dask.open_volume`).
    region_shape : int or sequence of int, optional
        Size of each region (default: twice the SSI training patch per axis), clipped to the
        volume.
    n_regions : int
        Regions to keep for training.
    candidates : int, optional
        Regions read before background rejection (default ``2 * n_regions``, or
        ``n_regions`` when ``background`` is 0).
    background : float
        Intensity criterion: a candidate is rejected as background when its 99th percentile is
        below ``lo + background * (hi - lo)``, with ``lo, hi`` the global ``percentiles``.
        0 keeps every candidate.
    percentiles : (float, float)
        Percentiles of all candidates' voxels that give the global normalisation.
    seed : int
        Seed of the region positions.
    client : distributed.Client, optional
        Read the regions on this cluster's workers (they must see the volume's path).
    patch_size : int, optional
        The training patch side, for the default region shape.
    progress : callable, optional
        Called as ``progress(done, total)`` each time a region has been read.

    Returns
    -------
    RegionPool
        The kept regions with their global origins; ``pool.info`` records the sampling.
    """
    from .io import open_volume  # noqa: PLC0415

    vol = open_volume(volume)
    data = vol.data
    shape = tuple(int(s) for s in vol.shape)
    region = _region_shape(shape, region_shape, patch_size)
    n_regions = int(n_regions)
    n_candidates = int(candidates or (2 * n_regions if background > 0 else n_regions))
    if n_regions < 1 or n_candidates < n_regions:
        raise ParameterError(
            f"need n_regions >= 1 and candidates >= n_regions, got {n_regions} and {n_candidates}"
        )
    if not 0 <= background < 1:
        raise ParameterError(f"background must be in [0, 1), got {background}")
    if region == shape:  # one region is the whole volume: read it once
        n_regions = n_candidates = 1
    rng = np.random.default_rng(seed)
    highs = [s - r + 1 for s, r in zip(shape, region)]
    origins = np.stack([rng.integers(0, h, size=n_candidates) for h in highs], axis=1)
    lazy = [data[tuple(slice(int(o), int(o) + r) for o, r in zip(org, region))] for org in origins]
    started = time.perf_counter()
    reads = _read_regions(lazy, client, progress)
    read_s = time.perf_counter() - started
    values = np.concatenate([r.ravel() for r in reads])
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ParameterError("the sampled regions have no finite values; check the input")
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    scores = background_scores(reads)
    threshold = lo + background * (hi - lo)
    if background > 0:
        keep = [i for i in range(n_candidates) if scores[i] >= threshold]
    else:
        keep = list(range(n_candidates))
    rejected = n_candidates - len(keep)
    if not keep:  # everything looks like background: train on the brightest candidates
        keep = [int(i) for i in np.argsort(scores)[::-1]]
    keep = keep[:n_regions]
    info = {
        "volume_shape": list(shape),
        "region_shape": list(region),
        "candidates": n_candidates,
        "kept": len(keep),
        "rejected_as_background": rejected,
        "background": background,
        "background_threshold": threshold,
        "statistics_percentiles": list(percentiles),
        "statistics": [lo, hi],
        "sampled_fraction": float(n_candidates * math.prod(region) / math.prod(shape)),
        "origins": [[int(v) for v in origins[i]] for i in keep],
        "read_seconds": read_s,
        "seed": seed,
    }
    return RegionPool(
        [reads[i] for i in keep],
        [origins[i] for i in keep],
        shape,
        statistics_values=values,
        info=info,
    )


def _read_regions(
    lazy: list, client: Any, progress: Callable[[int, int], None] | None
) -> list[np.ndarray]:
    """Compute the lazy regions (on the client's workers, else local threads), in order,
    calling ``progress(done, total)`` as each one arrives."""
    total = len(lazy)
    if progress is not None:
        progress(0, total)
    if client is not None:
        from distributed import as_completed  # noqa: PLC0415

        futures = client.compute(lazy)
        for done, _ in enumerate(as_completed(futures), 1):
            if progress is not None:
                progress(done, total)
        reads = client.gather(futures)
    else:
        import os  # noqa: PLC0415
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        from concurrent.futures import as_completed as completed  # noqa: PLC0415

        def read(region: Any) -> np.ndarray:
            if hasattr(region, "compute"):
                region = region.compute(scheduler="synchronous")
            return np.asarray(region)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, total)) as pool:
            futures = [pool.submit(read, region) for region in lazy]
            for done, _ in enumerate(completed(futures), 1):
                if progress is not None:
                    progress(done, total)
            reads = [future.result() for future in futures]
    return [np.asarray(r, dtype=np.float32) for r in reads]


def _train_on_pool(pool: RegionPool, psf: np.ndarray, options: dict) -> Any:
    """Worker-side entry point of ``train(on_worker=True)``."""
    from .ssi import train_ssi  # noqa: PLC0415

    return train_ssi(pool, psf, **options)


def train(
    volume: Any,
    psf: Any,
    *,
    seed: int = 0,
    device: str = "auto",
    n_regions: int = DEFAULT_REGIONS,
    region_shape: int | Sequence[int] | None = None,
    candidates: int | None = None,
    background: float = 0.05,
    client: Any = None,
    on_worker: bool = False,
    progress: bool = False,
    **train_options: Any,
) -> Any:
    """Train an SSI model on a volume of any size; returns an :class:`~ssi_dask.ssi.SSIModel`.

    Regions are sampled across the whole volume through Dask (:func:`sample_regions`; only
    those regions are read), the global normalisation statistics come from those samples, and
    the network is trained on the kept regions on one device. The model's ``normalisation``
    holds the statistics and ``training["sampling"]`` how the regions were drawn; both are
    stored by :func:`ssi_dask.ssi.save_checkpoint`.

    Parameters
    ----------
    volume : numpy.ndarray, dask.array.Array, zarr.Array or str
        2D or 3D image or the path of a Zarr array / TIFF.
    psf : array-like
        PSF with the volume's dimensionality.
    seed : int
        Seed of the region positions and of training.
    device : str
        Training device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` (on the worker with
        ``on_worker=True``, where ``"cuda"`` is that worker's GPU).
    n_regions, region_shape, candidates, background :
        See :func:`sample_regions`.
    client : distributed.Client, optional
        Cluster that reads the regions (and trains, with ``on_worker``).
    on_worker : bool
        Train on a worker of ``client`` (e.g. a GPU worker) instead of in this process.
    progress : bool
        Print training progress (in this process only).
    **train_options
        Passed to :func:`ssi_dask.ssi.train_ssi` (``steps``, ``patch_size``, ``depth``,
        ``restarts``, ``patience``, ...).

    Returns
    -------
    SSIModel
    """
    from .psf import normalize_psf  # noqa: PLC0415

    if on_worker and client is None:
        raise ParameterError("on_worker=True needs a client (a Dask cluster to train on)")
    psf = normalize_psf(np.asarray(psf, dtype=np.float32))
    from .ssi import train_ssi  # noqa: PLC0415

    default = inspect.signature(train_ssi).parameters["norm_percentiles"].default
    percentiles = tuple(train_options.get("norm_percentiles", default))
    reading = None
    if progress:
        from .summary import StageProgress  # noqa: PLC0415

        where = "on the cluster's workers" if client is not None else "with local threads"
        reading = StageProgress(f"sampling training regions ({where})", 0, "regions")

        def show(done: int, total: int) -> None:
            reading.total = total
            reading.update(done)

    pool = sample_regions(
        volume,
        region_shape,
        n_regions,
        candidates=candidates,
        background=background,
        percentiles=percentiles,
        seed=seed,
        client=client,
        patch_size=train_options.get("patch_size"),
        progress=show if reading is not None else None,
    )
    if psf.ndim != pool.ndim:
        raise ParameterError(
            f"the PSF has {psf.ndim} dimensions but the volume has {pool.ndim}; "
            f"give a {pool.ndim}D PSF"
        )
    options = dict(train_options, seed=seed, device=device)
    started = time.perf_counter()
    if on_worker:
        future = client.submit(_train_on_pool, pool, psf, options, pure=False)
        model = future.result()
    else:
        model = _train_on_pool(pool, psf, dict(options, progress=progress))
    model.training["sampling"] = dict(pool.info, trained_on="worker" if on_worker else "client")
    model.training["train_seconds"] = time.perf_counter() - started
    return model
