"""Which 3D volumes and noise levels separate methods, and what the hold-out rule picks there.

Issue 16, item 3 asks for a 3D benchmark where Lucy-Richardson gains >= 3 dB over the input
(else every method lands near the input and nothing is told apart). This script needs no
training: for each kind of :func:`ssi_dask.bench.synthetic.structure_3d` and each noise level
of ``benchmarks/ssi_3d.py`` (same volumes, PSF and noise as that benchmark, seeded the same
way) it reports

* the input's PSNR and Lucy-Richardson's gain over it after each count of ``--lr``;
* the iteration count that the J-invariant hold-out rule of
  :func:`ssi_dask.lr_auto.choose_iterations` picks (the rule behind ``--iterations auto`` and
  SSI's ``lr_prior="auto"``): the one-standard-error choice with the default range (up to
  50 iterations, what the prior uses) and with a range up to ``--max-iter``, and the plain
  minimum of the hold-out error over that range.

Usage::

    python benchmarks/ssi_3d_levels.py --shape 128,256,256 --noise very-low,lower \
        --json benchmarks/ssi_3d_levels_full_cpu.json
    python benchmarks/ssi_3d_levels.py --shape 32,64,64 --density 4 --kinds beads
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ssi_3d import benchmark_psf, degrade, lr_at_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,256,256")
    parser.add_argument("--kinds", default="beads,filaments,blobs,shells")
    parser.add_argument("--noise", default="very-low,lower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--na", type=float, default=1.2)
    parser.add_argument("--z-step", type=float, default=0.3, help="um (lateral pixel: 0.1 um)")
    parser.add_argument("--psf-shape", default="17,31,31")
    parser.add_argument("--lr", default="25,50,100,200")
    parser.add_argument("--max-iter", type=int, default=200, help="the longer hold-out range")
    parser.add_argument("--json")
    args = parser.parse_args()

    from ssi_dask.bench.metrics import psnr
    from ssi_dask.bench.synthetic import structure_3d
    from ssi_dask.lr_auto import DEFAULT_MAX_ITER, choose_iterations

    shape = tuple(int(v) for v in args.shape.split(","))
    psf = benchmark_psf(args.psf_shape, args.z_step, args.na)
    counts = [int(v) for v in args.lr.split(",")]
    default_range = DEFAULT_MAX_ITER["classic"]
    records = []
    for kind in args.kinds.split(","):
        truth = structure_3d(
            kind, shape, aspect=args.z_step / 0.1, seed=args.seed, density=args.density
        )
        for level in args.noise.split(","):
            started = time.perf_counter()
            noisy = degrade(truth, psf, level, args.seed)  # as benchmarks/ssi_3d.py does
            row = {"kind": kind, "noise": level, "seed": args.seed, "shape": list(shape)}
            row.update(density=args.density, na=args.na, z_step=args.z_step)
            row["psf_shape"] = list(psf.shape)
            row["input_psnr"] = psnr(truth, np.clip(noisy, 0, 1))
            scores = lr_at_counts(noisy, psf, counts, lambda x, truth=truth: psnr(truth, x))
            row["lr_gain_db"] = {n: v - row["input_psnr"] for n, v in scores.items()}
            short = choose_iterations(noisy, psf, max_iter=default_range, seed=args.seed)
            long = choose_iterations(noisy, psf, max_iter=args.max_iter, seed=args.seed)
            errors = np.asarray(long.errors["classic"])  # index: the iteration count
            row["holdout"] = {
                "held_out_voxels": long.held_out_pixels,
                f"one_se_up_to_{default_range}": short.num_iter,
                f"one_se_up_to_{args.max_iter}": long.num_iter,
                f"minimum_up_to_{args.max_iter}": int(errors[1:].argmin()) + 1,
            }
            row["seconds"] = time.perf_counter() - started
            records.append(row)
            if args.json:
                Path(args.json).write_text(json.dumps(records, indent=2))
            gains = ", ".join(f"LR-{n} {g:+.2f}" for n, g in row["lr_gain_db"].items())
            print(
                f"{kind} {level}: input {row['input_psnr']:.2f} dB; {gains}; hold-out "
                + ", ".join(f"{k} {v}" for k, v in row["holdout"].items())
                + f" ({row['seconds']:.0f} s)",
                flush=True,
            )
    print()
    print(
        f"| kind | noise | input PSNR | LR gain (dB) at {', '.join(map(str, counts))} | "
        f"LR gain >= 3 dB | hold-out count: one-SE <= {default_range} / one-SE <= "
        f"{args.max_iter} / minimum |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in records:
        best = max(r["lr_gain_db"].values())
        print(
            f"| {r['kind']} | {r['noise']} | {r['input_psnr']:.2f} | "
            + " / ".join(f"{g:+.2f}" for g in r["lr_gain_db"].values())
            + f" | {'yes' if best >= 3 else 'no'} ({best:+.2f}) | "
            + " / ".join(str(v) for k, v in r["holdout"].items() if k != "held_out_voxels")
            + " |"
        )


if __name__ == "__main__":
    main()
