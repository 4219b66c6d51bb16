"""SSI quality per compute: inference voxels/s per CPU core vs test-time transforms (issue 16).

One model is trained per case (2D: a held-out protocol image; 3D: a generated volume of mixed
structures through a widefield PSF), then applied with 1, 2, 4, 8 (and 16 in 3D) test-time
transforms (:func:`ssi_dask.ssi.symmetry.tta_transforms`) on one thread; each row gives the
voxels per second per core and the PSNR / SSIM against the ground truth. ``--budgets`` also
times the 3D chunk kernel (:func:`ssi_dask.ssi.predict_chunk`) at several CPU tile budgets.
Timings are CPU seconds of this process (``time.process_time``) with torch on one thread, so
that "per core" holds on a shared machine; all timings of one case come from one run.
``--device cuda`` trains and applies on the GPU instead and reports voxels/s per GPU (wall
seconds, after a warm-up call; the returned array is on the host, so the GPU has finished).

Each count is run twice: ``plain`` is the network as trained, in eval mode (the inference path
when issue 16 was filed), ``fast`` is :func:`ssi_dask.ssi.predict.inference_network` (BatchNorm
folded into the convolutions, channels-last oneDNN convolutions on the CPU), today's default.
Ratios are against the most transforms of the plain path (16 in 3D, 8 in 2D). ``--model``
saves the trained 3D model there, or loads it when the file exists (re-timing without
re-training).

Usage::

    nice -n 19 python benchmarks/ssi_tta.py --json benchmarks/ssi_tta_cpu.json
    python benchmarks/ssi_tta.py --steps2d 100 --steps3d 60 --counts3d 1,2   # a smoke run
    python benchmarks/ssi_tta.py --device cuda --shape3d 64,256,256 --json ssi_tta_gpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "ssi2d"


PATHS = ("plain", "fast")
DEVICE = "cpu"  # set from --device in main()


def _clock() -> float:
    # CPU seconds of this process on one thread; wall seconds on a GPU
    return time.process_time() if DEVICE == "cpu" else time.perf_counter()


def _rate_key() -> str:
    return "voxels_per_s_per_core" if DEVICE == "cpu" else "voxels_per_s_per_gpu"


def _set_path(path: str) -> None:
    # the module, not the function ssi_dask.ssi.predict of the same name
    importlib.import_module("ssi_dask.ssi.predict").FAST_INFERENCE = path == "fast"


def _time_predict(model, image, tta: int, repeats: int) -> float:
    from ssi_dask.ssi import predict

    best = float("inf")
    for _ in range(repeats):
        started = _clock()
        predict(model, image, tta=tta, device=DEVICE)
        best = min(best, _clock() - started)
    return best


def _train(noisy, psf, train_options, model_path):
    from ssi_dask.ssi import load_checkpoint, save_checkpoint, train_ssi

    if model_path and Path(model_path).exists():
        return load_checkpoint(model_path), None
    started = time.perf_counter()
    model = train_ssi(noisy, psf, seed=0, device=DEVICE, **train_options)
    train_s = time.perf_counter() - started
    if model_path:
        save_checkpoint(model, model_path)
    return model, train_s


def _case(name, truth, noisy, psf, train_options, counts, repeats, log, model_path=None):
    import torch

    from ssi_dask.bench.metrics import psnr, ssim
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.ssi import predict
    from ssi_dask.ssi.symmetry import tta_transforms

    model, train_s = _train(noisy, psf, train_options, model_path)
    lr = {
        n: psnr(truth, np.clip(richardson_lucy(noisy, psf, num_iter=n), 0, 1)) for n in (2, 5, 10)
    }
    torch.set_num_threads(1)  # per core
    rows = []
    outputs = {}
    for n in counts:
        for path in PATHS:
            _set_path(path)
            used = len(tta_transforms(model.symmetries, n, model.ndim))
            if path == "fast" or DEVICE != "cpu":
                # build the inference copy (cached per model) and warm the GPU up, untimed
                predict(model, noisy[tuple(slice(0, 8) for _ in noisy.shape)], tta=1, device=DEVICE)
            started = _clock()
            restored = predict(model, noisy, tta=n, device=DEVICE)
            seconds = _clock() - started
            if repeats > 1:
                seconds = min(seconds, _time_predict(model, noisy, n, repeats - 1))
            outputs[path] = restored
            restored = np.clip(restored, 0, 1)
            row = {
                "case": name,
                "path": path,
                "tta": n,
                "transforms_used": used,
                "device": DEVICE,
                _rate_key(): noisy.size / seconds,
                "seconds": seconds,
                "psnr": psnr(truth, restored),
                "ssim": ssim(truth, restored),
            }
            rows.append(row)
            log(
                f"{name} {path} tta {n} ({used} used): "
                f"{row[_rate_key()]:.0f} vox/s/{'core' if DEVICE == 'cpu' else 'GPU'}, "
                f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f}"
            )
        a, b = outputs["plain"], outputs["fast"]
        diff = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
        rows[-1]["max_rel_diff_vs_plain"] = diff
        log(f"{name} tta {n}: fast vs plain max relative difference {diff:.1e}")
    _set_path("fast")
    info = {
        "case": name,
        "shape": list(noisy.shape),
        "psf_shape": list(psf.shape),
        "train_s": train_s,
        "train_options": train_options,
        "input_psnr": psnr(truth, noisy),
        "lr_psnr": lr,
        "symmetries": len(model.symmetries),
        "beats_baselines": model.training.get("beats_baselines"),
    }
    return rows, info, model


def _budgets(model, volume, budgets, log):
    import torch

    from ssi_dask.ssi import predict_chunk

    torch.set_num_threads(1)
    # the volume as one chunk: with its halo around it, as map_overlap would pass it
    h = model.halo
    block = np.pad(volume, h, mode="symmetric")
    rows = []
    for mib in budgets:
        started = _clock()
        predict_chunk(model, block, margin=h, budget=int(mib * 2**20), tta=1, device=DEVICE)
        seconds = _clock() - started
        rows.append({"budget_mib": mib, "device": DEVICE, _rate_key(): volume.size / seconds})
        log(f"tile budget {mib} MiB: {volume.size / seconds:.0f} voxels/s ({DEVICE}, tta 1)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="membrane924x924.png", help="held-out 2D image")
    parser.add_argument("--crop2d", type=int, default=256)
    parser.add_argument("--shape3d", default="32,128,128")
    parser.add_argument("--steps2d", type=int, default=400)
    parser.add_argument("--steps3d", type=int, default=300)
    parser.add_argument("--counts3d", default="1,2,4,8,16", help="test-time transform counts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budgets", default="32,128,512,2048", help="MiB; empty to skip")
    parser.add_argument("--skip2d", action="store_true")
    parser.add_argument("--skip3d", action="store_true")
    parser.add_argument("--model", help="3D model checkpoint: saved after training, or loaded")
    parser.add_argument(
        "--device", default="cpu", help="cpu (voxels/s per core) or cuda[:N] (per GPU)"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE != "cpu":
        from ssi_dask.errors import DeviceError
        from ssi_dask.ssi.device import resolve_device

        try:
            resolve_device(DEVICE)
        except DeviceError as error:
            parser.error(str(error))

    from ssi_dask.bench.synthetic import degrade, load_ground_truth, structure_3d
    from ssi_dask.psf import protocol_psf, widefield_psf

    def log(line: str) -> None:
        print(line, flush=True)

    rows, infos, budget_rows = [], [], []
    if not args.skip2d:
        truth = load_ground_truth(IMAGES / args.image)
        c = args.crop2d
        y0, x0 = (truth.shape[0] - c) // 2, (truth.shape[1] - c) // 2
        truth = np.ascontiguousarray(truth[y0 : y0 + c, x0 : x0 + c])
        psf = protocol_psf(2)
        noisy = degrade(truth, psf, seed=0)
        r, info, _ = _case(
            f"2D {Path(args.image).stem} {c}x{c}",
            truth,
            noisy,
            psf,
            {"steps": args.steps2d, "restarts": 0},
            (1, 2, 4, 8),
            args.repeats,
            log,
        )
        rows += r
        infos.append(info)
    if not args.skip3d:
        shape = tuple(int(v) for v in args.shape3d.split(","))
        truth = structure_3d("mixed", shape, aspect=3.0, seed=0, density=4.0)
        psf = widefield_psf((21, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)
        noisy = degrade(
            truth, psf, seed=0, poisson_scale=0.001, gaussian_std=0.02, salt_and_pepper=0
        )
        r, info, model = _case(
            f"3D mixed {'x'.join(map(str, shape))}",
            truth,
            noisy,
            psf,
            {"steps": args.steps3d, "restarts": 0, "patch_size": 32, "batch_size": 2},
            tuple(int(v) for v in args.counts3d.split(",")),
            args.repeats,
            log,
            args.model,
        )
        rows += r
        infos.append(info)
        if args.budgets:
            budget_rows = _budgets(model, noisy, [int(v) for v in args.budgets.split(",")], log)
    print()
    print(
        f"| case | path | tta (used) | voxels/s per {'core' if DEVICE == 'cpu' else 'GPU'} "
        "| x vs plain tta 16 (3D) / 8 (2D) "
        "| PSNR | SSIM |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ref = max(
            (r for r in rows if r["case"] == row["case"] and r["path"] == "plain"),
            key=lambda r: r["tta"],
        )
        print(
            f"| {row['case']} | {row['path']} | {row['tta']} ({row['transforms_used']}) | "
            f"{row[_rate_key()]:.0f} | "
            f"{row[_rate_key()] / ref[_rate_key()]:.1f}x | "
            f"{row['psnr']:.2f} ({row['psnr'] - ref['psnr']:+.2f}) | {row['ssim']:.3f} |"
        )
    for info in infos:
        print(
            f"{info['case']}: input {info['input_psnr']:.2f} dB, LR "
            + ", ".join(f"n={n} {v:.2f}" for n, v in info["lr_psnr"].items())
            + f"; trained {info['train_s'] or 0:.0f} s (0: loaded), "
            f"self-check passed: {info['beats_baselines']}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "cases": infos, "budgets": budget_rows}, indent=2)
        )


if __name__ == "__main__":
    main()
