"""The whole run, written once: image -> PSFs -> model -> plan -> iterations -> graph -> write
-> pyramid -> report.

:func:`run` takes a :class:`~ssi_dask.config.Job` (typed, validated settings) and is the one
path for plain Zarr arrays, TIFF files and OME-Zarr images (time points, channels, pyramid,
NGFF metadata), from the command line and from notebooks alike: ``ssi-dask run`` only turns
its flags into a job, calls :func:`run` and prints. Every stage prints one line of what it
does through ``echo`` (``print`` by default, ``None`` for silence).

A run from an on-disk Zarr array gives each working chunk one task that reads its halo from
the store and writes its own output chunks, submitted in waves (:mod:`ssi_dask.storegraph`);
TIFF, DataArray and in-memory inputs use :func:`ssi_dask.deconvolve`'s ``map_overlap`` graph.

An image with time or channel axes is processed one 2D/3D volume at a time with one plan for
all of them (every volume has the same shape); each task still covers one spatial working
chunk of one volume.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import ClusterSettings, Job, LRSettings, PSFSettings, TrainSettings, ssi_tta
from .errors import CheckpointError, DeviceError, InputError, ParameterError, PSFError

Echo = Callable[[str], None] | None


@dataclass
class RunReport:
    """What a run did.

    Attributes
    ----------
    output : pathlib.Path
        The output (an OME-Zarr group or a Zarr array).
    method : str
    shape : tuple of int
        The output's full shape (leading time/channel axes included).
    volumes : int
        2D/3D volumes deconvolved.
    chunks : int
        Working chunks (tasks) of the whole output.
    levels : int
        Resolution levels written (1 for a plain Zarr array).
    seconds : float
        Wall time from the start of the cluster to the end of the write.
    plan : ssi_dask.blockwise.BlockPlan
        The plan every volume was cut with.
    provenance : dict
        What was written under ``ssi_dask`` in the output's attributes.
    dry_run : bool
        True when nothing was computed or written.
    warnings : list of str
        Warning lines for the user (missing input chunks, negative input values).
    write_seconds, written_voxels : float, optional
        The chunk write as the progress bar measured it (its rate is the summary's).
    """

    output: Path
    method: str
    shape: tuple[int, ...]
    volumes: int
    chunks: int
    levels: int
    seconds: float
    plan: Any
    provenance: dict
    dry_run: bool = False
    ome_zarr: bool = False
    warnings: list[str] = field(default_factory=list)
    output_dtype: str = "float32"
    clipped: int = 0
    skipped: int = 0
    skipped_unread: int = 0
    write_seconds: float | None = None
    written_voxels: float | None = None

    def summary(self) -> str:
        """The one-screen summary the command line prints at the end."""
        from .summary import run_summary  # noqa: PLC0415

        if self.dry_run:
            return "dry run: nothing computed or written"
        text = run_summary(
            output=str(self.output),
            shape=self.shape,
            seconds=self.seconds,
            method=self.method,
            chunks=self.chunks,
            ome_zarr=self.ome_zarr,
            levels=self.levels,
            volumes=self.volumes,
            write_seconds=self.write_seconds,
            written_voxels=self.written_voxels,
        )
        extra = []
        if self.output_dtype != "float32":
            extra.append(
                f"  stored as   {self.output_dtype}, {self.clipped} values clipped to its range"
            )
        if "skip_background" in self.provenance:
            line = f"  background  {self.skipped} of {self.chunks} chunks written without computing"
            if "skip_background_level" in self.provenance:
                line += f" ({self.skipped_unread} of them without reading their input)"
            extra.append(line)
        if not extra:
            return text
        lines = text.splitlines()
        return "\n".join([*lines[:-1], *extra, lines[-1]])


def _say(echo: Echo, text: str) -> None:
    if echo is not None:
        echo(text)


# ---------------------------------------------------------------------------------------------
# Stages


def open_image(source: Any, *, level: int = 0, voxel_size: Sequence[float] | None = None):
    """The input as an :class:`~ssi_dask.ome.OmeImage`: an OME-Zarr level, or a plain Zarr
    array / TIFF seen as a one-level image with axes ``(z)yx``."""
    from .ome import is_ome_zarr, open_ome_zarr, plain_image  # noqa: PLC0415
    from .xarray_support import dataarray_image, is_dataarray  # noqa: PLC0415

    if is_dataarray(source):
        if level:
            raise InputError("level= applies to OME-Zarr image groups; the input is a DataArray")
        return dataarray_image(source, voxel_size)
    if isinstance(source, (str, Path)) and is_ome_zarr(source):
        return open_ome_zarr(source, level=level)
    if level:
        raise InputError(
            f"level= applies to OME-Zarr image groups; {str(source)!r} is a plain array"
        )
    return plain_image(source, voxel_size)


def resolve_psfs(
    settings: PSFSettings,
    ndim: int,
    voxel_size: Sequence[float] | None,
    n_channels: int = 1,
    image_shape: Sequence[int] | None = None,
) -> tuple[list[np.ndarray], list[dict]]:
    """The PSFs of a run, one per channel (or one for all), and their provenance.

    From files (one, or one per channel; a file that declares its voxel size must match the
    image's), or computed as a widefield PSF from the optics at the image's voxel size.
    """
    from .ome import check_psf_voxel_size, default_psf_shape  # noqa: PLC0415
    from .psf import crop_psf, describe_psf, load_psf, normalize_psf, widefield_psf  # noqa: PLC0415

    if settings.files:
        files = list(settings.files)
        if len(files) not in (1, n_channels):
            raise PSFError(
                f"psf= names {len(files)} files for {n_channels} channels; give one PSF for "
                "all channels or one per channel, separated by commas"
            )
        psfs, info = [], []
        for file in files:
            psf = load_psf(file, ndim)
            declared = check_psf_voxel_size(file, voxel_size)
            psfs.append(psf)
            entry = {**describe_psf(psf), "source": str(Path(file).resolve())}
            if declared is not None:
                entry["voxel_size_um"] = list(declared)
            info.append(entry)
        return psfs, info
    if settings.na is None or not settings.wavelength:
        raise PSFError(
            "give psf=FILE, or na= and wavelength= to compute a widefield PSF from the "
            "image's voxel size"
        )
    if voxel_size is None:
        raise PSFError(
            "the image declares no voxel size (no OME-Zarr metadata or no units); give "
            "voxel_size=" + ("(DZ, DY, DX)" if ndim == 3 else "(DY, DX)") + " to compute the PSF"
        )
    wavelengths = tuple(settings.wavelength)
    check_optics(settings.na, wavelengths, settings.refractive_index)
    if len(wavelengths) not in (1, n_channels):
        raise PSFError(
            f"wavelength= gives {len(wavelengths)} values for {n_channels} channels; give one "
            "or one per channel"
        )
    if voxel_size[-1] != voxel_size[-2]:
        raise PSFError(
            f"the image's lateral voxel sizes differ {tuple(voxel_size[-2:])}; a widefield PSF "
            "needs square pixels: give psf=FILE"
        )
    psfs, info = [], []
    for wavelength in wavelengths:
        if settings.shape:
            shape = tuple(int(v) for v in settings.shape)
        else:
            shape = default_psf_shape(
                voxel_size, settings.na, wavelength, settings.refractive_index
            )
            if image_shape is not None:  # odd, and no larger than the image
                shape = tuple(min(s, n - 1 + n % 2) for s, n in zip(shape, image_shape))
                shape = (*shape[:-2], min(shape[-2:]), min(shape[-2:]))
        psf = widefield_psf(
            shape,
            voxel_size,
            na=settings.na,
            wavelength=wavelength,
            refractive_index=settings.refractive_index,
        )
        psf = normalize_psf(crop_psf(psf))
        psfs.append(psf)
        info.append(
            {
                **describe_psf(psf),
                "source": "computed (widefield, Gibson-Lanni via psfmodels)",
                "na": settings.na,
                "wavelength_um": wavelength,
                "refractive_index": settings.refractive_index,
                "voxel_size_um": [float(v) for v in voxel_size],
            }
        )
    return psfs, info


def data_warnings(
    volume: Any, psf: np.ndarray, *, ome_out: bool, voxel_size: Sequence[float] | None
) -> list[str]:
    """Warnings about the data before the run: a PSF wider than the data's measured
    resolution (:mod:`ssi_dask.resolution`), and an OME-Zarr output without voxel sizes."""
    from .resolution import check_resolution, sample_planes  # noqa: PLC0415

    lines = []
    try:  # a check, never a reason to fail the run
        line = check_resolution(sample_planes(volume), psf).warning()
    except Exception:  # noqa: BLE001
        line = None
    if line:
        lines.append(line)
    if ome_out and not voxel_size:
        lines.append(
            "warning: the input declares no voxel size, so the OME-Zarr output gets scale 1 "
            "without units: give voxel_size="
            + ("(DZ, DY, DX)" if volume.ndim == 3 else "(DY, DX)")
            + " in micrometres"
        )
    return lines


def check_optics(na: float, wavelengths: Sequence[float], refractive_index: float) -> None:
    """Refuse optics no PSF can be computed from (before any division by them)."""
    if not (math.isfinite(refractive_index) and refractive_index > 0):
        raise PSFError(f"refractive_index must be a positive number, got {refractive_index}")
    if not (math.isfinite(na) and 0 < na < refractive_index):
        raise PSFError(
            f"na= must be above 0 and below the refractive index {refractive_index:g}, got {na}"
        )
    if not all(math.isfinite(w) and w > 0 for w in wavelengths):
        raise PSFError(
            "wavelength= must be positive micrometres (e.g. 0.52), got "
            + ",".join(f"{w:g}" for w in wavelengths)
        )


def train_model(
    volume: Any,
    psf: np.ndarray,
    settings: TrainSettings,
    *,
    client: Any = None,
    gpu: bool = False,
    echo: Echo = print,
):
    """Train SSI on regions sampled from an opened volume; returns the model."""
    from .blockwise import parse_chunks  # noqa: PLC0415
    from .training import train  # noqa: PLC0415

    device = settings.device
    if gpu and device == "auto":
        device = "cuda"
    if device.startswith("cuda") and not settings.on_worker:
        from .errors import SsiDaskError  # noqa: PLC0415
        from .ssi import resolve_device  # noqa: PLC0415

        try:
            resolve_device(device)
        except SsiDaskError:
            raise DeviceError(
                "train.device='cuda' needs a CUDA GPU visible to torch on this machine; "
                "use train.device='cpu', or train on a GPU worker (on_worker=True)"
            ) from None
    where = "a worker" if settings.on_worker else f"this process ({device})"
    _say(echo, f"training SSI on {volume.path} {volume.shape} (seed {settings.seed}) in {where}")
    started = time.perf_counter()
    model = train(
        volume.data,
        psf,
        seed=settings.seed,
        device=device,
        n_regions=settings.regions,
        region_shape=parse_chunks(settings.region_size, volume.ndim),
        background=settings.background,
        client=client,
        on_worker=settings.on_worker,
        progress=echo is not None,
        recipe=settings.recipe(),
    )
    info = model.training["sampling"]
    _say(
        echo,
        f"sampled {info['candidates']} regions of {tuple(info['region_shape'])} "
        f"({100 * info['sampled_fraction']:.1f} % of the volume's voxels, overlaps counted), "
        f"kept {info['kept']}, {info['rejected_as_background']} rejected as background",
    )
    from .ssi.train import describe_runs  # noqa: PLC0415

    # every run is self-checked and a failed one retried: say how many and why
    _say(echo, f"trained in {time.perf_counter() - started:.0f} s: {describe_runs(model.training)}")
    return model


def given_model(model: Any, ndim: int):
    """The job's SSI model (a checkpoint path or a model object), checked for ``ndim``."""
    from .ssi import load_checkpoint  # noqa: PLC0415

    source = model
    if isinstance(model, (str, Path)):
        model = load_checkpoint(model)
    if model.ndim != ndim:
        raise CheckpointError(
            f"checkpoint {str(source)!r} is for {model.ndim}D images but the input is "
            f"{ndim}D; train a model on this data (ssi-dask train)"
        )
    return model


def checkpoint_psf(
    model: Any, source: Any, psfs: list[np.ndarray] | None
) -> tuple[list[np.ndarray], list[dict]] | None:
    """The PSF an SSI checkpoint was trained with, when the job gives none.

    A checkpoint holds the PSF its network was trained for, so ``model=`` alone is enough.
    When the job also gives PSFs (files or optics), they must equal the checkpoint's (after
    normalisation and cropping), else the run is refused: the network inverts its own PSF.
    Returns None when the given PSFs match (they are used as they are).
    """
    from .psf import crop_psf, describe_psf, normalize_psf  # noqa: PLC0415

    stored = normalize_psf(crop_psf(np.asarray(model.psf, dtype=np.float32)))
    name = str(source) if isinstance(source, (str, Path)) else "the model object"
    if psfs is None:
        return [stored], [{**describe_psf(stored), "source": f"stored in the checkpoint {name}"}]
    for psf in psfs:
        given = normalize_psf(crop_psf(np.asarray(psf, dtype=np.float32)))
        same = given.shape == stored.shape and np.allclose(
            given, stored, rtol=1e-3, atol=1e-4 * float(stored.max())
        )
        if not same:
            raise PSFError(
                f"psf= differs from the PSF stored in model= {name} (shape {given.shape} vs "
                f"{stored.shape}); the network was trained for its own PSF: drop psf= to use "
                "the checkpoint's, or train a model with this PSF"
            )
    return None


def planned_network(
    settings: TrainSettings, ndim: int, psf_shape: Sequence[int], *, largest: bool = False
):
    """The untrained network a run will train (its halo and alignment set the plan).

    With a Lucy-Richardson prior it carries the prior's count (:func:`planned_prior_count`):
    the recipe's count when one is given (the plan is then the trained model's), else, while
    training chooses it, 1 (the plan's halo and memory are then lower bounds, as for LR's
    ``num_iter="auto"``) or with ``largest`` the recipe's ``lr_prior_max_iter`` (upper bounds).
    """
    from .ssi import UNet  # noqa: PLC0415

    recipe = settings.recipe().for_ndim(ndim)
    count = planned_prior_count(settings, ndim, largest=largest)
    prior = (
        dict(
            prior_iterations=count,
            prior_psf_shape=tuple(int(s) for s in psf_shape),
            prior_acceleration=recipe.lr_prior_acceleration,
        )
        if count
        else {}
    )
    return UNet(ndim, levels=recipe.levels, base_channels=recipe.base_channels, **prior)


def planned_prior_count(settings: TrainSettings, ndim: int, *, largest: bool = False) -> int:
    """The Lucy-Richardson prior count a run with ``settings`` plans for (0: no prior): the
    recipe's ``lr_prior``; for ``"auto"`` 1, or with ``largest`` ``lr_prior_max_iter``."""
    recipe = settings.recipe().for_ndim(ndim)
    if recipe.lr_prior == "auto":
        return int(recipe.lr_prior_max_iter) if largest else 1
    return int(recipe.lr_prior)


def _check_planned_prior(
    job: Job,
    ndim: int,
    psf_shape: Sequence[int],
    cluster: ClusterSettings,
    plan: Any,
    planned: Any,
    echo: Echo,
    warnings: list[str],
) -> None:
    """Before training: the prior's halo and memory, checked against a local memory limit.

    A count given (``lr_prior=N``) is the trained model's: a limit too small is refused now,
    not after training. A count chosen in training is bounded by ``lr_prior_max_iter``: the
    plan's line gives the range, and a limit too small for the largest count is warned about.
    """
    if not getattr(planned, "prior_iterations", 0):
        return
    largest = planned_network(job.ssi.train, ndim, psf_shape, largest=True)
    if largest.prior_iterations == planned.prior_iterations:  # the count is the model's
        check_local_memory(cluster, "ssi", plan, planned)
        return
    recipe = job.ssi.train.recipe().for_ndim(ndim)
    depth = tuple(largest.halo if d == planned.halo else d for d in plan.depth)
    bound = replace(plan, depth=depth)
    from dask.utils import format_bytes  # noqa: PLC0415

    needed = task_memory(bound, "ssi", largest)
    _say(
        echo,
        f"  prior           auto: {recipe.lr_prior_acceleration} Lucy-Richardson, 1-"
        f"{largest.prior_iterations} iterations chosen in training (halo and memory above for "
        f"1; up to {largest.halo} and ~{format_bytes(needed)} a task)",
    )
    try:
        check_local_memory(cluster, "ssi", bound, largest)
    except ParameterError:
        line = (
            f"warning: at the prior's largest count ({largest.prior_iterations}) one task needs "
            f"~{format_bytes(needed)}, more than the memory limit allows: a count that large, "
            "chosen in training, is refused after training; give a larger memory_limit or a "
            "fixed lr_prior (a smaller count)"
        )
        warnings.append(line)
        _say(echo, f"  {line}")


def _model_for_run(job: Job, volume: Any, psf: np.ndarray, protected: list, echo: Echo):
    """The SSI model: the job's checkpoint or model object, or one trained on the input now."""
    from .safety import check_replaceable_file, resolved  # noqa: PLC0415
    from .ssi import save_checkpoint  # noqa: PLC0415

    if job.ssi.model is not None:
        return given_model(job.ssi.model, volume.ndim)
    if job.dry_run:
        return planned_network(job.ssi.train, volume.ndim, psf.shape)
    save = job.ssi.save_model
    if save:
        model_path, output_path = resolved(save), resolved(job.output)
        if model_path == output_path or output_path in model_path.parents:
            raise ParameterError(
                f"save_model {str(save)!r} is the output or inside it; save the model outside "
                "the output"
            )
        check_replaceable_file(save, overwrite=job.overwrite, inputs=protected)
    model = train_model(volume, psf, job.ssi.train, gpu=job.cluster.gpu, echo=echo)
    if save:
        digest = save_checkpoint(model, save)
        _say(echo, f"saved the model to {save} (sha256 {digest[:16]})")
    return model


def _model_summary(job: Job, model: Any) -> dict:
    from .ssi import model_hash  # noqa: PLC0415

    if not hasattr(model, "network"):  # a dry run without a model: the untrained architecture
        return {
            "source": "to be trained by this run (not trained in a dry run)",
            "seed": job.ssi.train.seed,
            "halo": model.halo,
        }
    given = job.ssi.model
    source = (
        str(Path(given).resolve())
        if isinstance(given, (str, Path))
        else ("a model object" if given is not None else "trained by this run")
    )
    return {
        "sha256": model_hash(model),
        "source": source,
        "seed": model.training.get("seed") if given is not None else job.ssi.train.seed,
        "halo": model.halo,
        "architecture": model.config,
    }


def task_memory(plan: Any, method: str, model: Any = None) -> int:
    """Bytes one task needs at its peak: the LR estimate, or SSI's block, its Lucy-Richardson
    prior and its tiles (:func:`ssi_dask.ssi.tiling.chunk_task_bytes`)."""
    if method == "ssi" and model is not None:
        from .ssi.tiling import chunk_task_bytes  # noqa: PLC0415

        return chunk_task_bytes(model, plan.working_chunks, plan.depth)
    return plan.memory_per_task


def check_local_memory(
    cluster: ClusterSettings, method: str, plan: Any = None, model: Any = None
) -> None:
    """Refuse a memory limit too small for the run before the local cluster starts.

    Without ``plan``, only the worker's baseline is checked (SSI, before training). With a
    scheduler the workers' limits are theirs: nothing to check; with ``gpu`` only that the
    value can be read (the tasks' memory is on the device).
    """
    from .cluster import check_worker_memory, local_memory_limit  # noqa: PLC0415

    if cluster.remote:
        return
    if plan is None and method != "ssi":  # nothing to do before training
        return
    if cluster.gpu:
        local_memory_limit(cluster.memory_limit, cluster.threads_per_worker)
        return
    task_bytes = task_memory(plan, method, model) if plan is not None else 0
    check_worker_memory(cluster.memory_limit, cluster.threads_per_worker, task_bytes, method=method)


def _quiet_distributed_logs() -> None:
    """The client logs its own view of a lost scheduler or worker (with tracebacks); the run
    reports those cases itself in one line, keeping the progress for resume."""
    import distributed  # noqa: F401, PLC0415  (its import sets the logging levels first)

    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def scheduler_workers(cluster: ClusterSettings) -> dict:
    """``scheduler_info()`` of the job's scheduler, read over a short connection of its own.

    The run's own client connects later, as before: it becomes Dask's default, and the
    planning stage's small reads (the data checks) stay in this process until then.
    """
    from .cluster import dask_client  # noqa: PLC0415

    _quiet_distributed_logs()
    with dask_client(
        cluster.scheduler,
        scheduler_file=cluster.scheduler_file,
        connect_timeout=cluster.connect_timeout,
        set_as_default=False,
    ) as client:
        return client.scheduler_info()


@contextlib.contextmanager
def cluster_client(cluster: ClusterSettings, *, echo: Echo = print) -> Iterator[Any]:
    """The Dask client of a run: connected, or on a new local cluster; dashboard printed."""
    from .cluster import dashboard_link, dask_client  # noqa: PLC0415

    with dask_client(
        cluster.scheduler,
        scheduler_file=cluster.scheduler_file,
        n_workers=cluster.workers,
        threads_per_worker=cluster.threads_per_worker,
        memory_limit=cluster.memory_limit,
        gpu=cluster.gpu,
        connect_timeout=cluster.connect_timeout,
    ) as client:
        link = dashboard_link(client)
        workers = len(client.scheduler_info().get("workers", {}))
        _say(echo, f"dask: {workers} workers" + (f", dashboard at {link}" if link else ""))
        yield client


# ---------------------------------------------------------------------------------------------
# The run


def run(job: Job, *, client: Any = None, echo: Echo = print) -> RunReport:
    """Run a whole deconvolution job: the one path for the command line and notebooks.

    Parameters
    ----------
    job : ssi_dask.config.Job
        What to deconvolve (input, output, method and its settings), how to lay it out and
        where to compute.
    client : distributed.Client, optional
        Compute on this cluster; without it, the job's cluster settings say where (a local
        cluster by default).
    echo : callable or None
        Receives one line per stage (``print`` by default; None for silence).

    Returns
    -------
    RunReport

    Raises
    ------
    ssi_dask.errors.SsiDaskError
        Every problem a user can cause, with a one-line message, before any work where it can
        be known then; a run that fails midway keeps its finished chunks for ``resume``.
    """

    from ._version import __version__  # noqa: PLC0415
    from .blockwise import (  # noqa: PLC0415
        METHOD_BOUNDARY,
        SSI_TILES_EVENT,
        _deconvolve_graph,
        chunk_grid,
        computation_provenance,
        parse_chunks,
        plan_blocks,
    )
    from .chunkfiles import missing_input_chunks  # noqa: PLC0415
    from .config import DEFAULT_TARGET_VOXELS  # noqa: PLC0415
    from .io import Volume, check_image_array, check_output_path  # noqa: PLC0415
    from .ome import select_channels  # noqa: PLC0415
    from .store import (  # noqa: PLC0415
        check_resume,
        check_shard_alignment,
        output_provenance,
        recorded_chunks,
    )

    # a connected client's workers have their own limits: the local cluster's are not checked
    checked = (
        job.cluster
        if client is None or job.cluster.remote
        else replace(job.cluster, scheduler="the given client")
    )
    image = open_image(job.input, level=job.level, voxel_size=job.voxel_size)
    array = image.array
    n_spatial = len(image.spatial_axes)
    n_lead = array.ndim - n_spatial
    label = repr(image.path) if image.path else "DataArray"
    check_image_array(array.shape[n_lead:], array.dtype, name=f"input {label}")
    channels = select_channels(job.channels, image)
    lead_shape = tuple(int(s) for s in array.shape[:n_lead])
    if channels is not None:
        lead_shape = tuple(
            len(channels) if a == image.channel_axis else s for a, s in enumerate(lead_shape)
        )
    spatial_shape = tuple(int(s) for s in array.shape[n_lead:])
    n_channels = lead_shape[image.channel_axis] if image.channel_axis is not None else 1
    voxel_size = tuple(job.voxel_size) if job.voxel_size else image.voxel_size_um
    if job.voxel_size and len(job.voxel_size) != n_spatial:
        raise ParameterError(
            f"voxel_size needs {n_spatial} positive values for a {n_spatial}D image, "
            f"got {len(job.voxel_size)}"
        )
    given = None  # an SSI checkpoint holds its PSF: psf= may be left out
    if job.method == "ssi" and job.ssi.model is not None:
        given = given_model(job.ssi.model, n_spatial)
    if given is not None and not job.psf.files and job.psf.na is None:
        psfs, psf_info = checkpoint_psf(given, job.ssi.model, None)
    else:
        psfs, psf_info = resolve_psfs(job.psf, n_spatial, voxel_size, n_channels, spatial_shape)
        if given is not None:
            checkpoint_psf(given, job.ssi.model, psfs)
    model_files = [job.ssi.model] if isinstance(job.ssi.model, (str, Path)) else []
    protected = [image.path, *job.psf.files, *model_files]
    ome_out = job.layout.output_format == "ome-zarr" or (
        job.layout.output_format == "auto" and image.is_ome
    )
    if job.resume and Path(job.output).exists():
        output = Path(job.output).resolve()  # write_zarr checks it belongs to this run
    else:
        output = check_output_path(job.output, input_path=protected, overwrite=job.overwrite)
    store_chunks = _store_chunks(array)
    store_input = _store_input(image, array)
    output_dtype = resolve_output_dtype(job.layout.output_dtype, array.dtype)
    skip_background = job.layout.skip_background
    if skip_background is not None and job.method != "lr":
        raise ParameterError("skip_background applies to method 'lr'; drop it for SSI")
    if skip_background is not None and store_input is None:
        raise ParameterError(
            "skip_background needs a Zarr input (each chunk decides from what it reads); "
            "convert the input to Zarr or drop skip_background"
        )
    background_level = _background_level(image, job.layout.skip_background_level, n_lead)
    first_volume = Volume(
        data=_as_dask(array, store_chunks)[(0,) * n_lead],
        store_chunks=store_chunks[n_lead:],
        path=image.path,
    )
    lr = job.lr
    method = job.method
    auto = method == "lr" and lr.num_iter == "auto"
    user_depth = job.layout.depth
    depth = None
    if user_depth is not None:
        depth = (user_depth,) * n_spatial if isinstance(user_depth, int) else tuple(user_depth)
        if len(depth) != n_spatial:
            raise ParameterError(f"depth= needs 1 or {n_spatial} non-negative integers")
    check_local_memory(checked, method)  # a limit below a worker's baseline, before training
    model = None
    train_now = method == "ssi" and given is None and not job.dry_run
    if method == "ssi":
        # a network to be trained is planned from its architecture (the plan is printed
        # before training starts); a given model, or the dry run's, is used as it is
        if given is not None:
            model = given
        elif train_now:
            model = planned_network(job.ssi.train, n_spatial, psfs[0].shape)
        else:
            model = _model_for_run(job, first_volume, psfs[0], protected, echo)
        if depth is None:
            depth = (model.halo,) * n_spatial
    # SSI's only kernel option: the test-time transforms (provenance and the chunks' kernel)
    kernel_options = (
        lr.kernel_options() if method == "lr" else {"tta": ssi_tta(job.ssi.tta, n_spatial)}
    )
    psf_shape = tuple(max(p.shape[a] for p in psfs) for a in range(n_spatial))

    sized, sizing_reason = None, "given (chunks=)" if job.layout.chunks else "default"
    budget = None  # a connected cluster's bytes per task, which the sized plan must fit
    if method == "ssi" and job.layout.chunks is None:
        sizing_reason = (
            "default (SSI chunks are not sized from the workers: a task tiles its block "
            "within the network's memory budget whatever the chunk size)"
        )
    elif client is not None or job.cluster.remote:
        from .sizing import client_target_voxels  # noqa: PLC0415

        # the workers that will compute size the chunks: a given client's, or the scheduler's;
        # chunks given are kept, and checked against the same budget
        info = client.scheduler_info() if client is not None else scheduler_workers(job.cluster)
        voxels, reason, budget = client_target_voxels(
            info, method, psf_shape, n_spatial, gpu=job.cluster.gpu
        )
        if job.layout.chunks is None:
            sized, sizing_reason = voxels, reason
    elif job.layout.chunks is None:
        from .sizing import target_voxels  # noqa: PLC0415

        sized, sizing_reason = target_voxels(job.cluster, method, psf_shape, n_spatial)

    def plan_for(num_iter: int, target: int | None = sized):
        plan = plan_blocks(
            spatial_shape,
            array.dtype,
            psf_shape,
            num_iter=num_iter,
            store_chunks=store_chunks[n_lead:],
            chunks=job.layout.chunks,
            output_chunks=job.layout.output_chunks,
            depth=depth,
            alignment=model.alignment if model is not None else 1,
            boundary=METHOD_BOUNDARY[method],
            back_projector=lr.back_projector,
            psf=psfs[0] if method == "lr" else None,
            back_projector_options=kernel_options if method == "lr" else {},
            tasks_per_chunk=1 if store_input is not None else None,
            target_voxels=target,
            edge_depth=(
                (model.edge_halo,) * n_spatial
                if model is not None and job.layout.depth is None
                else None
            ),
        )
        if target is not None and budget is not None:
            # the sized chunk grows in whole store chunks: halve it while it exceeds the budget
            if plan.memory_per_task > budget and target > 1:
                smaller = plan_for(num_iter, target // 2)
                if smaller.working_chunks != plan.working_chunks:
                    return smaller
        elif target is not None and not job.cluster.gpu:
            try:  # the sized chunk grows in whole store chunks: it may overshoot the budget
                check_local_memory(checked, method, plan, model)
            except ParameterError:  # halve the target until it fits (or is the default)
                smaller = target // 2 if target // 2 > DEFAULT_TARGET_VOXELS[n_spatial] else None
                if smaller is None:
                    nonlocal sizing_reason
                    sizing_reason = "default (the memory limit fits no larger task)"
                return plan_for(num_iter, smaller)
        if method == "ssi":  # the network's tiles, not the LR formula, set an SSI task's memory
            plan = replace(plan, memory_per_task=task_memory(plan, method, model))
        if output_dtype != "float32":
            size = np.dtype(output_dtype).itemsize * math.prod(plan.shape)
            plan = replace(plan, output_dtype=output_dtype, output_bytes=size)
        return plan

    resumed_choice = _recorded_auto_choice(output) if auto and job.resume else None
    auto_record = resumed_choice
    if resumed_choice is not None:  # a resumed auto run continues with the count it chose
        lr = replace(lr, num_iter=resumed_choice["num_iter"], auto_options=None)
        if resumed_choice.get("wiener_alpha") is not None:
            lr = replace(lr, wiener_alpha=resumed_choice["wiener_alpha"])
        kernel_options = lr.kernel_options()
        auto = False
    plan = plan_for(1 if auto else (int(lr.num_iter) if method == "lr" else 0))
    zarr_format = job.layout.zarr_format or (image.zarr_format or 3)
    lead_chunks = (1,) * n_lead
    shards = parse_chunks(job.layout.output_shards, n_spatial)
    if job.layout.shards and zarr_format != 3:
        raise ParameterError("shards=True needs zarr_format=3")
    if job.layout.shards:
        shards = plan.working_chunks
    check_shard_alignment(
        chunk_grid(plan.shape, plan.working_chunks),
        plan.output_chunks,
        shards,
        plan.shape,
        zarr_format,
    )

    names = image.axis_names
    _say(echo, f"ssi-dask {__version__}: {method} on {image.path or 'a DataArray'} -> {output}")
    if image.is_ome:
        _say(
            echo,
            f"  OME-NGFF {image.version}, level {image.level}, axes {''.join(names)}, voxel "
            f"size {voxel_size} um, {_count_volumes(lead_shape)} volume(s) of {spatial_shape}",
        )
    _say(
        echo,
        f"  input           {tuple(array.shape)} {array.dtype}, stored in chunks {store_chunks}",
    )
    _say(
        echo,
        f"  output          {(*lead_shape, *plan.shape)} {output_dtype}, "
        + ("OME-Zarr" if ome_out else "Zarr")
        + f" v{zarr_format}, chunks {plan.output_chunks}"
        + (f", shards {shards}" if shards else ""),
    )
    _say(echo, plan.summary())
    missing_input = missing_input_chunks(_level_path(image))  # one walk of the input
    warnings: list[str] = []
    if missing_input is not None and missing_input.count:
        warnings.append(missing_input.warning())
        _say(echo, f"  {missing_input.warning()}")
    for line in data_warnings(first_volume.data, psfs[0], ome_out=ome_out, voxel_size=voxel_size):
        warnings.append(line)
        _say(echo, f"  {line}")
    if auto:
        _say(echo, "  iterations      auto: chosen before the run (halo above for 1 iteration)")
    if method == "ssi" and given is None:
        _check_planned_prior(job, n_spatial, psfs[0].shape, checked, plan, model, echo, warnings)
    if train_now:
        planned = model
        model = _model_for_run(job, first_volume, psfs[0], protected, echo)
        if (model.halo, model.alignment) != (planned.halo, planned.alignment):
            # a prior's count chosen in training: its halo replaces the planned one
            depth = depth if user_depth is not None else (model.halo,) * n_spatial
            plan = plan_for(0)
            _say(echo, plan.summary())
        else:
            plan = replace(plan, memory_per_task=task_memory(plan, method, model))

    def provenance_now() -> dict:
        entry: dict[str, Any] = {
            "version": __version__,
            "method": method,
            "psf": psf_info[0] if len(psf_info) == 1 else psf_info,
            "input": image.path,
            "depth": list(plan.depth),
            "working_chunks": list(plan.working_chunks),
            "command": job.command,
        }
        if output_dtype != "float32":
            entry["output_dtype"] = output_dtype
        if skip_background is not None:
            entry["skip_background"] = float(skip_background)
        if background_level is not None:
            entry["skip_background_level"] = background_level.level
        if image.is_ome:
            entry["input_level"] = image.level
            entry["channels"] = channels if channels is not None else "all"
        if voxel_size:
            entry["voxel_size_um"] = [float(v) for v in voxel_size]
        if method == "lr":
            from .lr import resolve_back_projector  # noqa: PLC0415

            entry["iterations"] = lr.num_iter if not auto else "auto"
            if auto_record is not None:
                entry["auto_iterations"] = auto_record
            entry.update(resolve_back_projector(psfs[0], **_bp_options(lr)).as_dict())
            if lr.acceleration != "none":  # recorded only when used
                entry["acceleration"] = lr.acceleration
            if lr.offset:
                entry["offset"] = lr.offset
        else:
            entry["model"] = _model_summary(job, model)
        return entry

    provenance = provenance_now()
    reference = _input_reference(image, array, n_lead, channels, plan.depth)

    def computation_now() -> dict:
        computation = computation_provenance(
            first_volume,
            psfs[0],
            method=method,
            num_iter=int(lr.num_iter) if method == "lr" else 0,
            depth=plan.depth,
            working_chunks=plan.working_chunks,
            options=kernel_options,
            model=model if method == "ssi" else None,
            offset=lr.offset,
        )
        if n_lead:
            computation["volumes"] = list(lead_shape)
            computation["channels"] = channels if channels is not None else "all"
            computation["psf_sha256"] = [info["sha256"] for info in psf_info]
        return computation

    target = output / "0" if ome_out else output
    target_shards = lead_chunks + tuple(shards) if shards else None
    if job.resume and output.exists() and not auto and (model is None or hasattr(model, "network")):
        layout = output_provenance(
            {"ssi_dask": provenance},
            shape=(*lead_shape, *plan.shape),
            grid=_full_grid(lead_shape, plan),
            output_chunks=lead_chunks + plan.output_chunks,
            output_shards=target_shards,
            zarr_format=zarr_format,
            computation=computation_now(),
            dtype=output_dtype,
        )
        # the input's data are checked here only for a dry run: a run's write_zarr checks
        # them right after, and each check walks the whole input store
        existing = check_resume(
            target,
            layout,
            input_path=protected,
            input_reference=reference if job.dry_run else None,
        )
        done = recorded_chunks(target, existing)
        total = math.prod(lead_shape) * plan.n_chunks
        _say(echo, f"  resume          {done} of {total} chunks already written")
    check_local_memory(checked, method, plan, model)
    if budget is not None and plan.memory_per_task > budget:  # no smaller chunk to choose
        from dask.utils import format_bytes  # noqa: PLC0415

        line = (
            f"warning: one task needs ~{format_bytes(plan.memory_per_task)}, more than the "
            f"workers' memory limit holds ({format_bytes(budget)} a task); workers may pause "
            "or be restarted: give the workers more memory or smaller chunks="
        )
        warnings.append(line)
        _say(echo, f"  {line}")
    n_volumes = _count_volumes(lead_shape)
    if job.dry_run:
        from .sizing import task_cost_line  # noqa: PLC0415

        _say(echo, f"  chunk size      {sizing_reason}")
        line, overhead_warning = task_cost_line(
            plan,
            method,
            int(lr.num_iter) if method == "lr" and not auto else 1,
            "gpu" if job.cluster.gpu else "cpu",
            psf_shape,
        )
        _say(echo, line)
        if overhead_warning:
            _say(echo, f"  {overhead_warning}")
        # the same dict the run writes under "ssi_dask" (and fingerprints, with the layout)
        _say(echo, "  provenance      " + json.dumps(provenance, sort_keys=True, default=str))
        _say(echo, "dry run: nothing computed or written")
        return RunReport(
            output=output,
            method=method,
            shape=(*lead_shape, *plan.shape),
            volumes=n_volumes,
            chunks=n_volumes * plan.n_chunks,
            levels=0,
            seconds=0.0,
            plan=plan,
            provenance=provenance,
            dry_run=True,
            ome_zarr=ome_out,
            warnings=warnings,
        )
    _quiet_distributed_logs()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(cluster_client(job.cluster, echo=echo))
        since = time.time()
        if auto:
            from .lr_auto import choose_iterations_within  # noqa: PLC0415

            options = dict(lr.auto_options or {})
            options.setdefault("seed", job.ssi.train.seed)
            user_chunks = job.layout.chunks is not None and depth is None
            started_choice = time.perf_counter()
            choice = choose_iterations_within(
                first_volume.data,
                psfs[0],
                plan_for=plan_for if user_chunks else None,
                offset=lr.offset,
                echo=echo,
                **kernel_options,
                **options,
            )
            _say(echo, f"{choice.summary()} in {time.perf_counter() - started_choice:.1f} s")
            lr = replace(lr, num_iter=choice.num_iter, auto_options=None)
            if choice.wiener_alpha is not None:
                lr = replace(lr, wiener_alpha=choice.wiener_alpha)
            kernel_options = lr.kernel_options()
            plan = plan_for(choice.num_iter)
            _say(echo, f"  halo (depth)    {plan.depth} for {choice.num_iter} iterations")
            check_local_memory(checked, method, plan)  # the chosen halo makes tasks larger
            auto = False
            auto_record = choice.as_dict()
            provenance = provenance_now()
            reference = _input_reference(image, array, n_lead, channels, plan.depth)
        if store_input is not None:  # one task per chunk, reading its halo from the store
            from .storegraph import store_result  # noqa: PLC0415

            result = store_result(
                store_input,
                lead_shape,
                _lead_map(n_lead, channels, image.channel_axis),
                image.channel_axis,
                psfs,
                plan,
                method=method,
                num_iter=int(lr.num_iter) if method == "lr" else 0,
                kernel_options=kernel_options,
                model=model,
                device="gpu" if job.cluster.gpu else "cpu",
                offset=lr.offset,
                skip_background=skip_background,
                background_level=background_level,
            )
        else:
            result = _build_graph(
                array,
                n_lead,
                channels,
                image.channel_axis,
                psfs,
                plan,
                method=method,
                lr=lr,
                kernel_options=kernel_options,
                model=model,
                device="gpu" if job.cluster.gpu else "cpu",
                graph=_deconvolve_graph,
            )
        result.ssi_dask_provenance = computation_now()
        result.ssi_dask_input = reference
        timing: dict = {}
        levels = _write(
            job,
            result,
            output,
            target,
            provenance=provenance,
            image=image,
            channels=channels,
            plan=plan,
            lead_chunks=lead_chunks,
            shards=target_shards,
            zarr_format=zarr_format,
            ome_out=ome_out,
            protected=protected,
            client=client,
            output_dtype=output_dtype,
            timing=timing,
        )
        if job.method == "ssi" and client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(SSI_TILES_EVENT)
        clipped, skipped, unread = _clipped_values(target)
        if skip_background is not None:
            line = f"skipped {skipped} background chunks (input <= {skip_background:g})"
            if background_level is not None:
                line += (
                    f"; {unread} decided from pyramid level {background_level.level}, "
                    "their full-resolution input not read"
                )
            _say(echo, line)
        if clipped:
            warnings.append(
                f"warning: {clipped} values outside the {output_dtype} range were clipped "
                "to it; output_dtype='float32' keeps them"
            )
        from .blockwise import negative_input_warning  # noqa: PLC0415

        negative = negative_input_warning(client, lr.offset, since)
        if negative:
            warnings.append(negative)
    return RunReport(
        output=output,
        method=method,
        shape=tuple(int(s) for s in result.shape),
        volumes=n_volumes,
        chunks=int(np.prod(result.numblocks)),
        levels=levels,
        seconds=time.perf_counter() - started,
        plan=plan,
        provenance=provenance,
        ome_zarr=ome_out,
        warnings=warnings,
        output_dtype=output_dtype,
        clipped=clipped,
        skipped=skipped,
        skipped_unread=unread,
        write_seconds=timing["progress"].seconds if "progress" in timing else None,
        written_voxels=timing["progress"].voxels if "progress" in timing else None,
    )


# ---------------------------------------------------------------------------------------------
# Helpers of run


def _store_chunks(array: Any) -> tuple[int, ...]:
    """The input's chunks (shards when sharded; a Dask array's first chunk sizes)."""
    chunks = getattr(array, "shards", None) or getattr(array, "chunks", None)
    if chunks is None:  # an in-memory array
        return tuple(int(s) for s in array.shape)
    return tuple(int(c[0]) if isinstance(c, tuple) else int(c) for c in chunks)


def resolve_output_dtype(choice: str, input_dtype: Any) -> str:
    """The stored type of a run's output: ``choice``, or the input's type for ``same``."""
    from .store import STORED_DTYPES  # noqa: PLC0415

    if choice != "same":
        return choice
    name = np.dtype(input_dtype).name
    if name not in STORED_DTYPES:
        raise ParameterError(
            f"output_dtype='same' cannot store the input's type {name}; choose "
            "output_dtype='float32' (or float16, uint16)"
        )
    return name


def _clipped_values(target: Path) -> tuple[int, int, int]:
    """Values the write clipped to the output dtype's range, background chunks skipped, and
    those of them decided from a pyramid level (from the output's provenance)."""
    import zarr  # noqa: PLC0415

    try:
        attrs = dict(zarr.open_array(str(target), mode="r").attrs.get("ssi_dask") or {})
    except Exception:
        return 0, 0, 0
    return (
        int(attrs.get("clipped_values", 0)),
        int(attrs.get("skipped_chunks", 0)),
        int(attrs.get("skipped_unread", 0)),
    )


#: Pyramid downsampling methods that keep one voxel (or the most frequent or median value) of
#: each block: a coarse voxel then says nothing about the others, so it cannot decide that a
#: chunk is background (ngff-zarr's dask_image_mode and itkwasm_label_image keep block modes).
SUBSAMPLING_METHODS = (
    "nearest",
    "subsampl",
    "stride",
    "decimat",
    "simpleimagescaler",
    "mode",
    "label",
    "median",
)


def _background_level(image: Any, level: int | None, n_lead: int) -> Any:
    """The :class:`ssi_dask.storegraph.PyramidLevel` ``skip_background_level`` names, after
    checking that the input has it and that its downsampling can decide background."""
    if level is None:
        return None
    if not image.is_ome or image.n_levels < 2:
        raise ParameterError(
            f"skip_background_level={level} needs an OME-Zarr input with a pyramid; this input "
            "has one level: drop skip_background_level (each chunk then decides from its input)"
        )
    if image.level >= image.n_levels - 1:
        raise ParameterError(
            f"skip_background_level={level}: the input is read at level {image.level}, the "
            "coarsest of its pyramid, so no coarser level can decide background; drop "
            "skip_background_level"
        )
    if not image.level < level < image.n_levels:
        raise ParameterError(
            f"skip_background_level={level} must be a level coarser than the input's "
            f"(level {image.level}): {image.level + 1} to {image.n_levels - 1}"
        )
    import zarr  # noqa: PLC0415

    from .ome import ome_attributes, open_ome_zarr  # noqa: PLC0415
    from .storegraph import PyramidLevel  # noqa: PLC0415

    block, _ = ome_attributes(dict(zarr.open_group(image.path, mode="r").attrs))
    multiscale = (block or {}).get("multiscales", [{}])[0]
    metadata = multiscale.get("metadata") if isinstance(multiscale.get("metadata"), dict) else {}
    method = " ".join(str(v) for v in (multiscale.get("type"), metadata.get("method")) if v)
    if any(word in method.lower() for word in SUBSAMPLING_METHODS):
        raise ParameterError(
            f"skip_background_level={level}: the input's pyramid was made by {method!r}, which "
            "keeps one voxel of each block and can miss a bright one entirely; drop "
            "skip_background_level (each chunk then decides from its full-resolution input)"
        )
    coarse = open_ome_zarr(image.path, level)
    spatial = image.spatial_axes
    factors = tuple(float(coarse.scale[i]) / float(image.scale[i]) for i in spatial)
    lead_ok = tuple(coarse.array.shape[:n_lead]) == tuple(image.array.shape[:n_lead])
    if not lead_ok or not all(f >= 1 for f in factors):
        raise ParameterError(
            f"skip_background_level={level}: level {level} is not a coarser copy of the input "
            f"(shape {tuple(coarse.array.shape)}, voxel {factors} input voxels); drop "
            "skip_background_level"
        )
    # a level of block means is shifted by 0 (corner-aligned) to (factor - 1) / 2 input voxels
    # (centred); further off, its coarse voxels lie over other input voxels than assumed
    shifts = tuple(
        round((float(coarse.translation[i]) - float(image.translation[i])) / image.scale[i], 3)
        for i in spatial
    )
    centred = tuple(round((f - 1) / 2, 3) for f in factors)
    if not all(-1e-3 <= s <= c + 1e-3 for s, c in zip(shifts, centred)):
        raise ParameterError(
            f"skip_background_level={level}: level {level} is shifted by {shifts} input voxels "
            "against the input (its translation); a level of block means is shifted by 0 to "
            f"(factor - 1) / 2 = {centred}: drop skip_background_level"
        )
    if _looks_subsampled(image.array, coarse.array, factors, n_lead):
        raise ParameterError(
            f"skip_background_level={level}: level {level} holds exact copies of single input "
            "voxels (one per block: a nearest-neighbour or strided pyramid, whatever its "
            "metadata says), which can miss a bright voxel entirely; drop skip_background_level "
            "(each chunk then decides from its full-resolution input)"
        )
    return PyramidLevel(
        path=str(Path(image.path) / coarse.level_path),
        level=level,
        factors=factors,
        shape=tuple(int(coarse.array.shape[i]) for i in spatial),
    )


#: Coarse voxels per axis of each sample :func:`_looks_subsampled` reads (and where).
SUBSAMPLE_PROBE_SIDE = 8
SUBSAMPLE_PROBE_AT = (0.5, 0.25, 0.75)


def _looks_subsampled(fine: Any, coarse: Any, factors: Sequence[float], n_lead: int) -> bool:
    """True when a few samples of the level show it copies one voxel per block.

    Most pyramids carry no record of how they were made (ome-zarr-py writes none, and its
    default is nearest-neighbour). Where the factors are whole numbers, small regions of the
    level (:data:`SUBSAMPLE_PROBE_SIDE` coarse voxels a side, at :data:`SUBSAMPLE_PROBE_AT` of
    the volume, of the first time point and channel) are compared with the input under them:
    when one fixed voxel of each block equals the level exactly where the blocks vary (their
    means differ from it), the level is a subsampling. A uniform sample says nothing and the
    next one is tried; when all are uniform the level is taken as it is.
    """
    if not all(abs(f - round(f)) < 1e-6 for f in factors):
        return False
    steps = tuple(int(round(f)) for f in factors)
    fine_shape = tuple(int(n) for n in fine.shape[n_lead:])
    coarse_shape = tuple(int(n) for n in coarse.shape[n_lead:])
    for where in SUBSAMPLE_PROBE_AT:
        boxes = []
        for n_fine, n_coarse, step in zip(fine_shape, coarse_shape, steps):
            whole = min(n_coarse, n_fine // step)  # coarse voxels whose block is whole
            side = min(SUBSAMPLE_PROBE_SIDE, whole)
            start = min(max(0, int(where * whole) - side // 2), whole - side)
            boxes.append((start, start + side))
        if any(stop <= start for start, stop in boxes):
            return False
        lead = (0,) * n_lead
        values = np.asarray(coarse[lead + tuple(slice(a, b) for a, b in boxes)], dtype=np.float64)
        under = np.asarray(
            fine[lead + tuple(slice(a * s, b * s) for (a, b), s in zip(boxes, steps))],
            dtype=np.float64,
        )
        if np.ptp(under) == 0:
            continue  # a uniform sample cannot tell
        means = under
        for axis, step in enumerate(steps):
            shape = means.shape
            means = means.reshape(*shape[:axis], shape[axis] // step, step, *shape[axis + 1 :])
            means = means.mean(axis=axis + 1)
        if np.allclose(values, means, rtol=1e-3, atol=1e-6 * float(np.abs(under).max())):
            return False  # block means, as assumed
        for offset in itertools.product(*(range(step) for step in steps)):
            picked = under[tuple(slice(o, None, step) for o, step in zip(offset, steps))]
            if np.array_equal(values, picked):
                return True
        return False
    return False


def _store_input(image: Any, array: Any) -> str | None:
    """The input array's folder when the run can read chunks straight from a Zarr store
    (:mod:`ssi_dask.storegraph`); None for TIFF, DataArray and in-memory inputs."""
    import zarr  # noqa: PLC0415

    path = _level_path(image)
    if path is None or not isinstance(array, zarr.Array) or not Path(path).is_dir():
        return None
    return str(path)


def _lead_map(n_lead: int, channels: Any, channel_axis: int | None) -> list:
    """Per leading axis, the input index of each output index (selected channels) or None."""
    lead: list = [None] * n_lead
    if channels is not None and channel_axis is not None:
        lead[channel_axis] = tuple(int(c) for c in channels)
    return lead


def _as_dask(array: Any, chunks: Sequence[int]) -> Any:
    """The input as a Dask array with ``chunks``: read straight from its store in them."""
    import dask.array as da  # noqa: PLC0415

    if isinstance(array, da.Array):
        return array.rechunk(tuple(chunks))
    return da.from_array(array, chunks=tuple(chunks), lock=False)


def _level_path(image: Any) -> str | None:
    """The on-disk array of the opened level, or None for an in-memory image."""
    if not image.path:
        return None
    return str(Path(image.path) / image.level_path) if image.level_path else str(image.path)


def _bp_options(lr: LRSettings) -> dict:
    options = lr.kernel_options()
    return {
        k: options[k]
        for k in ("back_projector", "wiener_alpha", "butterworth_order", "cutoff")
        if k in options
    }


def _count_volumes(lead_shape: Sequence[int]) -> int:
    return int(np.prod(lead_shape)) if lead_shape else 1


def _full_grid(lead_shape: Sequence[int], plan: Any) -> tuple[tuple[int, ...], ...]:
    from .blockwise import chunk_grid  # noqa: PLC0415

    return tuple((1,) * n for n in lead_shape) + chunk_grid(plan.shape, plan.working_chunks)


def _input_reference(image: Any, array: Any, n_lead: int, channels: Any, depth: Sequence[int]):
    """What each working chunk reads from the input (for the resume's content check)."""
    from .chunkfiles import InputReference  # noqa: PLC0415

    if _level_path(image) is None:
        return None
    path = Path(_level_path(image))
    if not path.exists():
        return None
    lead: list[tuple[int, ...] | None] = [None] * n_lead
    if channels is not None and image.channel_axis is not None:
        lead[image.channel_axis] = tuple(int(c) for c in channels)
    return InputReference(
        path=str(path),
        kind="tiff" if path.is_file() else "zarr",
        shape=tuple(int(s) for s in array.shape),
        depth=(0,) * n_lead + tuple(int(d) for d in depth),
        lead=tuple(lead),
    )


def _recorded_auto_choice(output: Path) -> dict | None:
    """The iteration count an earlier ``auto`` run chose, read from the output it left."""
    import zarr  # noqa: PLC0415

    for candidate in (output / "0", output):
        try:
            attributes = dict(zarr.open_array(str(candidate), mode="r").attrs)
        except Exception:
            continue
        record = (attributes.get("ssi_dask") or {}).get("auto_iterations")
        if isinstance(record, dict) and isinstance(record.get("num_iter"), int):
            return record
    return None


def _build_graph(
    array: Any,
    n_lead: int,
    channels: Any,
    channel_axis: int | None,
    psfs: list[np.ndarray],
    plan: Any,
    *,
    method: str,
    lr: LRSettings,
    kernel_options: dict,
    model: Any,
    device: str,
    graph: Callable,
):
    """The lazy result of every volume with one plan, stacked back along the leading axes."""

    import dask.array as da  # noqa: PLC0415

    from .psf import normalize_psf  # noqa: PLC0415

    data = _as_dask(array, (1,) * n_lead + tuple(plan.working_chunks))
    if channels is not None:
        data = da.take(data, channels, axis=channel_axis)
    psfs = [normalize_psf(p) for p in psfs]
    lead_shape = tuple(int(s) for s in data.shape[:n_lead])
    volumes = {}
    for index in itertools.product(*(range(n) for n in lead_shape)):
        psf = psfs[index[channel_axis]] if len(psfs) > 1 else psfs[0]
        volumes[index] = graph(
            data[index],
            psf,
            method,
            int(lr.num_iter) if method == "lr" else 0,
            plan,
            device,
            model,
            kernel_options,
            offset=lr.offset,
        )

    def stack(prefix: tuple) -> Any:
        if len(prefix) == n_lead:
            return volumes[prefix]
        return da.stack([stack((*prefix, i)) for i in range(lead_shape[len(prefix)])], axis=0)

    return stack(())


def _write(
    job: Job,
    result: Any,
    output: Path,
    target: Path,
    *,
    provenance: dict,
    image: Any,
    channels: Any,
    plan: Any,
    lead_chunks: tuple,
    shards: Any,
    zarr_format: int,
    ome_out: bool,
    protected: list,
    client: Any,
    output_dtype: str = "float32",
    timing: dict | None = None,
) -> int:
    """Write the result (an OME-Zarr image with its pyramid, or a Zarr array); return levels.

    ``timing["progress"]`` receives the :class:`~ssi_dask.summary.ChunkProgress` that measured
    the write (the summary quotes its rate)."""
    from .ome import (  # noqa: PLC0415
        create_ome_group,
        level_transforms,
        output_omero,
        pyramid_factors,
        write_ome_metadata,
        write_pyramid,
    )
    from .safety import claim_output, output_lock  # noqa: PLC0415
    from .store import write_zarr  # noqa: PLC0415
    from .summary import ChunkProgress  # noqa: PLC0415

    progress = ChunkProgress(
        int(np.prod(result.shape)), total_chunks=int(np.prod(result.numblocks)), show=job.progress
    )
    if job.method == "ssi" and job.progress and client is not None:
        from .blockwise import SSI_TILES_EVENT  # noqa: PLC0415

        with contextlib.suppress(Exception):  # tiles within chunks, as the workers report them
            client.subscribe_topic(SSI_TILES_EVENT, progress.tile_event)
    if timing is not None:
        timing["progress"] = progress
    dimension_names = tuple(image.axis_names) if zarr_format == 3 and ome_out else None
    with contextlib.ExitStack() as claim:
        if ome_out:  # the group is this run's: made new (or replaced, or resumed), locked
            if job.resume and output.exists():
                claim.enter_context(output_lock(output))
            else:
                claim.enter_context(claim_output(output, inputs=protected, overwrite=job.overwrite))
                create_ome_group(output, zarr_format=zarr_format)
        write_zarr(
            result,
            target,
            output_chunks=lead_chunks + plan.output_chunks,
            zarr_format=zarr_format,
            attrs={"ssi_dask": provenance},
            input_path=protected,
            overwrite=job.overwrite and not ome_out,
            client=client,
            progress=progress,
            resume=job.resume,
            repair=job.repair,
            output_shards=shards,
            worker_timeout=job.cluster.worker_timeout,
            dimension_names=dimension_names,
            output_dtype=output_dtype,
        )
        if not ome_out:
            return 1
        factors = pyramid_factors(
            result.shape,
            image.spatial_axes,
            input_shapes=_selected_shapes(image, result.shape),
        )
        paths = [
            "0",
            *write_pyramid(
                output,
                "0",
                factors,
                chunks=lead_chunks + plan.output_chunks,
                shards=shards,
                zarr_format=zarr_format,
                dimension_names=dimension_names,
                client=client,
                replace=job.resume,
            ),
        ]
        provenance.update(complete=True, pyramid_factors=[list(f) for f in factors])
        write_ome_metadata(
            output,
            version="0.5" if zarr_format == 3 else "0.4",
            axes=image.axes,
            paths=paths,
            transforms=level_transforms(image.scale, image.translation, factors),
            name=f"{_image_name(image.path or 'image')} deconvolved ({job.method})",
            provenance=provenance,
            omero=output_omero(
                output,
                paths[-1],
                channel_axis=image.channel_axis,
                input_omero=image.attrs.get("omero"),
                channels=channels,
            ),
        )
        return len(paths)


def _image_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".zarr", ".ome", ".tiff", ".tif"):
        name = name.removesuffix(suffix)
    return name


def _selected_shapes(image: Any, selected_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The input pyramid's shapes from the chosen level down, with the selected channels."""
    shapes = []
    for shape in image.level_shapes[image.level :]:
        shape = list(shape)
        if image.channel_axis is not None:
            shape[image.channel_axis] = int(selected_shape[image.channel_axis])
        shapes.append(tuple(shape))
    return shapes
