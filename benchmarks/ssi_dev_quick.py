"""Quick SSI development benchmark: METHOD.md section 4 protocol on the 3 ssi2d images.

Degrades each ground truth (protocol PSF, blur + noise + salt & pepper + 10 bits, seeded), runs LR
with n = 2, 5, 10, 20 (reflect boundaries) and SSI (default CPU settings unless overridden), prints
PSNR / SSIM (data range 1, 7x7 window) and times.

    python benchmarks/ssi_dev_quick.py [--seeds 0 1 2] [--images usaf] [--kw '{"steps": 600}']
    python benchmarks/ssi_dev_quick.py --3d
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from scipy.signal import fftconvolve
from skimage.io import imread
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ssi_dask.psf import protocol_psf
from ssi_dask.ssi import predict, train_ssi

DATA = Path("/work/shared/data/ssi2d")


def degrade(gt, psf, seed):
    rng = np.random.default_rng(seed)
    y = fftconvolve(gt.astype(np.float64), psf, mode="same")
    y = y + np.sqrt(np.clip(0.001 * y + 0.1**2, 0, None)) * rng.standard_normal(y.shape)
    sp = rng.random(y.shape) < 0.01
    y[sp] = rng.random(int(sp.sum()))
    y = np.round(1024 * y) / 1024
    return np.clip(y, 0, 1).astype(np.float32)


def lucy_richardson(y, psf, n):
    r = [s // 2 for s in psf.shape]
    pad = [(k, k) for k in r]
    flip = psf[(slice(None, None, -1),) * psf.ndim]
    est = np.full_like(y, y.mean(), dtype=np.float32)
    crop = tuple(slice(k, k + s) for k, s in zip(r, y.shape))

    def conv(a, k):
        return fftconvolve(np.pad(a, pad, mode="reflect"), k, mode="same")[crop]

    for _ in range(n):
        est = est * conv(y / np.maximum(conv(est, psf), 1e-6), flip)
    return np.clip(est, 0, 1).astype(np.float32)


def metrics(gt, x):
    x = np.clip(x, 0, 1)
    return (
        peak_signal_noise_ratio(gt, x, data_range=1),
        structural_similarity(gt, x, data_range=1, win_size=7),
    )


def load(name):
    g = imread(DATA / name).astype(np.float32)
    if g.ndim == 3:
        g = g[..., :3].mean(-1)
    return (g - g.min()) / (g.max() - g.min())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--images", nargs="+", default=["drosophila", "usaf", "characters"])
    ap.add_argument("--kw", default="{}", help="JSON dict of train_ssi overrides")
    ap.add_argument("--3d", dest="three_d", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    kw = json.loads(args.kw)
    print(f"torch threads {torch.get_num_threads()}  overrides {kw}", flush=True)
    if args.three_d:
        from skimage.data import binary_blobs

        gts = {
            "blobs3d": binary_blobs(64, blob_size_fraction=0.1, n_dim=3, rng=1).astype(np.float32)
        }
        psf = protocol_psf(3)
    else:
        files = {
            re.match(r"[a-z]+", p.name).group().replace("slice", ""): p.name
            for p in DATA.glob("*.png")
        }
        gts = {k: load(v) for k, v in files.items() if any(k.startswith(i) for i in args.images)}
        psf = protocol_psf(2)
    rows = []
    for name, gt in gts.items():
        y = degrade(gt, psf, seed=0)
        p_in = metrics(gt, y)
        lr = {n: metrics(gt, lucy_richardson(y, psf, n)) for n in (2, 5, 10, 20)}
        best_n = max(lr, key=lambda n: lr[n][0])
        best_ssim = max(v[1] for v in lr.values())
        print(
            f"{name} {gt.shape}: input {p_in[0]:.2f}/{p_in[1]:.3f}  "
            + "  ".join(f"LR{n} {v[0]:.2f}/{v[1]:.3f}" for n, v in lr.items()),
            flush=True,
        )
        for seed in args.seeds:
            t0 = time.perf_counter()
            model = train_ssi(y, psf, seed=seed, progress=args.progress, **kw)
            t1 = time.perf_counter()
            out = predict(model, y)
            t2 = time.perf_counter()
            m = metrics(gt, out)
            tr = model.training
            print(
                f"  seed {seed}: SSI {m[0]:.2f}/{m[1]:.3f}  (dPSNR {m[0] - lr[best_n][0]:+.2f}, "
                f"dSSIM {m[1] - best_ssim:+.3f})  train {t1 - t0:.0f}s  predict {t2 - t1:.1f}s  "
                f"run {tr['selected_run']} val {tr['val_loss']:.5f} "
                f"base {min(tr['baseline_val_losses'].values()):.5f}",
                flush=True,
            )
            rows.append((name, seed, m[0] - lr[best_n][0], m[1] - best_ssim, t1 - t0))
    d = np.array([r[2] for r in rows])
    s = np.array([r[3] for r in rows])
    print(
        f"mean dPSNR {d.mean():+.2f} (min {d.min():+.2f})  mean dSSIM {s.mean():+.3f} "
        f"(min {s.min():+.3f})  mean train {np.mean([r[4] for r in rows]):.0f}s"
    )


if __name__ == "__main__":
    main()
