"""The ``ssi-dask`` command line.

Errors a user can cause are printed as one line on stderr with a non-zero exit status and
no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import DEFAULT_NUM_ITER, LRSettings, cli_message
from .errors import ParameterError, PSFError, SsiDaskError
from .ome_run import add_image_options
from .safety import check_replaceable_file, resolved


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (default: start a local Dask cluster)")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running Dask scheduler, e.g. tcp://10.0.0.1:8786",
    )
    where.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="scheduler file written by `dask scheduler --scheduler-file FILE`",
    )
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local cluster: number of worker processes (default: one per core)",
    )
    group.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        metavar="N",
        help="local cluster: threads per worker (default: 1)",
    )
    group.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="local cluster: memory limit per worker, e.g. 4GiB "
        "(default: share of the machine's memory)",
    )
    group.add_argument(
        "--gpu",
        action="store_true",
        help="local cluster: one dask-cuda worker per GPU "
        "(needs the 'gpu' extra and a CUDA device)",
    )
    group.add_argument(
        "--worker-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up, keeping the progress for --resume, when no worker has been connected "
        "for this long (default: 120)",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds to wait for a remote scheduler (default: 5)",
    )


def _add_back_projector_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Lucy-Richardson back projector and --iterations auto")
    group.add_argument(
        "--back-projector",
        choices=["classic", "wiener-butterworth"],
        default="classic",
        help="classic: the flipped PSF; wiener-butterworth: the unmatched back projector of "
        "Guo et al. 2020, 2-5 iterations instead of tens (default: classic)",
    )
    group.add_argument(
        "--wiener-alpha",
        type=float,
        metavar="A",
        help="wiener-butterworth: Wiener parameter (default: 0.05, or chosen by --iterations auto)",
    )
    group.add_argument(
        "--butterworth-order",
        type=float,
        metavar="P",
        help="wiener-butterworth: order of the Butterworth filter (default: 10)",
    )
    group.add_argument(
        "--cutoff",
        metavar="F",
        help="wiener-butterworth: cut-off in cycles per pixel, one value or one per axis "
        "(default: where the OTF falls to 5%% of its peak)",
    )
    group.add_argument(
        "--auto-max-iterations",
        type=int,
        metavar="N",
        help="--iterations auto: largest count tried (default: 50 classic, 10 wiener-butterworth)",
    )
    group.add_argument(
        "--auto-samples",
        type=int,
        default=4,
        metavar="N",
        help="--iterations auto: chunks sampled from the volume (default: 4; seeded by --seed)",
    )


def _lr_options(args: argparse.Namespace) -> dict:
    """Back-projector keyword arguments of ``richardson_lucy`` from the command line."""
    options: dict = {}
    if args.back_projector != "classic":
        options["back_projector"] = args.back_projector
    if args.wiener_alpha is not None:
        options["wiener_alpha"] = args.wiener_alpha
    if args.butterworth_order is not None:
        options["butterworth_order"] = args.butterworth_order
    if args.cutoff is not None:
        options["cutoff"] = _parse_floats(args.cutoff, "--cutoff")
    if options and args.method != "lr":
        raise ParameterError("--back-projector and its options apply to --method lr only")
    if options.get("back_projector") is None and options:
        raise ParameterError(
            "--wiener-alpha, --butterworth-order and --cutoff need "
            "--back-projector wiener-butterworth"
        )
    try:  # the library's own checks, with its parameter names mapped to flags
        LRSettings(**options)
    except ParameterError as exc:
        raise ParameterError(cli_message(str(exc))) from None
    return options


def _offset(args: argparse.Namespace) -> float:
    """``--offset`` checked: a finite number, for --method lr only."""
    from .blockwise import check_offset  # noqa: PLC0415

    try:
        offset = check_offset(getattr(args, "offset", 0.0))
    except ParameterError:
        raise ParameterError(f"--offset must be a finite number, got {args.offset}") from None
    if offset and args.method != "lr":
        raise ParameterError("--offset applies to --method lr only")
    return offset


def _parse_iterations(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise ParameterError(
            f"--iterations must be an integer >= 0 or 'auto', got {text!r}"
        ) from None
    if value < 0:
        raise ParameterError(f"--iterations must be >= 0, got {value}")
    return value


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SSI training")
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed; also seeds the chunks and pixels of --iterations auto (default: 0)",
    )
    group.add_argument(
        "--steps", type=int, metavar="N", help="training steps (default: tuned per 2D/3D)"
    )
    group.add_argument(
        "--restarts",
        type=int,
        metavar="N",
        help="extra runs with other seeds when a run fails its self-supervised check "
        "(default: tuned)",
    )
    group.add_argument(
        "--ensemble",
        type=int,
        metavar="N",
        help="networks trained with different seeds and averaged: less variation between "
        "seeds, N times the compute (default 1)",
    )
    group.add_argument(
        "--patch-size", type=int, metavar="N", help="training patch side (default: 96 2D, 48 3D)"
    )
    group.add_argument(
        "--batch-size", type=int, metavar="N", help="patches per step (default: 16 2D, 4 3D)"
    )
    group.add_argument(
        "--net-depth", type=int, metavar="N", help="UNet resolution levels (default: 3)"
    )
    group.add_argument(
        "--base-channels",
        type=int,
        metavar="N",
        help="UNet channels at full resolution (default: 8)",
    )
    group.add_argument(
        "--clipping",
        default="auto",
        metavar="SPEC",
        help="values at which the detector clipped the noisy signal, modelled in training: "
        "auto (detect a pile-up at the image's min/max), none, or LO,HI with either side "
        "empty, e.g. 0, (default: auto)",
    )
    group.add_argument(
        "--train-device",
        default="auto",
        metavar="DEVICE",
        help="torch device for training: auto, cpu, cuda, cuda:1 (default: auto)",
    )


def parse_clipping(spec: str):
    """``--clipping``: "auto", "none" or "LO,HI" (either side may be empty) -> train option."""
    text = str(spec).strip().lower()
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    parts = text.split(",")
    bad = ParameterError(
        f"--clipping must be auto, none or LO,HI with either side empty (e.g. 0,), got {spec!r}"
    )
    if len(parts) != 2 or not any(p.strip() for p in parts):
        raise bad
    try:
        lower, upper = (float(p) if p.strip() else None for p in parts)
    except ValueError:
        raise bad from None
    if lower is not None and upper is not None and not lower < upper:
        raise ParameterError(f"--clipping needs LO < HI, got {spec!r}")
    return lower, upper


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SSI training regions (read through Dask)")
    group.add_argument(
        "--regions",
        type=int,
        metavar="N",
        help="regions sampled across the volume for training (default: 24)",
    )
    group.add_argument(
        "--region-size",
        metavar="SPEC",
        help="size of each region, e.g. 96 or 48,96,96 (default: two training patches)",
    )
    group.add_argument(
        "--background",
        type=float,
        default=0.05,
        metavar="F",
        help="reject regions whose 99th percentile is below lo + F * (hi - lo) of the "
        "global range as empty background (default: 0.05; 0 keeps all)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ssi-dask`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="ssi-dask",
        description="Deconvolve large 2D/3D images stored in Zarr on a Dask cluster, with "
        "Lucy-Richardson (lr) or Self-Supervised Inversion (ssi).",
    )
    parser.add_argument("--version", action="version", version=f"ssi-dask {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run",
        help="deconvolve a Zarr array into a new Zarr array",
        description="Deconvolve INPUT (a Zarr v2/v3 array or a TIFF) chunk by chunk on a Dask "
        "cluster and write OUTPUT, a new float32 Zarr array of the same shape with provenance "
        "in its attributes.",
    )
    run.add_argument("input", metavar="INPUT", help="input image: Zarr array (v2 or v3) or TIFF")
    run.add_argument("output", metavar="OUTPUT", help="output Zarr array to create")
    run.add_argument(
        "--psf",
        metavar="PSF",
        help="point spread function (.tif, .tiff, .npy or Zarr array) with the image's "
        "dimensionality; make one with `ssi-dask psf`; one per channel separated by commas; "
        "without it, --na and --wavelength compute one at the image's voxel size",
    )
    run.add_argument(
        "--method",
        choices=["lr", "ssi"],
        default="lr",
        help="lr: Lucy-Richardson; ssi: Self-Supervised Inversion (trains on the input first "
        "unless --model is given)",
    )
    run.add_argument(
        "--iterations",
        default=str(DEFAULT_NUM_ITER),
        metavar="N",
        help="Lucy-Richardson iterations, or 'auto': chosen without ground truth by a "
        f"self-supervised hold-out criterion on a few sampled chunks (default: {DEFAULT_NUM_ITER})",
    )
    _add_back_projector_options(run)
    run.add_argument(
        "--offset",
        type=float,
        default=0.0,
        metavar="VALUE",
        help="lr: background (e.g. the camera offset) subtracted from the input before "
        "Lucy-Richardson; values still below 0 are treated as 0, with a warning (default: 0)",
    )
    run.add_argument(
        "--model", metavar="MODEL", help="ssi: trained checkpoint (from `ssi-dask train`)"
    )
    run.add_argument(
        "--save-model", metavar="PATH", help="ssi: also save the model trained by this run"
    )
    _add_training_options(run)
    _add_sampling_options(run)
    run.add_argument(
        "--chunks",
        metavar="SPEC",
        help="working chunk shape, e.g. 64,256,256 or 256 for every "
        "axis (default: grown from the input's chunks to ~7M voxels in 3D, 4M in 2D)",
    )
    run.add_argument(
        "--output-chunks",
        metavar="SPEC",
        help="chunk shape of the output array (default: the "
        "input's chunks when the working chunks are multiples of them, else the working chunks)",
    )
    run.add_argument(
        "--depth",
        metavar="N",
        help="halo per axis (one integer or one per axis; default: from "
        "the PSF size and the iteration count)",
    )
    run.add_argument(
        "--zarr-format",
        type=int,
        choices=[2, 3],
        help="Zarr format of the output (default: the input's)",
    )
    run.add_argument(
        "--output-shards",
        metavar="SPEC",
        help="Zarr v3 only: shard shape of the output, multiples of the output chunks "
        "(default: no sharding); every working chunk must be made of whole shards",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT store")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: keep the chunks OUTPUT records as written and "
        "compute only the others (refused if OUTPUT was made with other parameters, PSF or "
        "model, or from input data that has changed since); also recomputes chunks whose "
        "files are missing; starts a new OUTPUT when there is none",
    )
    run.add_argument(
        "--repair",
        action="store_true",
        help="with --resume: also re-read every chunk already written and recompute those "
        "that do not decode or whose data differ from their recorded checksum",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (chunks, halo, tasks, memory) and exit without computing or writing",
    )
    run.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    _add_cluster_options(run)
    add_image_options(run)
    run.set_defaults(handler=_run_command)

    verify = commands.add_parser(
        "verify",
        help="check that an output has every chunk recorded as written",
        description="List the chunks of OUTPUT (written by `ssi-dask run`) that are not recorded "
        "as written or whose chunk files are gone from the store. Exit status 0 when the output "
        "is complete, 1 when chunks are missing or damaged, 2 when OUTPUT is not an ssi-dask "
        "output.",
    )
    verify.add_argument("output", metavar="OUTPUT", help="output Zarr array of `ssi-dask run`")
    verify.add_argument(
        "--check-data",
        action="store_true",
        help="also re-read every recorded chunk: one that does not decode or differs from its "
        "recorded checksum is damaged (mend with run --resume --repair)",
    )
    verify.set_defaults(handler=_verify_command)

    psf = commands.add_parser(
        "psf",
        help="generate a widefield PSF from optics",
        description="Compute a widefield PSF (Gibson-Lanni model, via psfmodels) and write it "
        "to a .tif/.tiff/.npy file, normalised to sum 1.",
    )
    psf.add_argument("output", metavar="OUT", help="file to write (.tif, .tiff or .npy)")
    psf.add_argument("--na", type=float, required=True, help="numerical aperture, e.g. 0.8")
    psf.add_argument(
        "--wavelength", type=float, required=True, help="emission wavelength in micrometres"
    )
    psf.add_argument(
        "--voxel-size",
        required=True,
        metavar="DZ,DY,DX",
        help="voxel size in micrometres: 'dz,dy,dx' for 3D or 'dy,dx' for 2D",
    )
    psf.add_argument(
        "--shape",
        required=True,
        metavar="NZ,NY,NX",
        help="PSF size in voxels: 'nz,ny,nx' (3D) or 'ny,nx' (2D); lateral sizes equal and odd",
    )
    psf.add_argument(
        "--refractive-index",
        type=float,
        default=1.33,
        help="immersion refractive index (default 1.33, water)",
    )
    psf.add_argument(
        "--sample-index",
        type=float,
        help="sample refractive index (default: the immersion index, no aberration)",
    )
    psf.add_argument(
        "--z-offset", type=float, default=0.0, help="2D only: defocus of the plane in micrometres"
    )
    psf.add_argument(
        "--model",
        choices=["scalar", "vectorial", "gaussian"],
        default="scalar",
        help="optical model (default: scalar Gibson-Lanni)",
    )
    psf.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    psf.set_defaults(handler=_psf_command)

    train = commands.add_parser(
        "train",
        help="train an SSI model on an image and save a checkpoint",
        description="Train a Self-Supervised Inversion network on INPUT (no clean data needed): "
        "patches are read from anywhere in the image, normalisation statistics are sampled, "
        "failed runs are detected with the self-supervised validation loss and restarted. "
        "The checkpoint holds everything needed to apply it (`ssi-dask run --model`).",
    )
    train.add_argument("input", metavar="INPUT", help="image: Zarr array (v2 or v3) or TIFF")
    train.add_argument("--psf", required=True, metavar="PSF", help="point spread function")
    train.add_argument("--out", required=True, metavar="MODEL", help="checkpoint file to write")
    train.add_argument("--overwrite", action="store_true", help="replace an existing MODEL")
    _add_training_options(train)
    _add_sampling_options(train)
    remote = train.add_argument_group("cluster (default: read the regions with local threads)")
    where = remote.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler", metavar="ADDRESS", help="read the regions on this Dask scheduler's workers"
    )
    where.add_argument(
        "--scheduler-file", metavar="FILE", help="scheduler file of a running Dask scheduler"
    )
    remote.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds to wait for the scheduler (default: 5)",
    )
    remote.add_argument(
        "--train-on",
        choices=["client", "worker"],
        default="client",
        help="train in this process (default) or on a worker of the cluster, e.g. a "
        "`dask cuda worker` (needs --scheduler)",
    )
    remote.add_argument(
        "--gpu",
        action="store_true",
        help="train on a CUDA GPU (this machine's, or the worker's with --train-on worker)",
    )
    train.set_defaults(handler=_train_command)

    example = commands.add_parser(
        "make-example",
        help="write an example volume (Zarr) and its PSF to try `ssi-dask run` on",
        description="Generate a blurred, noisy 3D volume (uint16 Zarr v3, 64x512x512 by "
        "default) with its ground truth and PSF, and print the command that deconvolves it.",
    )
    example.add_argument("directory", metavar="DIR", help="folder to write into")
    example.add_argument(
        "--shape",
        default="64,512,512",
        metavar="NZ,NY,NX",
        help="volume shape (default: 64,512,512)",
    )
    example.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    example.add_argument("--overwrite", action="store_true", help="replace existing files")
    example.set_defaults(handler=_example_command)

    demo = commands.add_parser(
        "demo",
        help="compare Lucy-Richardson and SSI on a degraded built-in image",
        description="Degrade a ground truth with the benchmark protocol (widefield ring PSF, "
        "Poisson-Gaussian noise, salt and pepper, 10-bit quantisation), restore it with LR at "
        "2/5/10/20 iterations and with SSI, print PSNR/SSIM/MI/SMI, and write a PNG figure and a "
        "JSON of the metrics into DIR.",
    )
    demo.add_argument("--dim", type=int, choices=[2, 3], default=2, help="2D image or 3D volume")
    demo.add_argument(
        "--image", metavar="PATH", help="ground-truth image (PNG/TIFF; default: built in)"
    )
    demo.add_argument("--out", default="demo-out", metavar="DIR", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="noise and training seed (default 0)")
    demo.add_argument(
        "--device", default="auto", help="torch device for SSI: auto, cpu, cuda (default auto)"
    )
    demo.add_argument(
        "--steps", type=int, metavar="N", help="SSI training steps (default: the tuned default)"
    )
    demo.set_defaults(handler=_demo_command)
    return parser


def _verify_command(args: argparse.Namespace) -> int:
    from .verify import verify_output  # noqa: PLC0415

    report = verify_output(args.output, check_data=args.check_data)
    print(report.summary())
    return 0 if report.ok else 1


def _demo_command(args: argparse.Namespace) -> int:
    from .bench.demo import run_demo  # noqa: PLC0415

    options = {"steps": args.steps} if args.steps else None
    run_demo(
        args.dim,
        args.image,
        args.out,
        seed=args.seed,
        device=args.device,
        ssi_options=options,
        progress=True,
    )
    return 0


def _example_command(args: argparse.Namespace) -> int:
    from .example import make_example  # noqa: PLC0415

    shape = tuple(int(v) for v in _parse_floats(args.shape, "--shape"))
    if len(shape) != 3 or min(shape) < 17:
        raise ParameterError(f"--shape needs 3 sizes of at least 17, got {args.shape!r}")
    chunks = tuple(min(s, c) for s, c in zip(shape, (32, 128, 128)))
    paths = make_example(
        args.directory, shape=shape, chunks=chunks, seed=args.seed, overwrite=args.overwrite
    )
    print(f"wrote {paths['volume']} {shape} uint16, {paths['ground_truth']} and {paths['psf']}")
    output = Path(args.directory) / "deconvolved.zarr"
    print(f"next: ssi-dask run {paths['volume']} {output} --psf {paths['psf']} --iterations 10")
    return 0


def _psf_files(args: argparse.Namespace) -> list[str]:
    """The PSF files named by ``--psf`` (none when the PSF is computed from optics)."""
    return [part for part in str(getattr(args, "psf", None) or "").split(",") if part]


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ParameterError(
            f"{option} must be numbers separated by commas, got {text!r}"
        ) from None


def _parse_depth(text: str | None, ndim: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ParameterError(
            f"--depth must be integers separated by commas, got {text!r}"
        ) from None
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or any(v < 0 for v in values):
        raise ParameterError(f"--depth needs 1 or {ndim} non-negative integers, got {text!r}")
    return values


def _psf_command(args: argparse.Namespace) -> int:
    from .psf import save_psf, widefield_psf  # noqa: PLC0415

    out = Path(args.output)
    if out.suffix.lower() not in (".tif", ".tiff", ".npy"):
        raise PSFError(f"cannot write a PSF to {out.suffix!r}; name the output .tif, .tiff or .npy")
    try:
        check_replaceable_file(out, overwrite=args.overwrite)
    except SsiDaskError as exc:
        raise PSFError(str(exc)) from None
    shape = tuple(int(v) for v in _parse_floats(args.shape, "--shape"))
    voxel_size = _parse_floats(args.voxel_size, "--voxel-size")
    psf = widefield_psf(
        shape,
        voxel_size,
        na=args.na,
        wavelength=args.wavelength,
        refractive_index=args.refractive_index,
        sample_index=args.sample_index,
        z_offset=args.z_offset,
        model=args.model,
    )
    save_psf(out, psf, voxel_size)
    print(f"wrote {out} {psf.shape} (sum 1, peak at {tuple(int(i) // 1 for i in psf.shape)} / 2)")
    return 0


def _train_model(args: argparse.Namespace, volume, psf, client=None):
    """Train SSI on regions sampled from the opened volume with the CLI's options."""
    from .blockwise import parse_chunks  # noqa: PLC0415
    from .training import DEFAULT_REGIONS, train  # noqa: PLC0415

    if args.steps is not None and args.steps < 1:
        raise ParameterError(f"--steps must be at least 1, got {args.steps}")
    if args.regions is not None and args.regions < 1:
        raise ParameterError(f"--regions must be at least 1, got {args.regions}")
    on_worker = getattr(args, "train_on", "client") == "worker"
    device = args.train_device
    if getattr(args, "gpu", False) and device == "auto":
        device = "cuda"
    if device.startswith("cuda") and not on_worker:
        from .ssi import resolve_device  # noqa: PLC0415

        try:
            resolve_device(device)
        except SsiDaskError:
            from .errors import DeviceError  # noqa: PLC0415

            raise DeviceError(
                "--gpu/--train-device cuda needs a CUDA GPU visible to torch on this machine; "
                "drop it, or train on a GPU worker with --scheduler ... --train-on worker"
            ) from None
    where = "a worker" if on_worker else f"this process ({device})"
    print(f"training SSI on {volume.path} {volume.shape} (seed {args.seed}) in {where}")
    started = time.perf_counter()
    options = {"steps": args.steps} if args.steps else {}
    if args.restarts is not None:
        if args.restarts < 0:
            raise ParameterError(f"--restarts must be >= 0, got {args.restarts}")
        options["restarts"] = args.restarts
    for name, key in (
        ("ensemble", "ensemble"),
        ("patch_size", "patch_size"),
        ("batch_size", "batch_size"),
        ("net_depth", "depth"),
        ("base_channels", "base_channels"),
    ):
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise ParameterError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
            options[key] = value
    options["sensor_clipping"] = parse_clipping(getattr(args, "clipping", "auto"))
    model = train(
        volume.data,
        psf,
        seed=args.seed,
        device=device,
        n_regions=args.regions or DEFAULT_REGIONS,
        region_shape=parse_chunks(args.region_size, volume.ndim),
        background=args.background,
        client=client,
        on_worker=on_worker,
        progress=True,
        **options,
    )
    info = model.training["sampling"]
    print(
        f"sampled {info['candidates']} regions of {tuple(info['region_shape'])} "
        f"({100 * info['sampled_fraction']:.1f} % of the volume's voxels, overlaps counted), "
        f"kept {info['kept']}, "
        f"{info['rejected_as_background']} rejected as background"
    )
    print(f"trained in {time.perf_counter() - started:.0f} s")
    return model


def _train_command(args: argparse.Namespace) -> int:
    from .io import open_volume  # noqa: PLC0415
    from .psf import load_psf  # noqa: PLC0415
    from .ssi import save_checkpoint  # noqa: PLC0415

    parse_clipping(args.clipping)  # a bad value fails before any work
    out = Path(args.out)
    check_replaceable_file(out, overwrite=args.overwrite, inputs=[args.input, *_psf_files(args)])
    if not out.parent.exists():
        raise ParameterError(f"the folder of {str(out)!r} does not exist; create it first")
    volume = open_volume(args.input)
    psf = load_psf(args.psf, volume.ndim)
    if args.train_on == "worker" and not (args.scheduler or args.scheduler_file):
        raise ParameterError("--train-on worker needs --scheduler or --scheduler-file")
    if args.scheduler or args.scheduler_file:
        from .cluster import dask_client  # noqa: PLC0415

        with dask_client(
            args.scheduler,
            scheduler_file=args.scheduler_file,
            connect_timeout=args.connect_timeout,
        ) as client:
            workers = len(client.scheduler_info().get("workers", {}))
            print(f"dask: {workers} workers read the training regions")
            model = _train_model(args, volume, psf, client=client)
    else:
        model = _train_model(args, volume, psf)
    digest = save_checkpoint(model, out)
    print(f"wrote {out} (sha256 {digest[:16]}, halo {model.halo})")
    return 0


@contextlib.contextmanager
def run_client(args: argparse.Namespace) -> Iterator[Any]:
    """The Dask client of a ``run``: its cluster options, and the dashboard address printed."""
    from .cluster import dashboard_link, dask_client  # noqa: PLC0415

    with dask_client(
        args.scheduler,
        scheduler_file=args.scheduler_file,
        n_workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        gpu=args.gpu,
        connect_timeout=args.connect_timeout,
    ) as client:
        link = dashboard_link(client)
        workers = len(client.scheduler_info().get("workers", {}))
        print(f"dask: {workers} workers" + (f", dashboard at {link}" if link else ""))
        since = time.time()
        yield client
        # reached only when the run finished (a failed one ends with its one error line)
        from .blockwise import negative_input_warning  # noqa: PLC0415

        warning = negative_input_warning(client, float(getattr(args, "offset", 0.0)), since)
        if warning:
            print(warning, file=sys.stderr)


def check_local_memory(args: argparse.Namespace, plan: Any = None, model: Any = None) -> None:
    """Refuse a ``--memory-limit`` too small for the run before the local cluster starts.

    Without ``plan``, only the worker's baseline is checked (SSI, before training). With
    ``--scheduler``/``--scheduler-file`` the workers' limits are theirs: nothing to check;
    with ``--gpu`` only that the value can be read (the tasks' memory is on the device).
    """
    from .cluster import check_worker_memory, local_memory_limit  # noqa: PLC0415

    if args.scheduler or args.scheduler_file:
        return
    if plan is None and args.method != "ssi":  # nothing to do before training
        return
    if args.gpu:
        local_memory_limit(args.memory_limit, args.threads_per_worker)
        return
    task_bytes = 0
    if plan is not None and args.method == "ssi" and model is not None:
        from .ssi.tiling import CPU_BUDGET_BYTES, bytes_per_voxel  # noqa: PLC0415

        padded = math.prod(w + 2 * d for w, d in zip(plan.working_chunks, plan.depth))
        network = getattr(model, "network", model)
        # the block in and out (as for LR) plus the network's activations, at most its budget
        task_bytes = 12 * padded + min(CPU_BUDGET_BYTES, padded * bytes_per_voxel(network))
    elif plan is not None:
        task_bytes = plan.memory_per_task
    check_worker_memory(args.memory_limit, args.threads_per_worker, task_bytes, method=args.method)


def _run_command(args: argparse.Namespace) -> int:
    from .blockwise import (  # noqa: PLC0415
        METHOD_BOUNDARY,
        chunk_grid,
        computation_provenance,
        deconvolve,
        parse_chunks,
        plan_blocks,
    )
    from .chunkfiles import input_reference, missing_input_chunks  # noqa: PLC0415
    from .io import check_output_path, open_volume  # noqa: PLC0415
    from .ome import is_ome_zarr  # noqa: PLC0415
    from .ome_run import check_not_ome_options, parse_voxel_size, resolve_psfs  # noqa: PLC0415
    from .store import (  # noqa: PLC0415
        check_resume,
        check_shard_alignment,
        output_provenance,
        recorded_chunks,
        write_zarr,
    )
    from .summary import ChunkProgress, run_summary  # noqa: PLC0415

    if args.resume and args.overwrite:
        raise ParameterError("--resume keeps OUTPUT and --overwrite deletes it; give only one")
    if args.repair and not args.resume:
        raise ParameterError("--repair checks an existing OUTPUT; give it together with --resume")
    parse_clipping(args.clipping)  # a bad value fails before any work
    if is_ome_zarr(args.input) or args.output_format == "ome-zarr":
        if args.resume:
            raise ParameterError(
                "--resume is not supported for OME-Zarr outputs yet; re-run with --overwrite"
            )
        from .ome_run import plain_as_ome, run_ome  # noqa: PLC0415

        if is_ome_zarr(args.input):
            return run_ome(args)
        check_not_ome_options(args)
        return run_ome(args, image=plain_as_ome(args))  # a plain array or TIFF as OME-Zarr
    check_not_ome_options(args)
    volume = open_volume(args.input)
    voxel_size = parse_voxel_size(args.voxel_size, volume.ndim)
    psfs, psf_info = resolve_psfs(args, volume.ndim, voxel_size, image_shape=volume.shape)
    psf = psfs[0]
    if args.resume and Path(args.output).exists():
        output = Path(args.output).resolve()  # write_zarr checks it belongs to this run
    else:
        output = check_output_path(
            args.output,
            input_path=[volume.path, *_psf_files(args), args.model],
            overwrite=args.overwrite,
        )
    iterations = _parse_iterations(args.iterations)
    lr_options = _lr_options(args)
    offset = _offset(args)
    auto = iterations == "auto"
    if auto and args.method != "lr":
        raise ParameterError("--iterations auto applies to --method lr only")
    if auto and args.resume:
        raise ParameterError(
            "--resume needs a fixed --iterations; give the count the first run chose "
            "(ssi_dask.iterations in OUTPUT's attributes)"
        )
    if auto:
        iterations = 1  # plan (and check the chunks) for now; re-planned once chosen
    depth = _parse_depth(args.depth, volume.ndim)
    check_local_memory(args)  # a limit below a worker's baseline fails before any training
    model = None
    if args.method == "ssi":
        model = _ssi_model_for_run(args, volume, psf)
        if depth is None:
            depth = (model.halo,) * volume.ndim
    elif args.model or args.save_model:
        raise ParameterError("--model and --save-model apply to --method ssi only")
    plan = plan_blocks(
        volume.shape,
        volume.data.dtype,
        psf.shape,
        num_iter=iterations,
        store_chunks=volume.store_chunks,
        chunks=args.chunks,
        output_chunks=args.output_chunks,
        depth=depth,
        alignment=model.alignment if model is not None else 1,
        boundary=METHOD_BOUNDARY[args.method],
        back_projector=lr_options.get("back_projector", "classic"),
        psf=psf if model is None else None,
        back_projector_options=lr_options,
    )
    zarr_format = args.zarr_format or volume.zarr_format or 3
    shards = parse_chunks(args.output_shards, volume.ndim)
    if args.shards:
        if shards is not None:
            raise ParameterError("give --shards or --output-shards SPEC, not both")
        shards = plan.working_chunks
    check_shard_alignment(
        chunk_grid(plan.shape, plan.working_chunks),
        plan.output_chunks,
        shards,
        plan.shape,
        zarr_format,
    )
    print(f"ssi-dask {__version__}: {args.method} on {volume.path} -> {output}")
    print(
        f"  input           {plan.shape} {volume.data.dtype}, stored in chunks "
        f"{volume.store_chunks}"
    )
    print(
        f"  output          {plan.shape} float32, Zarr v{zarr_format}, chunks "
        f"{plan.output_chunks}" + (f", shards {shards}" if shards else "")
    )
    print(plan.summary())
    missing_input = missing_input_chunks(volume.path)  # one listing of the input store
    if missing_input is not None and missing_input.count:
        print(f"  {missing_input.warning()}")
    if auto:
        print("  iterations      auto: chosen before the run (halo above for 1 iteration)")
    provenance = {
        "ssi_dask": {
            "version": __version__,
            "method": args.method,
            "psf": psf_info[0],
            "input": volume.path,
            "depth": list(plan.depth),
            "working_chunks": list(plan.working_chunks),
            "command": " ".join(sys.argv[1:]) if sys.argv else "",
        }
    }
    if model is None:
        from .lr import resolve_back_projector  # noqa: PLC0415

        provenance["ssi_dask"]["iterations"] = iterations
        spec = resolve_back_projector(psf, **lr_options)
        provenance["ssi_dask"].update(spec.as_dict())
        if offset:
            provenance["ssi_dask"]["offset"] = offset
    else:
        provenance["ssi_dask"]["model"] = _model_summary(model, args)
    if args.resume and output.exists() and (model is None or args.model or not args.dry_run):
        computation = computation_provenance(
            volume,
            psf,
            method=args.method,
            num_iter=iterations,
            depth=plan.depth,
            working_chunks=plan.working_chunks,
            options=lr_options,
            model=model,
        )
        layout = output_provenance(
            provenance,
            shape=plan.shape,
            grid=chunk_grid(plan.shape, plan.working_chunks),
            output_chunks=plan.output_chunks,
            output_shards=shards,
            zarr_format=zarr_format,
            computation=computation,
        )
        existing = check_resume(  # before any work
            output,
            layout,
            input_path=volume.path,
            input_reference=input_reference(volume, plan.depth),
        )
        done = recorded_chunks(output, existing)
        print(f"  resume          {done} of {plan.n_chunks} chunks already written")
    check_local_memory(args, plan, model)
    if args.dry_run:
        print("dry run: nothing computed or written")
        return 0
    # The client logs its own view of a lost scheduler or worker (with tracebacks); this
    # command reports those cases itself in one line, keeping the progress for --resume.
    import distributed  # noqa: F401, PLC0415  (its import sets the logging levels first)

    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.perf_counter()
    with run_client(args) as client:
        if auto:
            from .lr import resolve_back_projector  # noqa: PLC0415

            plan, choice = _choose_iterations(args, volume, psf, lr_options, plan, depth)
            iterations = choice.num_iter
            provenance["ssi_dask"]["iterations"] = iterations
            provenance["ssi_dask"]["auto_iterations"] = choice.as_dict()
            provenance["ssi_dask"].update(resolve_back_projector(psf, **lr_options).as_dict())
            provenance["ssi_dask"]["depth"] = list(plan.depth)
            provenance["ssi_dask"]["working_chunks"] = list(plan.working_chunks)
        result = deconvolve(
            volume,
            psf,
            method=args.method,
            num_iter=iterations if args.method == "lr" else None,
            chunks=plan.working_chunks,
            depth=plan.depth,
            device="gpu" if args.gpu else "cpu",
            model=model,
            **({"offset": offset} if offset else {}),
            **lr_options,
        )
        write_zarr(
            result,
            output,
            output_chunks=plan.output_chunks,
            zarr_format=zarr_format,
            attrs=provenance,
            input_path=[volume.path, *_psf_files(args), args.model],
            overwrite=args.overwrite,
            client=client,
            progress=False if args.no_progress else ChunkProgress(math.prod(volume.shape)),
            resume=args.resume,
            output_shards=shards,
            worker_timeout=args.worker_timeout,
            repair=args.repair,
        )
    elapsed = time.perf_counter() - started
    print(
        run_summary(
            output=str(output),
            shape=volume.shape,
            seconds=elapsed,
            method=args.method,
            chunks=math.prod(result.numblocks),
            ome_zarr=False,
        )
    )
    if missing_input is not None and missing_input.count:
        print(missing_input.warning())
    return 0


def _choose_iterations(args: argparse.Namespace, volume, psf, lr_options: dict, plan, depth):
    """``--iterations auto``: choose on sampled chunks (on the cluster), print, re-plan.

    Updates ``lr_options`` with the chosen Wiener alpha; returns the new plan and the
    :class:`~ssi_dask.lr_auto.AutoChoice`.
    """
    from .blockwise import METHOD_BOUNDARY, plan_blocks, shifted_by_offset  # noqa: PLC0415
    from .lr_auto import DEFAULT_MAX_ITER, choose_iterations  # noqa: PLC0415

    back_projector = lr_options.get("back_projector", "classic")

    def plan_for(num_iter: int):
        return plan_blocks(
            volume.shape,
            volume.data.dtype,
            psf.shape,
            num_iter=num_iter,
            store_chunks=volume.store_chunks,
            chunks=args.chunks,
            output_chunks=args.output_chunks,
            depth=depth,
            boundary=METHOD_BOUNDARY["lr"],
            back_projector=back_projector,
            psf=psf,
            back_projector_options=lr_options,
        )

    max_iter = args.auto_max_iterations or DEFAULT_MAX_ITER[back_projector]
    if args.chunks is not None and depth is None:
        # with the user's chunks, only try counts whose halo fits them (the halo grows with n,
        # so bisect: each plan measures the halo for its n on the PSF)
        def fits(num_iter: int) -> bool:
            try:
                plan_for(num_iter)
            except ParameterError:
                return False
            return True

        fitting = max_iter
        if not fits(max_iter):
            low, high = 1, max_iter  # the largest count that fits lies in [low, high)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle) else (low, middle)
            fitting = low
        if fitting < max_iter:
            print(f"auto iterations: trying 1..{fitting} (the halo of more exceeds --chunks)")
        max_iter = fitting
    started = time.perf_counter()
    choice = choose_iterations(
        shifted_by_offset(volume.data, _offset(args)),
        psf,
        max_iter=max_iter,
        n_samples=args.auto_samples,
        seed=args.seed,
        **lr_options,
    )
    print(f"{choice.summary()} in {time.perf_counter() - started:.1f} s")
    if choice.wiener_alpha is not None:
        lr_options["wiener_alpha"] = choice.wiener_alpha
    plan = plan_for(choice.num_iter)
    print(f"  halo (depth)    {plan.depth} for {choice.num_iter} iterations")
    check_local_memory(args, plan)  # the chosen count's halo makes the tasks larger
    return plan, choice


def _ssi_model_for_run(args: argparse.Namespace, volume, psf):
    """The model for ``run --method ssi``: loaded from --model, or trained on the input now."""
    from .ssi import load_checkpoint, save_checkpoint  # noqa: PLC0415

    if args.model:
        model = load_checkpoint(args.model)
        if model.ndim != volume.ndim:
            from .errors import CheckpointError  # noqa: PLC0415

            raise CheckpointError(
                f"checkpoint {args.model!r} is for {model.ndim}D images but the input is "
                f"{volume.ndim}D; train a model on this data (ssi-dask train)"
            )
        return model
    if args.dry_run:
        from .ssi import DEFAULTS, UNet  # noqa: PLC0415

        defaults = DEFAULTS[volume.ndim]
        return UNet(volume.ndim, depth=defaults["depth"], base_channels=defaults["base_channels"])
    if args.save_model:
        model_path, output_path = resolved(args.save_model), resolved(args.output)
        if model_path == output_path or output_path in model_path.parents:
            raise ParameterError(
                f"--save-model {args.save_model!r} is OUTPUT or inside it; save the model "
                "outside the output"
            )
        check_replaceable_file(
            args.save_model,
            overwrite=args.overwrite,
            inputs=[args.input, *_psf_files(args)],
        )
    model = _train_model(args, volume, psf)
    if args.save_model:
        digest = save_checkpoint(model, args.save_model)
        print(f"saved the model to {args.save_model} (sha256 {digest[:16]})")
    return model


def _model_summary(model, args: argparse.Namespace) -> dict:
    from .ssi import model_hash  # noqa: PLC0415

    if not hasattr(model, "network"):  # --dry-run without --model: the untrained architecture
        return {
            "source": "to be trained by this run (not trained in a dry run)",
            "seed": args.seed,
            "halo": model.halo,
        }
    return {
        "sha256": model_hash(model),
        "source": str(Path(args.model).resolve()) if args.model else "trained by this run",
        "seed": args.seed if not args.model else model.training.get("seed"),
        "halo": model.halo,
        "architecture": model.config,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssi-dask`` command; returns the exit status."""
    from .extras import check_command  # noqa: PLC0415
    from .quiet import quiet_libraries  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_libraries():  # library warnings and logs do not break the one-line errors
            check_command(args)  # a missing extra (torch for SSI...) in one line, up front
            return int(args.handler(args) or 0)
    except SsiDaskError as exc:
        print(f"ssi-dask: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ssi-dask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
