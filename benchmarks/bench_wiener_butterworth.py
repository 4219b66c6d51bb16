"""Time to the best classic-LR PSNR: classic Lucy-Richardson vs Wiener-Butterworth LR.

For each case (2D protocol images from ``../shared/data/ssi2d`` degraded with the protocol of
METHOD.md section 4, and 3D synthetic volumes with ground truth), in one run:

1. the PSNR (outputs clipped to [0, 1]) of classic LR after every iteration 1..50, from one
   50-iteration run: its best PSNR ``P`` and the count ``n_c`` that reaches it;
2. the PSNR of Wiener-Butterworth LR (default parameters from the PSF) after 1..10 iterations;
   ``n_wb`` is the first count whose PSNR is at least ``P``;
3. wall time (best of ``--repeats``, plan cached) of ``richardson_lucy`` with ``n_c`` classic
   iterations and with ``n_wb`` WB iterations, and of the first WB call (which also builds
   the back projector); speed-up = classic time / WB time;
4. the self-supervised choice (``--iterations auto``) for both back projectors: count, alpha,
   PSNR reached and the time the choice took;
5. steps 2-3 again with the alpha that ``--iterations auto`` chose instead of the default
   (a choice made without ground truth; its own cost is reported apart, as it is paid once
   per volume on a few sampled chunks).

Goal (issue 7): the same or better PSNR at least 5 times faster.

Example::

    nice -n 19 python benchmarks/bench_wiener_butterworth.py --json wb.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    import ssi_dask  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scipy.ndimage import gaussian_filter  # noqa: E402

from ssi_dask import lr  # noqa: E402
from ssi_dask.bench.metrics import psnr  # noqa: E402
from ssi_dask.bench.synthetic import (  # noqa: E402
    degrade,
    ground_truth_3d,
    load_ground_truth,
    normalise_ground_truth,
)
from ssi_dask.lr_auto import choose_iterations  # noqa: E402
from ssi_dask.psf import protocol_psf  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ssi2d"
WB = "wiener-butterworth"


def gaussian_psf(shape: tuple[int, ...], sigmas: tuple[float, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    psf = np.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigmas, strict=True)))
    return (psf / psf.sum()).astype(np.float32)


def spots_and_blobs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """3D ground truth in [0, 1]: small bright spots on a dimmer blobby background."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    truth[tuple(rng.integers(3, n - 3, shape[1] * 3) for n in shape)] = 1
    truth = gaussian_filter(truth, 1.0)
    truth = truth / truth.max() + 0.4 * (gaussian_filter(rng.random(shape), 4) > 0.5)
    return (truth / truth.max()).astype(np.float32)


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(name, truth, degraded image, PSF) of every case."""
    out = []
    psf2 = protocol_psf(2)
    for name in args.images:
        path = DATA / name
        if not path.exists():
            print(f"warning: {path} not found; skipping", file=sys.stderr)
            continue
        truth = normalise_ground_truth(load_ground_truth(path))
        out.append(
            {
                "name": f"2D {path.stem} (protocol: ring PSF, protocol noise)",
                "truth": truth,
                "image": degrade(truth, psf2, seed=args.seed),
                "psf": psf2,
            }
        )
    truth = spots_and_blobs((64, 128, 128), args.seed)
    psf = gaussian_psf((15, 15, 15), (3.0, 1.6, 1.6))
    out.append(
        {
            "name": "3D spots+blobs 64x128x128, Gaussian PSF 15^3 (sigma 3/1.6/1.6), "
            "Poisson-Gaussian noise (std 0.02)",
            "truth": truth,
            "image": degrade(
                truth, psf, seed=args.seed, gaussian_std=0.02, salt_and_pepper=0, bits=None
            ),
            "psf": psf,
        }
    )
    truth = ground_truth_3d()
    psf3 = protocol_psf(3)
    out.append(
        {
            "name": "3D protocol demo: binary blobs 64^3, widefield protocol PSF 17^3, "
            "protocol noise",
            "truth": truth,
            "image": degrade(truth, psf3, seed=args.seed),
            "psf": psf3,
        }
    )
    return out


def psnr_curve(image, psf, truth, max_iter: int, **bp: Any) -> dict[int, float]:
    plan = lr.get_plan(psf, image.shape, back_projector=lr.resolve_back_projector(psf, **bp))
    curve: dict[int, float] = {}
    plan.deconvolve(
        image, max_iter, callback=lambda n, x: curve.__setitem__(n, psnr(truth, np.clip(x, 0, 1)))
    )
    return curve


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_case(case: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    image, psf, truth = case["image"], case["psf"], case["truth"]
    classic = psnr_curve(image, psf, truth, 50, back_projector="classic")
    n_c = max(classic, key=classic.get)
    target = classic[n_c]
    wb = psnr_curve(image, psf, truth, 10, back_projector=WB)
    n_wb = next((n for n in sorted(wb) if wb[n] >= target), None)
    t_classic = best_of(lambda: lr.richardson_lucy(image, psf, n_c), args.repeats)
    row: dict[str, Any] = {
        "case": case["name"],
        "shape": list(image.shape),
        "input_psnr": psnr(truth, np.clip(image, 0, 1)),
        "classic_best_n": n_c,
        "classic_best_psnr": target,
        "classic_time_s": t_classic,
        "wb_defaults": lr.resolve_back_projector(psf, WB).as_dict(),
        "wb_best_psnr": max(wb.values()),
        "wb_best_n": max(wb, key=wb.get),
        "wb_curve": {n: round(v, 3) for n, v in wb.items()},
        "wb_n_to_reach": n_wb,
    }
    if n_wb is not None:
        lr.clear_plan_cache()
        t0 = time.perf_counter()
        lr.richardson_lucy(image, psf, n_wb, back_projector=WB)
        row["wb_first_call_s"] = time.perf_counter() - t0
        row["wb_time_s"] = best_of(
            lambda: lr.richardson_lucy(image, psf, n_wb, back_projector=WB), args.repeats
        )
        row["wb_psnr"] = wb[n_wb]
        row["speedup"] = t_classic / row["wb_time_s"]
        row["speedup_first_call"] = t_classic / row["wb_first_call_s"]
    for bp in ("classic", WB):
        t0 = time.perf_counter()
        choice = choose_iterations(image, psf, back_projector=bp, seed=args.seed)
        elapsed = time.perf_counter() - t0
        restored = lr.richardson_lucy(
            image,
            psf,
            choice.num_iter,
            back_projector=bp,
            **({"wiener_alpha": choice.wiener_alpha} if choice.wiener_alpha else {}),
        )
        row[f"auto_{bp}"] = {
            "num_iter": choice.num_iter,
            "wiener_alpha": choice.wiener_alpha,
            "psnr": psnr(truth, np.clip(restored, 0, 1)),
            "choice_s": elapsed,
            "samples": len(choice.samples),
        }
    alpha = row[f"auto_{WB}"]["wiener_alpha"]
    wb_auto = psnr_curve(image, psf, truth, 10, back_projector=WB, wiener_alpha=alpha)
    n_auto = next((n for n in sorted(wb_auto) if wb_auto[n] >= target), None)
    row["wb_auto_alpha_curve"] = {n: round(v, 3) for n, v in wb_auto.items()}
    row["wb_auto_alpha_n_to_reach"] = n_auto
    if n_auto is not None:
        row["wb_auto_alpha_time_s"] = best_of(
            lambda: lr.richardson_lucy(image, psf, n_auto, back_projector=WB, wiener_alpha=alpha),
            args.repeats,
        )
        row["wb_auto_alpha_speedup"] = t_classic / row["wb_auto_alpha_time_s"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | classic best PSNR (n) | classic time | WB defaults: n to reach it (PSNR) | "
        "WB time | **speed-up** | WB, auto alpha: n to reach (speed-up) | "
        "auto classic n: PSNR | auto WB n, alpha: PSNR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ac, aw = r["auto_classic"], r[f"auto_{WB}"]
        if r["wb_n_to_reach"] is None:
            reach, wb_time, speed = "not reached", "-", "-"
        else:
            reach = f"{r['wb_n_to_reach']} ({r['wb_psnr']:.2f})"
            wb_time = f"{r['wb_time_s']:.3f} s"
            speed = f"**{r['speedup']:.1f}x**"
        n_auto = r["wb_auto_alpha_n_to_reach"]
        auto_reach = (
            "not reached (best {:.2f})".format(max(r["wb_auto_alpha_curve"].values()))
            if n_auto is None
            else f"{n_auto} ({r['wb_auto_alpha_speedup']:.1f}x)"
        )
        if r["wb_n_to_reach"] is None:
            reach = f"not reached (best {r['wb_best_psnr']:.2f} at {r['wb_best_n']})"
        lines.append(
            f"| {r['case']} | {r['classic_best_psnr']:.2f} ({r['classic_best_n']}) | "
            f"{r['classic_time_s']:.3f} s | {reach} | {wb_time} | {speed} | {auto_reach} | "
            f"{ac['num_iter']}: {ac['psnr']:.2f} | "
            f"{aw['num_iter']}, {aw['wiener_alpha']:g}: {aw['psnr']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        nargs="*",
        default=["usaf768x812.png", "drosophilaslice532x1352.png", "characters875x1355.png"],
        help="protocol images in ../shared/data/ssi2d",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args(argv)
    rows = []
    for case in cases(args):
        print(f"running {case['name']} ...", file=sys.stderr, flush=True)
        rows.append(run_case(case, args))
    print(table(rows))
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), seed {args.seed}, "
        f"best of {args.repeats}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
