"""SSI with a PSF as large as the volume (issue 16, item 5): the 'same' forward operator vs LR.

A generated 3D volume (mixed structures, :func:`ssi_dask.bench.synthetic.structure_3d`) is
blurred with a widefield PSF as large as the volume (NA 1.2, 0.1 um pixels, 0.3 um z steps;
its tails reach across the whole volume) and noise is added. Restorations, all scored
against the ground truth (PSNR dB, data range 1; SSIM):

* Lucy-Richardson with the whole PSF, best iteration count of ``--lr`` (an oracle choice);
* SSI trained with the whole PSF (``forward="same"``: linear FFT convolution of each patch,
  mean intensity outside it, loss on the central box);
* SSI with the PSF cropped so that patches have a valid interior (``forward="valid"``, what
  the project could do before: it refused the whole PSF).

Usage::

    nice -n 19 python benchmarks/ssi_large_psf.py --json benchmarks/ssi_large_psf_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,64")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", default="5,10,20,50,100")
    parser.add_argument("--crop", default="21,31,31", help="PSF crop of the 'valid' variant")
    parser.add_argument("--output-high", type=float, default=4.0, help="SSI output_range top")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    from ssi_dask.bench.metrics import psnr, ssim
    from ssi_dask.bench.protocol import run_outcome
    from ssi_dask.bench.synthetic import add_poisson_gaussian_noise, blur, structure_3d
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.psf import widefield_psf
    from ssi_dask.ssi import predict, train_ssi

    shape = tuple(int(v) for v in args.shape.split(","))
    truth = structure_3d("mixed", shape, aspect=3.0, seed=args.seed, density=4.0)
    full = widefield_psf(tuple(s + 1 for s in shape), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)[
        1:, 1:, 1:
    ]  # as large as the volume
    full = full / full.sum()
    rng = np.random.default_rng(args.seed)
    noisy = add_poisson_gaussian_noise(blur(truth, full), rng, 0.001, 0.01).astype(np.float32)
    results: dict[str, dict] = {}

    def score(name: str, image: np.ndarray, **extra) -> None:
        image = np.clip(image, 0, 1)
        results[name] = {"psnr": psnr(truth, image), "ssim": ssim(truth, image), **extra}
        print(
            f"{name}: PSNR {results[name]['psnr']:.2f} SSIM {results[name]['ssim']:.3f}", flush=True
        )

    score("input", noisy)
    best = None
    for n in (int(v) for v in args.lr.split(",")):
        started = time.perf_counter()
        restored = richardson_lucy(noisy, full, num_iter=n)
        score(f"lr-{n}", restored, seconds=time.perf_counter() - started)
        if best is None or results[f"lr-{n}"]["psnr"] > results[best]["psnr"]:
            best = f"lr-{n}"
    results["best-lr"] = dict(results[best], n=best)

    crop = tuple(int(v) for v in args.crop.split(","))
    centre = [s // 2 for s in full.shape]
    cropped = full[tuple(slice(c - k // 2, c - k // 2 + k) for c, k in zip(centre, crop))]
    common = dict(
        steps=args.steps,
        patch_size=64,
        batch_size=2,
        restarts=1,
        output_range=(0.0, args.output_high),
    )
    for name, psf, forward in (
        ("ssi-same-full-psf", full, "same"),
        ("ssi-valid-cropped-psf", cropped, "valid"),
    ):
        started = time.perf_counter()
        model = train_ssi(noisy, psf, seed=args.seed, device="cpu", forward=forward, **common)
        train_s = time.perf_counter() - started
        outcome = run_outcome(model)
        score(
            name,
            predict(model, noisy),
            train_s=train_s,
            psf_energy_kept=float(psf.sum() / full.sum()),
            runs=outcome["runs"],
            runs_retried=outcome["runs_retried"],
            failed_runs=outcome["failed_runs"],
            failed_reasons=outcome["failed_reasons"],
            beats_baselines=model.training["beats_baselines"],
            self_check_passed=outcome["self_check_passed"],
            self_check_flags=outcome["self_check_flags"],
        )
    print()
    print("| method | PSNR dB | SSIM | notes |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        if name.startswith("lr-"):
            continue
        notes = ""
        if name == "best-lr":
            notes = f"oracle n = {r['n']}"
        elif name.startswith("ssi"):
            notes = (
                f"PSF energy kept {r['psf_energy_kept']:.2f}, train {r['train_s']:.0f} s, "
                f"runs {r['runs']} ({r['failed_runs']} flagged failed, "
                f"{r['runs_retried']} retried"
                + (f": {'; '.join(r['failed_reasons'])}" if r["failed_reasons"] else "")
                + f"), self-check passed: {r['self_check_passed']} (flags "
                f"{', '.join(r['self_check_flags']) or 'none'})"
            )
        print(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {notes} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"shape": list(shape), "steps": args.steps, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
