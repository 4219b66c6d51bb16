"""``ssi-dask run`` on OME-Zarr images, and the PSF choices shared with plain Zarr/TIFF runs.

An OME-Zarr input is processed one 2D/3D volume per time point and channel; the output is by
default an OME-Zarr image with the same axes, scales and translations, a multiscale pyramid
and the provenance in its attributes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ParameterError, PSFError


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """The ``run`` options for OME-Zarr images, voxel sizes, PSF generation and sharding."""
    group = parser.add_argument_group("OME-Zarr, voxel size and PSF generation")
    group.add_argument(
        "--level",
        type=int,
        metavar="N",
        help="OME-Zarr input: resolution level to deconvolve (default: 0, full resolution)",
    )
    group.add_argument(
        "--channel",
        metavar="LIST",
        help="OME-Zarr input: channels to process, by index or omero label, e.g. 0,2 "
        "(default: all)",
    )
    group.add_argument(
        "--voxel-size",
        metavar="DZ,DY,DX",
        help="voxel size in micrometres (default: from the OME-Zarr metadata); used to "
        "generate the PSF and to check a PSF file's declared voxel size",
    )
    group.add_argument(
        "--na", type=float, help="without --psf: numerical aperture of the PSF to compute"
    )
    group.add_argument(
        "--wavelength",
        metavar="UM[,UM...]",
        help="without --psf: emission wavelength(s) in micrometres, one per channel or one for all",
    )
    group.add_argument(
        "--refractive-index",
        type=float,
        default=1.33,
        help="without --psf: immersion refractive index (default 1.33)",
    )
    group.add_argument(
        "--psf-shape",
        metavar="NZ,NY,NX",
        help="without --psf: PSF size in voxels (default: from the optics and the voxel size)",
    )
    group.add_argument(
        "--output-format",
        choices=["auto", "ome-zarr", "zarr"],
        default="auto",
        help="auto (default): OME-Zarr for an OME-Zarr input, a plain Zarr array otherwise; "
        "ome-zarr also for a plain Zarr/TIFF input (scale from --voxel-size)",
    )
    group.add_argument(
        "--shards",
        action="store_true",
        help="Zarr v3 output: store each working chunk as one shard of output chunks",
    )


def _floats(text: str, option: str) -> tuple[float, ...]:
    from .cli import _parse_floats  # noqa: PLC0415  (cli imports this module lazily)

    return _parse_floats(text, option)


def parse_voxel_size(text: str | None, ndim: int) -> tuple[float, ...] | None:
    """``--voxel-size`` as ``ndim`` positive micrometre values (None when not given)."""
    if text is None:
        return None
    values = _floats(text, "--voxel-size")
    if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
        raise ParameterError(
            f"--voxel-size needs {ndim} positive values for a {ndim}D image, got {text!r}"
        )
    return values


def resolve_psfs(
    args: argparse.Namespace,
    ndim: int,
    voxel_size: Sequence[float] | None,
    n_channels: int = 1,
    image_shape: Sequence[int] | None = None,
) -> tuple[list[np.ndarray], list[dict]]:
    """The PSFs of a run, one per channel (or one for all), and their provenance.

    ``--psf`` names one file, or one per channel separated by commas; each file's declared
    voxel size must match the image's. Without ``--psf``, a widefield PSF is computed from
    ``--na``/``--wavelength`` at the image's voxel size.
    """
    from .ome import check_psf_voxel_size, default_psf_shape  # noqa: PLC0415
    from .psf import crop_psf, describe_psf, load_psf, normalize_psf, widefield_psf  # noqa: PLC0415

    if args.psf:
        files = [part for part in str(args.psf).split(",") if part]
        if len(files) not in (1, n_channels):
            raise PSFError(
                f"--psf names {len(files)} files for {n_channels} channels; give one PSF for "
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
    if args.na is None or args.wavelength is None:
        raise PSFError(
            "give --psf FILE, or --na and --wavelength to compute a widefield PSF from the "
            "image's voxel size"
        )
    if voxel_size is None:
        raise PSFError(
            "the image declares no voxel size (no OME-Zarr metadata or no units); give "
            "--voxel-size " + ("DZ,DY,DX" if ndim == 3 else "DY,DX") + " to compute the PSF"
        )
    wavelengths = _floats(args.wavelength, "--wavelength")
    _check_optics(args.na, wavelengths, args.refractive_index)
    if len(wavelengths) not in (1, n_channels):
        raise PSFError(
            f"--wavelength gives {len(wavelengths)} values for {n_channels} channels; give one "
            "or one per channel"
        )
    if voxel_size[-1] != voxel_size[-2]:
        raise PSFError(
            f"the image's lateral voxel sizes differ {tuple(voxel_size[-2:])}; a widefield PSF "
            "needs square pixels: give --psf FILE"
        )
    psfs, info = [], []
    for wavelength in wavelengths:
        shape = (
            tuple(int(v) for v in _floats(args.psf_shape, "--psf-shape"))
            if args.psf_shape
            else default_psf_shape(voxel_size, args.na, wavelength, args.refractive_index)
        )
        if image_shape is not None and not args.psf_shape:  # odd, and no larger than the image
            shape = tuple(min(s, n - 1 + n % 2) for s, n in zip(shape, image_shape))
            shape = (*shape[:-2], min(shape[-2:]), min(shape[-2:]))
        psf = widefield_psf(
            shape,
            voxel_size,
            na=args.na,
            wavelength=wavelength,
            refractive_index=args.refractive_index,
        )
        psf = normalize_psf(crop_psf(psf))
        psfs.append(psf)
        info.append(
            {
                **describe_psf(psf),
                "source": "computed (widefield, Gibson-Lanni via psfmodels)",
                "na": args.na,
                "wavelength_um": wavelength,
                "refractive_index": args.refractive_index,
                "voxel_size_um": [float(v) for v in voxel_size],
            }
        )
    return psfs, info


def _check_optics(na: float, wavelengths: Sequence[float], refractive_index: float) -> None:
    """Refuse optics no PSF can be computed from (before any division by them)."""
    if not (math.isfinite(refractive_index) and refractive_index > 0):
        raise PSFError(f"--refractive-index must be a positive number, got {refractive_index}")
    if not (math.isfinite(na) and 0 < na < refractive_index):
        raise PSFError(
            f"--na must be above 0 and below the refractive index {refractive_index:g}, got {na}"
        )
    if not all(math.isfinite(w) and w > 0 for w in wavelengths):
        raise PSFError(
            "--wavelength must be positive micrometres (e.g. 0.52), got "
            + ",".join(f"{w:g}" for w in wavelengths)
        )


def select_channels(text: str | None, image: Any) -> list[int] | None:
    """Channel indices chosen by ``--channel`` (indices or omero labels); None for all."""
    axis = image.channel_axis
    if text is None:
        return None
    if axis is None:
        raise ParameterError(f"--channel was given but {image.path!r} has no channel axis")
    n = int(image.array.shape[axis])
    names = image.channel_names or []
    chosen = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lstrip("-").isdigit() and 0 <= int(part) < n:
            chosen.append(int(part))
        elif part in names:
            chosen.append(names.index(part))
        else:
            described = f" ({', '.join(names)})" if names else ""
            raise ParameterError(
                f"--channel {part!r} does not exist; the image has channels 0 to {n - 1}{described}"
            )
    return chosen


def plain_as_ome(args: argparse.Namespace) -> Any:
    """A plain Zarr array or TIFF seen as a one-level OME image (axes ``(z)yx``), so that
    ``--output-format ome-zarr`` can write it as OME-Zarr; the scale is ``--voxel-size``
    (micrometres) or 1 without a unit."""
    from .io import TiffArray, open_zarr_array  # noqa: PLC0415
    from .ome import OmeImage  # noqa: PLC0415

    path = Path(args.input)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        try:
            array, zarr_format = TiffArray(path), None
        except Exception as exc:
            raise InputError(f"input {str(path)!r} could not be read as TIFF ({exc})") from None
    else:
        array = open_zarr_array(path)
        zarr_format = int(array.metadata.zarr_format)
    if array.ndim not in (2, 3):
        raise InputError(
            f"input {str(path)!r} has {array.ndim} dimensions {tuple(array.shape)}; give a 2D "
            "(y, x) or 3D (z, y, x) image"
        )
    names = "zyx"[-array.ndim :]
    voxel_size = parse_voxel_size(args.voxel_size, array.ndim)
    unit = {"unit": "micrometer"} if voxel_size else {}
    return OmeImage(
        path=str(path.resolve()),
        version="0.4" if zarr_format == 2 else "0.5",
        axes=[{"name": n, "type": "space", **unit} for n in names],
        level=0,
        level_path="",
        scale=list(voxel_size or (1.0,) * array.ndim),
        translation=[0.0] * array.ndim,
        array=array,
        n_levels=1,
        level_shapes=[tuple(int(v) for v in array.shape)],
    )


def run_ome(args: argparse.Namespace, image: Any = None) -> int:
    """``ssi-dask run`` with an OME-Zarr image group as INPUT (or ``image``, an
    :class:`~ssi_dask.ome.OmeImage` built another way, e.g. by :func:`plain_as_ome`)."""
    import dask.array as da  # noqa: PLC0415

    from ._version import __version__  # noqa: PLC0415
    from .blockwise import METHOD_BOUNDARY, deconvolve, plan_blocks  # noqa: PLC0415
    from .io import Volume, check_image_array, check_output_path  # noqa: PLC0415
    from .multivolume import deconvolve_stack  # noqa: PLC0415
    from .ome import (  # noqa: PLC0415
        create_ome_group,
        level_transforms,
        open_ome_zarr,
        output_omero,
        pyramid_factors,
        write_ome_metadata,
        write_pyramid,
    )
    from .safety import claim_output  # noqa: PLC0415
    from .store import write_zarr  # noqa: PLC0415
    from .summary import ChunkProgress, run_summary  # noqa: PLC0415

    if image is None:
        image = open_ome_zarr(args.input, level=args.level or 0)
    array = image.array
    n_spatial = len(image.spatial_axes)
    n_lead = array.ndim - n_spatial
    check_image_array(array.shape[n_lead:], array.dtype, name=f"input {image.path!r}")
    read_chunks = tuple(int(c) for c in (getattr(array, "shards", None) or array.chunks))
    data = da.from_array(array, chunks=read_chunks, lock=False)
    channels = select_channels(args.channel, image)
    if channels is not None:
        data = da.take(data, channels, axis=image.channel_axis)
    n_channels = int(data.shape[image.channel_axis]) if image.channel_axis is not None else 1
    voxel_size = parse_voxel_size(args.voxel_size, n_spatial) or image.voxel_size_um
    psfs, psf_info = resolve_psfs(
        args, n_spatial, voxel_size, n_channels, image_shape=data.shape[n_lead:]
    )
    from .cli import _psf_files  # noqa: PLC0415

    protected = [image.path, *_psf_files(args), args.model]
    output = check_output_path(args.output, input_path=protected, overwrite=args.overwrite)
    from .cli import _lr_options, _parse_iterations  # noqa: PLC0415

    iterations = _parse_iterations(args.iterations)
    if iterations == "auto":
        raise ParameterError(
            "--iterations auto is not supported for OME-Zarr runs yet; give a number, e.g. "
            "the one `ssi-dask run` chooses on one volume exported as a Zarr array"
        )
    lr_options = _lr_options(args)
    from .cli import _offset  # noqa: PLC0415

    offset = _offset(args)
    zarr_format = args.zarr_format or (3 if image.version == "0.5" else 2)
    if args.shards and zarr_format != 3:
        raise ParameterError("--shards needs Zarr format 3; add --zarr-format 3")
    spatial_shape = tuple(int(s) for s in data.shape[n_lead:])
    model = None
    depth = None
    if args.depth is not None:
        from .cli import _parse_depth  # noqa: PLC0415

        depth = _parse_depth(args.depth, n_spatial)
    from .cli import check_local_memory  # noqa: PLC0415

    check_local_memory(args)  # a limit below a worker's baseline fails before any training
    if args.method == "ssi":
        from .cli import _ssi_model_for_run  # noqa: PLC0415

        first = data[(0,) * n_lead]
        volume = Volume(data=first, store_chunks=read_chunks[n_lead:], path=image.path)
        model = _ssi_model_for_run(args, volume, psfs[0])
        if depth is None:
            depth = (model.halo,) * n_spatial
    elif args.model or args.save_model:
        raise ParameterError("--model and --save-model apply to --method ssi only")
    psf_shape = tuple(max(p.shape[a] for p in psfs) for a in range(n_spatial))
    plan = plan_blocks(
        spatial_shape,
        data.dtype,
        psf_shape,
        num_iter=iterations,
        store_chunks=read_chunks[n_lead:],
        chunks=args.chunks,
        output_chunks=args.output_chunks,
        depth=depth,
        alignment=model.alignment if model is not None else 1,
        boundary=METHOD_BOUNDARY[args.method],
        back_projector=lr_options.get("back_projector", "classic"),
        psf=list(psfs) if model is None else None,
        back_projector_options=lr_options,
    )
    ome_out = args.output_format in ("auto", "ome-zarr")
    n_volumes = int(np.prod(data.shape[:n_lead])) if n_lead else 1
    names = image.axis_names
    print(f"ssi-dask {__version__}: {args.method} on {image.path} -> {output}")
    print(
        f"  OME-NGFF {image.version}, level {image.level}, axes {''.join(names)}, voxel size "
        f"{voxel_size} um, {n_volumes} volume(s) of {spatial_shape}"
    )
    print(plan.summary())
    from .chunkfiles import missing_input_chunks  # noqa: PLC0415

    level_array = Path(image.path) / image.level_path if image.level_path else Path(image.path)
    missing_input = missing_input_chunks(str(level_array))  # one listing of the input level
    if missing_input is not None and missing_input.count:
        print(f"  {missing_input.warning()}")
    check_local_memory(args, plan, model)
    if args.dry_run:
        print("dry run: nothing computed or written")
        return 0
    provenance: dict[str, Any] = {
        "version": __version__,
        "method": args.method,
        "psf": psf_info[0] if len(psf_info) == 1 else psf_info,
        "input": image.path,
        "input_level": image.level,
        "channels": channels if channels is not None else "all",
        "voxel_size_um": list(voxel_size) if voxel_size else None,
        "depth": list(plan.depth),
        "working_chunks": list(plan.working_chunks),
        "command": " ".join(sys.argv[1:]) if sys.argv else "",
    }
    if model is None:
        from .lr import resolve_back_projector  # noqa: PLC0415

        provenance["iterations"] = iterations
        provenance.update(resolve_back_projector(psfs[0], **lr_options).as_dict())
        if offset:
            provenance["offset"] = offset
    else:
        from .cli import _model_summary  # noqa: PLC0415

        provenance["model"] = _model_summary(model, args)
    lead = (1,) * n_lead
    shards = lead + plan.working_chunks if args.shards else None
    dimension_names = tuple(names) if zarr_format == 3 else None
    started = time.perf_counter()
    levels = 1
    from .cli import run_client  # noqa: PLC0415

    with run_client(args) as client:
        result = deconvolve_stack(
            data,
            n_spatial,
            psfs if len(psfs) > 1 else psfs[0],
            deconvolve=deconvolve,
            channel_axis=image.channel_axis,
            method=args.method,
            num_iter=iterations if args.method == "lr" else None,
            chunks=plan.working_chunks,
            depth=plan.depth,
            device="gpu" if args.gpu else "cpu",
            model=model,
            **({"offset": offset} if offset else {}),
            **lr_options,
        )
        progress = False if args.no_progress else ChunkProgress(int(np.prod(result.shape)))
        target = output
        with contextlib.ExitStack() as claim:
            if ome_out:  # the group is this run's: made new (or replaced), locked while written
                claim.enter_context(
                    claim_output(output, inputs=protected, overwrite=args.overwrite)
                )
                create_ome_group(output, zarr_format=zarr_format)
                target = output / "0"
            write_zarr(
                result,
                target,
                output_chunks=lead + plan.output_chunks,
                zarr_format=zarr_format,
                attrs={"ssi_dask": provenance},
                input_path=protected,
                overwrite=args.overwrite and not ome_out,
                client=client,
                progress=progress,
                output_shards=shards,
                dimension_names=dimension_names,
            )
            if ome_out:
                factors = pyramid_factors(
                    result.shape,
                    image.spatial_axes,
                    input_shapes=_selected_shapes(image, data.shape),
                )
                paths = [
                    "0",
                    *write_pyramid(
                        output,
                        "0",
                        factors,
                        chunks=lead + plan.output_chunks,
                        shards=shards,
                        zarr_format=zarr_format,
                        dimension_names=dimension_names,
                        client=client,
                    ),
                ]
                levels = len(paths)
                provenance.update(complete=True, pyramid_factors=[list(f) for f in factors])
                write_ome_metadata(
                    output,
                    version="0.5" if zarr_format == 3 else "0.4",
                    axes=image.axes,
                    paths=paths,
                    transforms=level_transforms(image.scale, image.translation, factors),
                    name=f"{_image_name(image.path)} deconvolved ({args.method})",
                    provenance=provenance,
                    omero=output_omero(
                        output,
                        paths[-1],
                        channel_axis=image.channel_axis,
                        input_omero=image.attrs.get("omero"),
                        channels=channels,
                    ),
                )
    elapsed = time.perf_counter() - started
    print(
        run_summary(
            output=str(output),
            shape=result.shape,
            seconds=elapsed,
            method=args.method,
            chunks=int(np.prod(result.numblocks)),
            ome_zarr=ome_out,
            levels=levels,
            volumes=n_volumes,
        )
    )
    if missing_input is not None and missing_input.count:
        print(missing_input.warning())
    return 0


def _image_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".zarr", ".ome"):
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


def check_not_ome_options(args: argparse.Namespace) -> None:
    """Refuse OME-only options on a plain Zarr/TIFF input."""
    for option, value in (("--level", args.level), ("--channel", args.channel)):
        if value is not None:
            raise InputError(
                f"{option} applies to OME-Zarr image groups; {args.input!r} is a plain array"
            )
