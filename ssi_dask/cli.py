"""The ``ssi-dask`` command line.

Errors a user can cause are printed as one line on stderr with a non-zero exit status and
no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .config import (
    DEFAULT_AUTO_MAX_ITER,
    DEFAULT_AUTO_SAMPLES,
    DEFAULT_BACKGROUND,
    DEFAULT_ENSEMBLE,
    DEFAULT_NUM_ITER,
    DEFAULT_REFRACTIVE_INDEX,
    DEFAULT_REGIONS,
    DEFAULT_RESTARTS,
    DEFAULT_TARGET_VOXELS,
    OUTPUT_DTYPES,
    PSF_ENERGY_FRACTION,
    WB_DEFAULT_ALPHA,
    WB_DEFAULT_ORDER,
    ClusterSettings,
    Job,
    LayoutSettings,
    LRSettings,
    PSFSettings,
    SSISettings,
    TrainSettings,
    cli_message,
    default_of,
    ssi_default_text,
    voxels_text,
)
from .errors import ParameterError, PSFError, SsiDaskError
from .safety import check_replaceable_file


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
        default=DEFAULT_REFRACTIVE_INDEX,
        help=f"without --psf: immersion refractive index (default: {DEFAULT_REFRACTIVE_INDEX})",
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
        default=default_of(ClusterSettings, "threads_per_worker"),
        metavar="N",
        help="local cluster: threads per worker (default: %(default)s)",
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
        default=default_of(ClusterSettings, "worker_timeout"),
        metavar="SECONDS",
        help="give up, keeping the progress for --resume, when no worker has been connected "
        "for this long (default: %(default)g)",
    )
    group.add_argument(
        "--connect-timeout",
        type=float,
        default=default_of(ClusterSettings, "connect_timeout"),
        metavar="SECONDS",
        help="seconds to wait for a remote scheduler (default: %(default)g)",
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
        help=f"wiener-butterworth: Wiener parameter (default: {WB_DEFAULT_ALPHA}, or chosen by "
        "--iterations auto)",
    )
    group.add_argument(
        "--butterworth-order",
        type=float,
        metavar="P",
        help=f"wiener-butterworth: order of the Butterworth filter (default: {WB_DEFAULT_ORDER})",
    )
    group.add_argument(
        "--cutoff",
        metavar="F",
        help="wiener-butterworth: cut-off in cycles per pixel, one value or one per axis "
        "(default: where the OTF falls to 5%% of its peak)",
    )
    group.add_argument(
        "--acceleration",
        choices=["none", "nesterov"],
        default="none",
        help="classic: nesterov starts each iteration from the estimate extrapolated along "
        "its last step (the same restoration in 3-6x fewer iterations on 3D widefield data, "
        "more noise past the best count; default: none)",
    )
    group.add_argument(
        "--auto-max-iterations",
        type=int,
        metavar="N",
        help="--iterations auto: largest count tried (default: "
        f"{DEFAULT_AUTO_MAX_ITER['classic']} classic, "
        f"{DEFAULT_AUTO_MAX_ITER['wiener-butterworth']} wiener-butterworth)",
    )
    group.add_argument(
        "--auto-samples",
        type=int,
        default=DEFAULT_AUTO_SAMPLES,
        metavar="N",
        help="--iterations auto: chunks sampled from the volume "
        f"(default: {DEFAULT_AUTO_SAMPLES}; seeded by --seed)",
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
    if args.acceleration != "none":
        options["acceleration"] = args.acceleration
    if options and args.method != "lr":
        raise ParameterError("--back-projector and its options apply to --method lr only")
    wiener_options = {"wiener_alpha", "butterworth_order", "cutoff"} & set(options)
    if options.get("back_projector") is None and wiener_options:
        raise ParameterError(
            "--wiener-alpha, --butterworth-order and --cutoff need "
            "--back-projector wiener-butterworth"
        )
    try:  # the library's own checks, with its parameter names mapped to flags
        LRSettings(**options)
    except ParameterError as exc:
        raise ParameterError(cli_message(str(exc))) from None
    return options


def _parse_level(text: str | None) -> int | None:
    """``--skip-background-level N`` as an int (LayoutSettings checks its range)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ParameterError(
            f"--skip-background-level must be a pyramid level >= 1, got {text!r}"
        ) from None


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
        "--steps",
        type=int,
        metavar="N",
        help=f"training steps (default: {ssi_default_text('steps')})",
    )
    group.add_argument(
        "--restarts",
        type=int,
        metavar="N",
        help="extra runs with other seeds when a run fails its self-supervised check "
        "(validation loss, or its output flagged clipped / underfit; every run is checked) "
        f"(default: {DEFAULT_RESTARTS})",
    )
    group.add_argument(
        "--ensemble",
        type=int,
        metavar="N",
        help="networks trained with different seeds and averaged: less variation between "
        f"seeds, N times the compute (default: {DEFAULT_ENSEMBLE})",
    )
    group.add_argument(
        "--patch-size",
        type=int,
        metavar="N",
        help=f"training patch side (default: {ssi_default_text('patch_size')})",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"patches per step (default: {ssi_default_text('batch_size')})",
    )
    group.add_argument(
        "--net-levels",
        type=int,
        metavar="N",
        help=f"UNet resolution levels (default: {ssi_default_text('levels')})",
    )
    group.add_argument("--net-depth", dest="net_levels", type=int, help=argparse.SUPPRESS)
    group.add_argument(
        "--base-channels",
        type=int,
        metavar="N",
        help=f"UNet channels at full resolution (default: {ssi_default_text('base_channels')})",
    )
    group.add_argument(
        "--lr-prior",
        metavar="N|auto",
        help="Lucy-Richardson prior: the network also sees the Lucy-Richardson restoration "
        "after N iterations and learns a correction to it; auto: N chosen from the data, "
        f"0: none (default: {ssi_default_text('lr_prior')})",
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


def parse_lr_prior(spec: str | None) -> int | str | None:
    """``--lr-prior``: "auto" or an iteration count (None: the recipe's default)."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ParameterError(
            f"lr_prior must be an iteration count >= 0 or 'auto', got {spec!r}"
        ) from None


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
        help=f"regions sampled across the volume for training (default: {DEFAULT_REGIONS})",
    )
    group.add_argument(
        "--region-size",
        metavar="SPEC",
        help="size of each region, e.g. 96 or 48,96,96 (default: two training patches)",
    )
    group.add_argument(
        "--background",
        type=float,
        default=DEFAULT_BACKGROUND,
        metavar="F",
        help="reject regions whose 99th percentile is below lo + F * (hi - lo) of the "
        f"global range as empty background (default: {DEFAULT_BACKGROUND}; 0 keeps all)",
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
        "without it, --na and --wavelength compute one at the image's voxel size; with "
        "--method ssi --model, the PSF stored in the checkpoint is used (a different --psf "
        "is refused)",
    )
    run.add_argument(
        "--method",
        choices=["lr", "ssi"],
        default="lr",
        help="lr: Lucy-Richardson; ssi: Self-Supervised Inversion (trains on the input first "
        "unless --model is given) (default: %(default)s)",
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
    run.add_argument(
        "--tta",
        type=int,
        metavar="N",
        help="ssi: test-time transforms averaged per chunk, 1, 2, 4, 8 or 16 of the PSF's "
        f"symmetries (quality per compute: benchmarks/RESULTS.md; default: "
        f"{ssi_default_text('tta')})",
    )
    _add_training_options(run)
    _add_sampling_options(run)
    run.add_argument(
        "--chunks",
        metavar="SPEC",
        help="working chunk shape, e.g. 64,256,256 or 256 for every axis (default: grown from "
        f"the input's chunks to ~{voxels_text(DEFAULT_TARGET_VOXELS[3])} voxels in 3D, "
        f"{voxels_text(DEFAULT_TARGET_VOXELS[2])} in 2D)",
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
    run.add_argument(
        "--output-dtype",
        choices=OUTPUT_DTYPES,
        default=LayoutSettings.output_dtype,
        help="stored type of the result (default: %(default)s); float16 halves and uint16 "
        "(rounded, CF scale_factor/add_offset recorded) halves the output too; values outside "
        "the type's range are clipped and counted in the summary; same: the input's type",
    )
    run.add_argument(
        "--skip-background",
        type=float,
        metavar="THRESHOLD",
        help="LR, Zarr input: write chunks whose input (with halo) is at most THRESHOLD "
        "everywhere as their background value without computing them (counted in the summary)",
    )
    run.add_argument(
        "--skip-background-level",
        type=str,  # parsed in job_from_args: a bad value is one line, not argparse's usage
        metavar="N",
        help="with --skip-background and an OME-Zarr input: decide from the input's pyramid "
        "level N first (a chunk it calls background is written without reading its "
        "full-resolution input; approximate at that level's resolution, see README)",
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
        metavar="NZ,NY,NX",
        help="PSF size in voxels: 'nz,ny,nx' (3D) or 'ny,nx' (2D); lateral sizes equal and odd "
        f"(default: the smallest lateral size holding {100 * PSF_ENERGY_FRACTION:g}%% of the "
        "energy on a large grid, and +-3 n lambda/NA^2 planes in 3D; a --shape holding less "
        "is written with a warning)",
    )
    psf.add_argument(
        "--refractive-index",
        type=float,
        default=DEFAULT_REFRACTIVE_INDEX,
        help=f"immersion refractive index (default: {DEFAULT_REFRACTIVE_INDEX}, water)",
    )
    psf.add_argument(
        "--sample-index",
        type=float,
        help="sample refractive index (default: the immersion index, no aberration)",
    )
    psf.add_argument(
        "--z-offset",
        type=float,
        default=0.0,
        help="2D only: defocus of the plane in micrometres (default: %(default)g)",
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
        "every run is self-checked (validation loss; output clipped or underfit) and a failed "
        "run is retried with another seed. "
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
        help="client: train in this process; worker: on a worker of the cluster, e.g. a "
        "`dask cuda worker` (needs --scheduler) (default: %(default)s)",
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
        help="compare Lucy-Richardson and SSI on a generated microscopy-like scene",
        description="Degrade a ground truth with the benchmark protocol (widefield ring PSF, "
        "Poisson-Gaussian noise, salt and pepper, 10-bit quantisation), restore it with LR at "
        "2/5/10/20 iterations and with SSI, print PSNR/SSIM/MI/SMI (each explained) and SSI's "
        "margin over the best LR, and write a PNG figure (zoomed insets, a line profile) and a "
        "JSON of the metrics into DIR.",
    )
    demo.add_argument(
        "--dim", type=int, choices=[2, 3], default=2, help="2D image or 3D volume (default: 2)"
    )
    demo.add_argument(
        "--image",
        metavar="PATH",
        help="ground-truth image (PNG/TIFF; default: a generated scene of nuclei, vesicles and "
        "filaments, 256x256 in 2D, 32x96x96 in 3D)",
    )
    demo.add_argument(
        "--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)"
    )
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
    from .psf import (  # noqa: PLC0415
        energy_held,
        energy_psf_shape,
        save_psf,
        widefield_psf,
    )

    out = Path(args.output)
    if out.suffix.lower() not in (".tif", ".tiff", ".npy"):
        raise PSFError(f"cannot write a PSF to {out.suffix!r}; name the output .tif, .tiff or .npy")
    try:
        check_replaceable_file(out, overwrite=args.overwrite)
    except SsiDaskError as exc:
        raise PSFError(str(exc)) from None
    voxel_size = _parse_floats(args.voxel_size, "--voxel-size")
    optics = dict(
        na=args.na,
        wavelength=args.wavelength,
        refractive_index=args.refractive_index,
        sample_index=args.sample_index,
        z_offset=args.z_offset,
        model=args.model,
    )
    if len(voxel_size) not in (2, 3):
        raise PSFError("give 2 or 3 sizes for --voxel-size (dy,dx or dz,dy,dx)")
    fraction = 100 * PSF_ENERGY_FRACTION
    if args.shape is None:
        shape, held = energy_psf_shape(voxel_size, **optics)
        note = f"{100 * held:.1f} % of the energy; the default shape holds at least {fraction:g} %"
    else:
        shape = tuple(int(v) for v in _parse_floats(args.shape, "--shape"))
        if len(shape) != len(voxel_size):
            raise PSFError("give as many sizes for --shape as for --voxel-size")
        widefield_psf(shape, voxel_size, **optics)  # bad shapes fail before the large grid
        held = energy_held(shape, voxel_size, **optics)
        note = f"{100 * held:.1f} % of the energy"
        if held < PSF_ENERGY_FRACTION:
            best, _ = energy_psf_shape(voxel_size, **optics)
            print(
                f"warning: --shape {args.shape} holds only {100 * held:.1f} % of the PSF's "
                f"energy (measured on a large grid): the rest is cut off; the default shape "
                f"{','.join(map(str, best))} holds {fraction:g} %: leave out --shape or enlarge it",
                file=sys.stderr,
            )
    psf = widefield_psf(shape, voxel_size, **optics)
    save_psf(out, psf, voxel_size)
    print(f"wrote {out} {psf.shape}, sum 1, holding {note}")
    return 0


#: TrainSettings fields whose flag is not ``--`` + the name with dashes.
TRAIN_FLAGS = {"device": "--train-device", "region_size": "--region-size"}


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The SSI training flags as :class:`~ssi_dask.config.TrainSettings` (checked by name)."""
    try:
        return _train_settings(args)
    except ParameterError as exc:
        name = str(exc).split(" ", 1)[0]  # the settings' messages start with the field's name
        if name in {f.name for f in dataclasses.fields(TrainSettings)}:
            flag = TRAIN_FLAGS.get(name, "--" + name.replace("_", "-"))
            raise ParameterError(flag + str(exc)[len(name) :]) from None
        raise


def _train_settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        seed=args.seed,
        steps=args.steps,
        restarts=args.restarts,
        ensemble=args.ensemble,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        net_levels=args.net_levels,
        base_channels=args.base_channels,
        lr_prior=parse_lr_prior(args.lr_prior),
        clipping=parse_clipping(args.clipping),
        device=args.train_device,
        regions=args.regions if args.regions is not None else DEFAULT_REGIONS,
        region_size=args.region_size,
        background=args.background,
        on_worker=getattr(args, "train_on", "client") == "worker",
    )


def _train_command(args: argparse.Namespace) -> int:
    from .io import open_volume  # noqa: PLC0415
    from .pipeline import train_model  # noqa: PLC0415
    from .psf import load_psf  # noqa: PLC0415
    from .ssi import save_checkpoint  # noqa: PLC0415

    settings = train_settings(args)  # bad values fail before any work
    out = Path(args.out)
    check_replaceable_file(out, overwrite=args.overwrite, inputs=[args.input, *_psf_files(args)])
    if not out.parent.exists():
        raise ParameterError(f"the folder of {str(out)!r} does not exist; create it first")
    volume = open_volume(args.input)
    psf = load_psf(args.psf, volume.ndim)
    if settings.on_worker and not (args.scheduler or args.scheduler_file):
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
            model = train_model(volume, psf, settings, client=client, gpu=args.gpu)
    else:
        model = train_model(volume, psf, settings, gpu=args.gpu)
    digest = save_checkpoint(model, out)
    print(f"wrote {out} (sha256 {digest[:16]}, halo {model.halo})")
    return 0


def job_from_args(args: argparse.Namespace) -> Job:
    """The ``run`` flags as a :class:`~ssi_dask.config.Job`: the library never sees ``args``."""
    from .blockwise import check_offset  # noqa: PLC0415

    iterations = _parse_iterations(args.iterations)
    options = _lr_options(args)
    try:
        offset = check_offset(getattr(args, "offset", 0.0))
    except ParameterError:
        raise ParameterError(f"--offset must be a finite number, got {args.offset}") from None
    if args.method != "lr":
        if offset:
            raise ParameterError("--offset applies to --method lr only")
        if iterations == "auto":
            raise ParameterError("--iterations auto applies to --method lr only")
    elif args.model or args.save_model:
        raise ParameterError("--model and --save-model apply to --method ssi only")
    elif args.tta is not None:
        raise ParameterError("--tta applies to --method ssi only")
    lr = LRSettings()
    if args.method == "lr":
        auto_options = {"n_samples": args.auto_samples}
        if args.auto_max_iterations is not None:
            auto_options["max_iter"] = args.auto_max_iterations
        lr = LRSettings(
            num_iter=iterations,
            offset=offset,
            auto_options=auto_options if iterations == "auto" else None,
            **options,
        )
    wavelengths = _parse_floats(args.wavelength, "--wavelength") if args.wavelength else ()
    psf_shape = (
        tuple(int(v) for v in _parse_floats(args.psf_shape, "--psf-shape"))
        if args.psf_shape
        else None
    )
    depth = None
    if args.depth is not None:
        depth = _parse_depth(args.depth, len(args.depth.split(",")))
        depth = depth[0] if len(depth) == 1 else depth
    voxel_size = None
    if args.voxel_size is not None:
        voxel_size = _parse_floats(args.voxel_size, "--voxel-size")
        if min(voxel_size) <= 0 or not all(math.isfinite(v) for v in voxel_size):
            raise ParameterError(
                f"--voxel-size needs positive values in micrometres, got {args.voxel_size!r}"
            )
    channels = None
    if args.channel is not None:
        channels = tuple(part.strip() for part in args.channel.split(",") if part.strip())
    return Job(
        input=args.input,
        output=args.output,
        method=args.method,
        lr=lr,
        ssi=SSISettings(
            model=args.model,
            save_model=args.save_model,
            train=train_settings(args),
            tta=args.tta,
        ),
        psf=PSFSettings(
            files=tuple(_psf_files(args)),
            na=args.na,
            wavelength=tuple(wavelengths),
            refractive_index=args.refractive_index,
            shape=psf_shape,
        ),
        layout=LayoutSettings(
            chunks=args.chunks,
            output_chunks=args.output_chunks,
            depth=depth,
            output_shards=args.output_shards,
            shards=args.shards,
            zarr_format=args.zarr_format,
            output_format=args.output_format,
            output_dtype=args.output_dtype,
            skip_background=args.skip_background,
            skip_background_level=_parse_level(args.skip_background_level),
        ),
        cluster=ClusterSettings(
            scheduler=args.scheduler,
            scheduler_file=args.scheduler_file,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit,
            gpu=args.gpu,
            worker_timeout=args.worker_timeout,
            connect_timeout=args.connect_timeout,
        ),
        level=args.level or 0,
        channels=channels,
        voxel_size=voxel_size,
        overwrite=args.overwrite,
        resume=args.resume,
        repair=args.repair,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        command=" ".join(sys.argv[1:]) if sys.argv else "",
    )


def _run_command(args: argparse.Namespace) -> int:
    from .pipeline import run  # noqa: PLC0415

    def echo(line: str) -> None:  # warnings name parameters: mapped to flags
        print(cli_message(line) if line.lstrip().startswith("warning:") else line)

    report = run(job_from_args(args), echo=echo)  # errors: main() maps them to flags
    if report.dry_run:
        return 0
    print(report.summary())
    for line in report.warnings:
        line = cli_message(line)
        print(line, file=sys.stderr if "below 0" in line else sys.stdout)
    return 0


def check_command(args: argparse.Namespace) -> None:
    """Before a command starts: stop in one line if its optional dependencies are missing."""
    from .extras import require  # noqa: PLC0415

    command = getattr(args, "command", None)
    if command == "train" or (command == "run" and getattr(args, "method", "lr") == "ssi"):
        what = "ssi-dask train" if command == "train" else "ssi-dask run --method ssi"
        require(what, "torch")
    elif command == "demo":
        require("ssi-dask demo", "torch", "matplotlib", "skimage")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssi-dask`` command; returns the exit status."""
    from .quiet import quiet_libraries  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_libraries():  # library warnings and logs do not break the one-line errors
            check_command(args)  # a missing extra (torch for SSI...) in one line, up front
            return int(args.handler(args) or 0)
    except SsiDaskError as exc:
        print(f"ssi-dask: error: {cli_message(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ssi-dask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
