"""Benchmark the Lucy-Richardson kernel against scikit-image and against the FFT floor.

For one volume (default 64x256x256, 17^3 Gaussian PSF, 10 iterations) this measures, in one run:

* ``ssi_dask.lr.richardson_lucy`` (plan cached, best of ``--repeats``) and its first call
  (which also builds the PSF transform);
* ``skimage.restoration.richardson_lucy`` with the same iterations, float32, ``clip=False``;
* the FFT floor: one ``rfftn`` + ``irfftn`` pair on the working shape, twice (the four real
  FFTs each Lucy-Richardson iteration needs), with the same FFT library and threads.

It prints a markdown table with the speed-up over scikit-image and the time per iteration
divided by the FFT floor. ``--device gpu`` also runs the kernel on CuPy (when available) and
compares it with the CPU numbers of the same run.

Example::

    python benchmarks/bench_lr_kernel.py --shape 64 256 256 --psf-size 17 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import ssi_dask  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssi_dask import lr  # noqa: E402
from ssi_dask._backend import cupy_or_none, get_fft_module  # noqa: E402


def gaussian_psf(size: int, ndim: int, sigmas: list[float]) -> np.ndarray:
    """Normalised Gaussian PSF of ``size`` samples per axis."""
    axes = [np.arange(size) - (size - 1) / 2] * ndim
    grids = np.meshgrid(*axes, indexing="ij")
    arg = sum((g / s) ** 2 for g, s in zip(grids, sigmas, strict=True))
    psf = np.exp(-0.5 * arg)
    return (psf / psf.sum()).astype(np.float32)


def synthetic_image(shape: tuple[int, ...], psf: np.ndarray, seed: int = 0) -> np.ndarray:
    """Sparse bright points and a background, blurred with ``psf``, with Poisson noise."""
    rng = np.random.default_rng(seed)
    truth = np.full(shape, 2.0, dtype=np.float32)
    n_points = max(1, int(np.prod(shape) // 500))
    idx = tuple(rng.integers(0, n, n_points) for n in shape)
    truth[idx] += rng.uniform(50, 500, n_points).astype(np.float32)
    blurred = lr.convolve_same(truth, psf)
    return rng.poisson(np.clip(blurred, 0, None)).astype(np.float32)


def best_of(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Smallest wall time of ``repeats`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def fft_floor(xp: Any, work_shape: tuple[int, ...], repeats: int, sync: Callable[[], None]):
    """Time of the four real FFTs (rfftn + irfftn, twice) of one LR iteration (seconds)."""
    fft = get_fft_module(xp)
    kw = {"workers": -1} if xp is np else {}
    x = xp.asarray(np.random.default_rng(1).random(work_shape, dtype=np.float32))

    def pair() -> None:
        spectrum = fft.rfftn(x, **kw)
        fft.irfftn(spectrum, s=work_shape, **kw)

    pair()  # warm up (plans, allocator)
    return 2 * best_of(pair, max(repeats, 5), sync)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = tuple(args.shape)
    ndim = len(shape)
    sigmas = [2.0 * args.sigma] + [args.sigma] * (ndim - 1) if ndim == 3 else [args.sigma] * ndim
    psf = gaussian_psf(args.psf_size, ndim, sigmas)
    image = synthetic_image(shape, psf)
    n = args.iterations
    plan = lr.get_plan(psf, shape)
    work_shape = plan.work_shape
    results: dict[str, Any] = {
        "shape": list(shape),
        "psf_shape": list(psf.shape),
        "work_shape": list(work_shape),
        "iterations": n,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "rows": [],
    }
    rows = results["rows"]

    # ---- CPU: ours
    lr.clear_plan_cache()
    t0 = time.perf_counter()
    ours_cpu = lr.richardson_lucy(image, psf, n)
    cold = time.perf_counter() - t0
    t_ours = best_of(lambda: lr.richardson_lucy(image, psf, n), args.repeats)
    floor_cpu = fft_floor(np, work_shape, args.repeats, lambda: None)
    # minor page faults (fresh FFT outputs touching new memory) per iteration / per floor
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    lr.richardson_lucy(image, psf, n)
    faults1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fft_floor(np, work_shape, 1, lambda: None)
    faults2 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    results["page_faults_per_iter"] = (faults1 - faults0) / max(n, 1)
    results["page_faults_per_floor"] = (faults2 - faults1) / 3  # 6 FFT pairs = 3 floors
    rows.append(
        {
            "impl": "ssi_dask.lr",
            "device": "cpu",
            "total_s": t_ours,
            "first_call_s": cold,
            "per_iter_s": t_ours / n,
            "fft_floor_s": floor_cpu,
        }
    )

    # ---- CPU: scikit-image
    if not args.skip_skimage:
        from skimage.restoration import richardson_lucy as sk_rl  # noqa: PLC0415

        def sk() -> np.ndarray:
            return sk_rl(image, psf, num_iter=n, clip=False)

        sk_out = sk()
        t_sk = best_of(sk, args.repeats)
        rows.append(
            {
                "impl": "skimage.restoration",
                "device": "cpu",
                "total_s": t_sk,
                "per_iter_s": t_sk / n,
                "fft_floor_s": floor_cpu,
            }
        )
        # skimage starts from 0.5 and has circular-free 'same' borders: compare the interior
        inner = tuple(slice(m, n - m) for n in shape for m in [min(args.psf_size, n // 4)])
        diff = np.abs(sk_out[inner] - ours_cpu[inner]).max() / np.abs(ours_cpu[inner]).max()
        results["skimage_interior_max_rel_diff"] = float(diff)

    # ---- GPU: ours
    if args.device == "gpu":
        cp = cupy_or_none()
        if cp is None:
            print(
                "warning: --device gpu but CuPy with a CUDA device is not available",
                file=sys.stderr,
            )
        else:

            def sync() -> None:
                cp.cuda.Device().synchronize()

            image_gpu = cp.asarray(image)
            sync()
            t0 = time.perf_counter()
            out_gpu = lr.richardson_lucy(image_gpu, psf, n)
            sync()
            cold_gpu = time.perf_counter() - t0
            t_gpu = best_of(lambda: lr.richardson_lucy(image_gpu, psf, n), args.repeats, sync)
            floor_gpu = fft_floor(cp, work_shape, args.repeats, sync)
            rows.append(
                {
                    "impl": "ssi_dask.lr",
                    "device": "gpu",
                    "total_s": t_gpu,
                    "first_call_s": cold_gpu,
                    "per_iter_s": t_gpu / n,
                    "fft_floor_s": floor_gpu,
                }
            )
            diff = float(np.abs(out_gpu.get() - ours_cpu).max() / np.abs(ours_cpu).max())
            results["gpu_vs_cpu_max_rel_diff"] = diff
            results["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()

    t_sk_ref = next((r["total_s"] for r in rows if r["impl"].startswith("skimage")), None)
    t_cpu_ref = rows[0]["total_s"]
    for r in rows:
        r["vs_floor"] = r["per_iter_s"] / r["fft_floor_s"]
        r["speedup_vs_skimage"] = t_sk_ref / r["total_s"] if t_sk_ref else None
        r["speedup_vs_ours_cpu"] = t_cpu_ref / r["total_s"]
    return results


def markdown(results: dict[str, Any]) -> str:
    head = (
        f"Lucy-Richardson, image {'x'.join(map(str, results['shape']))}, "
        f"PSF {'x'.join(map(str, results['psf_shape']))}, working shape "
        f"{'x'.join(map(str, results['work_shape']))}, {results['iterations']} iterations, "
        f"best of {results['repeats']}, {results['cpu_count']} CPUs"
        + (f", GPU {results['gpu']}" if "gpu" in results else "")
    )
    lines = [
        head,
        "",
        "| implementation | device | total (s) | per iteration (ms) | 4-FFT floor (ms) "
        "| per iteration / floor | speed-up vs skimage | speed-up vs ours (CPU) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in results["rows"]:
        lines.append(
            f"| {r['impl']} | {r['device']} | {r['total_s']:.3f} | {1e3 * r['per_iter_s']:.2f} "
            f"| {1e3 * r['fft_floor_s']:.2f} | {r['vs_floor']:.2f} "
            f"| {fmt(r['speedup_vs_skimage'], '.2f')} | {r['speedup_vs_ours_cpu']:.2f} |"
        )
    for key in ("skimage_interior_max_rel_diff", "gpu_vs_cpu_max_rel_diff"):
        if key in results:
            lines.append(f"\n{key}: {results[key]:.2e}")
    if "page_faults_per_iter" in results:
        lines.append(
            f"\nminor page faults: {results['page_faults_per_iter']:.0f} per LR iteration, "
            f"{results['page_faults_per_floor']:.0f} per 4-FFT floor"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 256, 256])
    parser.add_argument("--psf-size", type=int, default=17)
    parser.add_argument("--sigma", type=float, default=1.5, help="lateral PSF sigma (pixels)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--skip-skimage", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if len(args.shape) not in (2, 3):
        parser.error("--shape takes 2 or 3 integers")
    results = run(args)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
