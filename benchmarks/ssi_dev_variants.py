"""SSI dev: protocol degradation (ssi_dask.bench.synthetic.degrade), cached best-n LR, one
SSI variant.

    python benchmarks/ssi_dev_variants.py --seed 0 --images drosophila usaf characters --kw '{}' \
        [--tag name] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from ssi_dask.bench.metrics import psnr, ssim
from ssi_dask.bench.synthetic import degrade, ground_truth_3d, load_ground_truth
from ssi_dask.lr import richardson_lucy
from ssi_dask.psf import protocol_psf

DATA = Path("/work/shared/data/ssi2d")
CACHE = Path("/tmp/ssidev")


def case(name, seed):
    CACHE.mkdir(exist_ok=True)
    f = CACHE / f"{name}_{seed}.pkl"
    if f.exists():
        return pickle.loads(f.read_bytes())
    if name == "blobs3d":
        gt, psf = ground_truth_3d((64, 64, 64), seed=1), protocol_psf(3)
    else:
        p = next(DATA.glob(f"{name}*.png"))
        gt, psf = load_ground_truth(p), protocol_psf(2)
    y = degrade(gt, psf, seed=seed)
    lr = {}
    for n in (2, 5, 10, 20):
        r = np.clip(richardson_lucy(y, psf, num_iter=n), 0, 1)
        lr[n] = (psnr(gt, r), ssim(gt, r))
    best = max(lr, key=lambda n: lr[n][0])
    d = dict(gt=gt, psf=psf, y=y, lr=lr, best=best, inp=(psnr(gt, y), ssim(gt, y)))
    f.write_bytes(pickle.dumps(d))
    return d


def main():
    from ssi_dask.ssi import predict, train_ssi

    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", nargs="+", default=["drosophila", "usaf", "characters"])
    ap.add_argument("--kw", default="{}")
    ap.add_argument("--tag", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = json.loads(a.kw)
    res = []
    for name in a.images:
        c = case(name, a.seed)
        t0 = time.perf_counter()
        model = train_ssi(c["y"], c["psf"], seed=a.seed, device="cpu", progress=a.progress, **kw)
        t1 = time.perf_counter()
        out = np.clip(predict(model, c["y"], device="cpu"), 0, 1)
        t2 = time.perf_counter()
        p, s = psnr(c["gt"], out), ssim(c["gt"], out)
        bl = c["lr"][c["best"]]
        tr = model.training
        line = (
            f"[{a.tag}] {name} s{a.seed}: in {c['inp'][0]:.2f}/{c['inp'][1]:.3f} "
            f"LR{c['best']} {bl[0]:.2f}/{bl[1]:.3f} SSI {p:.2f}/{s:.3f} "
            f"d {p - bl[0]:+.2f}/{s - bl[1]:+.3f} train {t1 - t0:.0f}s pred {t2 - t1:.1f}s "
            f"run {tr['selected_run']} val {tr['val_loss']:.5f} "
            f"nsw {tr['null_space_weight']:.4f} snr {tr.get('signal_to_noise')} "
            f"base {min(tr['baseline_val_losses'].values()):.5f}"
        )
        print(line, flush=True)
        res.append(p - bl[0])
        np.save(CACHE / f"out_{a.tag}_{name}_{a.seed}.npy", out)
    print(f"[{a.tag}] mean dPSNR {np.mean(res):+.2f}  kw {kw}", flush=True)


if __name__ == "__main__":
    main()
