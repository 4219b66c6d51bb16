"""Nesterov-accelerated Lucy-Richardson against the classic iterations on the 3D benchmark.

Issue 16, item 6 (3D cost): SSI's 3D prior needs 100-200 classic Lucy-Richardson iterations
per chunk and training step. ``acceleration="nesterov"`` (:meth:`ssi_dask.lr.RLPlan.deconvolve`)
starts iteration ``n`` from the iterate extrapolated along its last step with the fixed weight
``(n - 2) / (n + 1)`` (clipped at zero). For each volume of ``benchmarks/ssi_3d.py``
(``--kinds``, ``--noise``, ``--seeds``, ``--shape``) this script runs both in one process and
reports:

* PSNR (data range 1, estimates clipped to [0, 1]) after every iteration up to
  ``--max-iter``, and SSIM at each one's best count: the best of each, the count, and the
  fewest accelerated iterations that reach the classic best;
* CPU seconds per iteration of each (one thread), so that the cost at equal quality is a ratio
  measured in one run;
* with ``--choose``, the count the hold-out rule picks for each (``rule`` one-se and paired;
  :func:`ssi_dask.lr_auto.choose_iterations`) and the PSNR there.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/lr_acceleration.py --kinds filaments,shells,beads,blobs \\
        --noise very-low --choose --json benchmarks/lr_acceleration_3d_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ssi_3d import add_volume_arguments, benchmark_psf, benchmark_volumes


def curve(noisy, psf, truth, max_iter, acceleration):
    """PSNR after every iteration 1..max_iter and CPU seconds per iteration."""
    from ssi_dask import lr
    from ssi_dask.bench.metrics import psnr

    plan = lr.get_plan(psf, noisy.shape)
    scores: dict[int, float] = {}
    kept: dict[int, np.ndarray] = {}
    started = time.process_time()
    scoring = 0.0

    def after(n: int, estimate: np.ndarray) -> None:
        nonlocal scoring
        begun = time.process_time()
        scores[n] = psnr(truth, np.clip(estimate, 0, 1))
        if scores[n] >= max(scores.values()):
            kept["best"] = np.clip(estimate, 0, 1).copy()
        scoring += time.process_time() - begun

    plan.deconvolve(noisy, max_iter, callback=after, workers=1, acceleration=acceleration)
    seconds = (time.process_time() - started - scoring) / max_iter
    return scores, kept["best"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_volume_arguments(parser)
    parser.add_argument("--max-iter", type=int, default=200, help="classic; accelerated: half")
    parser.add_argument("--choose", action="store_true", help="also the hold-out rule's counts")
    parser.add_argument("--json")
    args = parser.parse_args()

    from ssi_dask.bench.metrics import ssim
    from ssi_dask.lr_auto import choose_iterations

    shape = tuple(int(v) for v in args.shape.split(","))
    psf = benchmark_psf(args.psf_shape, args.z_step, args.na)
    rows = []
    for kind, seed, level, truth, noisy in benchmark_volumes(args, psf):
        row = {"kind": kind, "noise": level, "seed": seed, "shape": list(shape)}
        curves = {}
        for acceleration, max_iter in (
            ("none", args.max_iter),
            ("nesterov", args.max_iter // 2),
        ):
            scores, best_image, seconds = curve(noisy, psf, truth, max_iter, acceleration)
            best = max(scores, key=scores.get)
            curves[acceleration] = scores
            row[acceleration] = {
                "best_n": best,
                "best_psnr": scores[best],
                "best_ssim": ssim(truth, best_image),
                "last_psnr": scores[max_iter],
                "cpu_s_per_iteration": seconds,
                "psnr": {n: round(v, 3) for n, v in scores.items() if n % 5 == 0},
            }
            if args.choose:
                for rule in ("one-se", "paired"):
                    count = choose_iterations(
                        noisy,
                        psf,
                        max_iter=max_iter,
                        rule=rule,
                        acceleration=acceleration,
                    ).num_iter
                    row[acceleration][f"chosen_{rule}"] = [count, scores[count]]
        target = row["none"]["best_psnr"]
        reach = [n for n, v in sorted(curves["nesterov"].items()) if v >= target]
        row["nesterov_reaches_classic_best_at"] = reach[0] if reach else None
        rows.append(row)
        print(
            f"{kind} {level} seed {seed}: classic best {row['none']['best_psnr']:.2f} "
            f"(n={row['none']['best_n']}), nesterov best "
            f"{row['nesterov']['best_psnr']:.2f} (n={row['nesterov']['best_n']}), "
            f"reaches the classic best at {row['nesterov_reaches_classic_best_at']}; "
            f"s/iteration {row['none']['cpu_s_per_iteration']:.2f} / "
            f"{row['nesterov']['cpu_s_per_iteration']:.2f}"
            + (
                f"; chosen (one-se, paired): classic {row['none']['chosen_one-se']}, "
                f"{row['none']['chosen_paired']}; nesterov "
                f"{row['nesterov']['chosen_one-se']}, {row['nesterov']['chosen_paired']}"
                if args.choose
                else ""
            ),
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
