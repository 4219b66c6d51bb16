"""A 3D benchmark that can separate methods (issue 16, item 3): SSI vs best-n LR.

Generated ground truths of several kinds (:func:`ssi_dask.bench.synthetic.structure_3d`:
filaments, shells/membranes, beads, blobs), ~128x256x256 by default (``--shape`` for a crop),
imaged by a widefield PSF at NA 1.2 (water, 0.52 um emission; ``--na``) sampled at 0.1 um
laterally (Nyquist: 0.108 um) with z steps of 0.3 um (3x; ``--z-step``) on a 17x31x31 support
(``--psf-shape``: the true PSF of the simulation, given to LR and SSI alike), at noise levels
of :data:`NOISE` (Poisson-Gaussian, no clipping: ``high`` = Poisson factor 0.001 and read
noise 0.05 of the range, ``low`` = 0.001 / 0.01, ``lower`` = 0.0003 / 0.003, ``very-low`` =
0.0002 / 0.002). The defaults (``very-low`` and ``lower``, LR counts 25-200) are where
Lucy-Richardson gains >= 3 dB over the input at 128x256x256 on filaments, blobs and shells
(beads: at ``very-low`` only; ``benchmarks/ssi_3d_levels.py``); at ``high`` and ``low`` it
gains too little to tell methods apart.
Each row reports the input, best-n Lucy-Richardson (an oracle choice of n), SSI with the
default recipe, and SSI's self-check (runs, flagged failed and retried); ``--tta-compare``
also scores SSI's output at other test-time transform counts, and ``--save-models`` keeps each
row's trained model (its checkpoint's sha256 in the JSON) for later analysis. A case only separates
methods when LR gains >= 3 dB over the input: the column says whether it does.

Usage::

    nice -n 19 python benchmarks/ssi_3d.py --kinds beads --noise very-low --json beads.json
    python benchmarks/ssi_3d.py --shape 32,128,128 --kinds blobs --noise high --steps 200
    nice -n 19 python benchmarks/ssi_3d.py --shape 32,64,64 --kinds filaments,shells \
        --noise very-low --density 4 --psf-shape 17,31,31 --steps 100 \
        --lr 2,5,10,20,50,100,200 --json benchmarks/ssi_3d_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Noise levels: (Poisson factor, read noise) in units of the range.
NOISE = {
    "high": (0.001, 0.05),
    "low": (0.001, 0.01),
    "lower": (0.0003, 0.003),
    "very-low": (0.0002, 0.002),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_volume_arguments(parser)
    parser.add_argument("--lr", default="25,50,100,200")
    parser.add_argument(
        "--lr-nesterov",
        help="also the best of Nesterov-accelerated LR over these counts, e.g. 10,20,30,40,60,80",
    )
    parser.add_argument("--steps", type=int, help="SSI training steps (default: the recipe's)")
    parser.add_argument(
        "--output-range",
        help="SSI's output clip range in normalised units, 'lo,hi' (default: the recipe's, "
        "'auto' = (0, 1 / PSF peak-to-sum); '0,1' = the old default, the input's 99.99th "
        "percentile)",
    )
    parser.add_argument(
        "--forward", help="SSI forward operator: auto, valid, same (default: the recipe's)"
    )
    parser.add_argument("--patch", type=int, help="SSI patch side (default: the recipe's)")
    parser.add_argument("--batch", type=int, help="SSI patches per step (default: the recipe's)")
    parser.add_argument(
        "--levels", type=int, help="SSI UNet resolution levels (default: the recipe's, 3)"
    )
    parser.add_argument("--learning-rate", type=float, help="SSI peak learning rate")
    parser.add_argument(
        "--average-fraction", type=float, help="SSI weight averaging: share of the last steps"
    )
    parser.add_argument(
        "--null-space-weight", type=float, help="SSI null-space penalty weight (default: auto)"
    )
    parser.add_argument(
        "--noise-penalty-weight",
        type=float,
        help="SSI noise-sensitivity penalty weight (the output's change when noise is added to "
        "the input, at poorly transmitted frequencies; default: the 3D recipe's, 0.2)",
    )
    parser.add_argument(
        "--noise-penalty-region",
        choices=("everywhere", "background", "interiors"),
        help="where the noise-sensitivity penalty counts (default: the 3D recipe's, interiors)",
    )
    parser.add_argument(
        "--lr-prior", help="SSI's lr_prior: a Lucy-Richardson iteration count or 'auto'"
    )
    parser.add_argument(
        "--lr-prior-max-iter", type=int, help="SSI's lr_prior_max_iter (default: the recipe's)"
    )
    parser.add_argument("--lr-prior-rule", choices=("one-se", "paired"), help="SSI's lr_prior_rule")
    parser.add_argument(
        "--lr-prior-acceleration",
        choices=("none", "nesterov"),
        help="SSI's lr_prior_acceleration (default: the recipe's)",
    )
    parser.add_argument("--prior-reuse", type=int, help="SSI's prior_reuse (default: the recipe's)")
    parser.add_argument(
        "--tta-compare",
        help="also score SSI with these test-time transform counts, e.g. 1,2,4,8,16",
    )
    parser.add_argument("--save-models", help="folder: each row's trained model, a checkpoint")
    parser.add_argument("--json")
    args = parser.parse_args()

    from ssi_dask.bench.metrics import psnr, ssim
    from ssi_dask.bench.protocol import run_outcome
    from ssi_dask.ssi import predict, save_checkpoint, train_ssi

    shape = tuple(int(v) for v in args.shape.split(","))
    psf = benchmark_psf(args.psf_shape, args.z_step, args.na)
    records = []
    for kind, seed, level, truth, noisy in benchmark_volumes(args, psf):
        row = {"kind": kind, "noise": level, "seed": seed, "shape": list(shape)}
        row.update(na=args.na, z_step=args.z_step, psf_shape=list(psf.shape))
        row.update(density=args.density, steps=args.steps or "recipe default")
        row["input"] = (
            psnr(truth, np.clip(noisy, 0, 1)),
            ssim(truth, np.clip(noisy, 0, 1)),
        )
        scores = lr_at_counts(
            noisy,
            psf,
            [int(v) for v in args.lr.split(",")],
            lambda x, truth=truth: (psnr(truth, x), ssim(truth, x)),
        )
        best = max(scores.items(), key=lambda item: item[1][0])  # first of equals
        row["best_lr_n"], row["best_lr"] = best
        if args.lr_nesterov:  # the accelerated Lucy-Richardson's oracle too
            scores = lr_at_counts(
                noisy,
                psf,
                [int(v) for v in args.lr_nesterov.split(",")],
                lambda x, truth=truth: (psnr(truth, x), ssim(truth, x)),
                acceleration="nesterov",
            )
            best = max(scores.items(), key=lambda item: item[1][0])
            row["best_lr_nesterov_n"], row["best_lr_nesterov"] = best
        options = {"steps": args.steps} if args.steps else {}
        if args.output_range:
            options["output_range"] = tuple(float(v) for v in args.output_range.split(","))
        row["output_range"] = options.get("output_range", "recipe default")
        for flag, key in (
            ("forward", "forward"),
            ("patch", "patch_size"),
            ("batch", "batch_size"),
            ("levels", "levels"),
            ("learning_rate", "learning_rate"),
            ("average_fraction", "average_fraction"),
            ("null_space_weight", "null_space_weight"),
            ("noise_penalty_weight", "noise_penalty_weight"),
            ("noise_penalty_region", "noise_penalty_region"),
            ("prior_reuse", "prior_reuse"),
            ("lr_prior_max_iter", "lr_prior_max_iter"),
            ("lr_prior_rule", "lr_prior_rule"),
            ("lr_prior_acceleration", "lr_prior_acceleration"),
        ):
            if getattr(args, flag) is not None:
                options[key] = getattr(args, flag)
        if args.lr_prior:
            prior = args.lr_prior
            options["lr_prior"] = prior if prior == "auto" else int(prior)
        row["ssi_options"] = {k: v for k, v in options.items() if k != "output_range"}
        started = time.perf_counter()
        model = train_ssi(noisy, psf, seed=seed, device="cpu", **options)
        row["train_s"] = time.perf_counter() - started
        restored = np.clip(predict(model, noisy), 0, 1)
        row["ssi"] = (psnr(truth, restored), ssim(truth, restored))
        if args.save_models:
            folder = Path(args.save_models)
            folder.mkdir(parents=True, exist_ok=True)
            name = f"ssi_3d_{kind}_{level}_seed{seed}.ckpt"
            row["model_sha256"] = save_checkpoint(model, folder / name)
            row["model_file"] = name
        for count in args.tta_compare.split(",") if args.tta_compare else []:
            other = np.clip(predict(model, noisy, tta=int(count)), 0, 1)
            row.setdefault("ssi_tta", {})[count] = (psnr(truth, other), ssim(truth, other))
            print(f"  SSI with tta {count}: {row['ssi_tta'][count][0]:.2f} dB", flush=True)
        row["beats_baselines"] = bool(model.training["beats_baselines"])
        row.update(run_outcome(model))  # every run is self-checked; failed ones retried
        check = model.training["self_check"]
        row["output_range_used"] = list(model.normalisation["output_range"])
        row["lr_prior"] = model.training.get("lr_prior")
        records.append(row)
        if args.json:  # written after every row: a long run leaves what it measured
            Path(args.json).write_text(json.dumps(records, indent=2))
        if "best_lr_nesterov" in row:
            accelerated = row["best_lr_nesterov"]
            print(
                f"best Nesterov LR (n={row['best_lr_nesterov_n']}) "
                f"{accelerated[0]:.2f} / {accelerated[1]:.3f}: SSI "
                f"{row['ssi'][0] - accelerated[0]:+.2f} dB / "
                f"{row['ssi'][1] - accelerated[1]:+.3f}",
                flush=True,
            )
        print(
            f"{kind} {level} seed {seed}: input {row['input'][0]:.2f}, best LR "
            f"(n={row['best_lr_n']}) {row['best_lr'][0]:.2f} / {row['best_lr'][1]:.3f}, "
            f"SSI {row['ssi'][0]:.2f} / {row['ssi'][1]:.3f}, train {row['train_s']:.0f} s, "
            f"runs {row['runs']} (flagged failed {row['failed_runs']}"
            + (f": {'; '.join(row['failed_reasons'])}" if row["failed_reasons"] else "")
            + f", retried {row['runs_retried']}), "
            f"self-check passed {row['self_check_passed']} (flags "
            f"{','.join(check['flags']) or 'none'}; at bound {check['at_bound']:.4f}, "
            f"residual/noise bright {check['residual_to_noise']['ssi']['bright']:.2f}, "
            f"best LR baseline {_best_lr_ratio(check):.2f})",
            flush=True,
        )
    print()
    print(
        "| kind | noise | seed | input | best-n LR (n) | LR gain >= 3 dB | SSI | SSI - LR | "
        "runs (flagged failed) | runs retried | failed runs' reasons | self-check flags | "
        "training s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        gain = r["best_lr"][0] - r["input"][0]
        print(
            f"| {r['kind']} | {r['noise']} | {r['seed']} | {r['input'][0]:.2f} / "
            f"{r['input'][1]:.3f} | {r['best_lr'][0]:.2f} / {r['best_lr'][1]:.3f} "
            f"({r['best_lr_n']}) | {'yes' if gain >= 3 else 'no'} ({gain:+.1f}) | "
            f"{r['ssi'][0]:.2f} / {r['ssi'][1]:.3f} | {r['ssi'][0] - r['best_lr'][0]:+.2f} dB / "
            f"{r['ssi'][1] - r['best_lr'][1]:+.3f} | {r['runs']} ({r['failed_runs']}) | "
            f"{r['runs_retried']} | {'; '.join(r['failed_reasons']) or 'none'} | "
            f"{', '.join(r['self_check_flags']) or 'none'} | {r['train_s']:.0f} |"
        )
    print(
        f"\nruns retried: {sum(r['runs_retried'] for r in records)} "
        f"(runs started {sum(r['runs'] for r in records)}, flagged failed "
        f"{sum(r['failed_runs'] for r in records)}; every run is self-checked)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))


def add_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name the benchmark's volumes (shared by the 3D benchmark scripts)."""
    parser.add_argument("--shape", default="128,256,256")
    parser.add_argument("--kinds", default="filaments,shells,beads,blobs")
    parser.add_argument("--noise", default="very-low,lower")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--na", type=float, default=1.2)
    parser.add_argument("--z-step", type=float, default=0.3, help="um (lateral pixel: 0.1 um)")
    parser.add_argument(
        "--psf-shape",
        default="17,31,31",
        help="support of the widefield PSF (the PSF is cropped there and renormalised; it is "
        "the true PSF of the simulation, given to LR and SSI alike)",
    )


def benchmark_volumes(args: argparse.Namespace, psf: np.ndarray):
    """``(kind, seed, level, truth, noisy)`` for every volume of :func:`add_volume_arguments`'
    options: each kind and seed's ground truth, degraded at each noise level."""
    from ssi_dask.bench.synthetic import structure_3d

    shape = tuple(int(v) for v in args.shape.split(","))
    for kind in args.kinds.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            truth = structure_3d(
                kind, shape, aspect=args.z_step / 0.1, seed=seed, density=args.density
            )
            for level in args.noise.split(","):
                yield kind, seed, level, truth, degrade(truth, psf, level, seed)


def benchmark_psf(psf_shape: str, z_step: float, na: float) -> np.ndarray:
    """The benchmark's widefield PSF on a ``"z,y,x"`` support (0.1 um pixels), sum 1."""
    from ssi_dask.psf import widefield_psf

    shape = tuple(int(v) for v in psf_shape.split(","))
    psf = widefield_psf(shape, (z_step, 0.1, 0.1), na=na, wavelength=0.52)
    return psf / psf.sum()


def degrade(truth: np.ndarray, psf: np.ndarray, level: str, seed: int) -> np.ndarray:
    """``truth`` blurred by ``psf`` with the Poisson-Gaussian noise ``NOISE[level]``, seeded."""
    from ssi_dask.bench.synthetic import add_poisson_gaussian_noise, blur

    rng = np.random.default_rng(seed)
    noisy = add_poisson_gaussian_noise(blur(truth, psf), rng, *NOISE[level])
    return noisy.astype(np.float32)


def lr_at_counts(
    noisy: np.ndarray,
    psf: np.ndarray,
    counts: list[int],
    score: Callable[[np.ndarray], Any],
    acceleration: str = "none",
) -> dict[int, Any]:
    """``score`` of Lucy-Richardson's estimate clipped to [0, 1] after each of ``counts``.

    One run of ``max(counts)`` iterations, scored on the way (the estimate after ``n``
    iterations is the one ``richardson_lucy(noisy, psf, num_iter=n)`` returns; with
    ``acceleration="nesterov"`` that of ``RLPlan.deconvolve(..., acceleration=...)``).
    """
    from ssi_dask import lr

    plan = lr.get_plan(psf, noisy.shape, back_projector=lr.resolve_back_projector(psf))
    scores: dict[int, Any] = {}

    def after(n: int, estimate: np.ndarray) -> None:
        if n in counts:
            scores[n] = score(np.clip(estimate, 0, 1))

    plan.deconvolve(noisy, max(counts), callback=after, acceleration=acceleration)
    return {n: scores[n] for n in counts}


def _best_lr_ratio(check: dict) -> float:
    """The lowest residual-to-noise ratio (brightest tenth) of the LR baselines."""
    ratios = check["residual_to_noise"]
    return min(v["bright"] for k, v in ratios.items() if k.startswith("lr"))


if __name__ == "__main__":
    main()
