"""CUDA smoke test of SSI: train (bf16 autocast) and predict on skimage's camera image.

python benchmarks/ssi_dev_cuda_smoke.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.signal import fftconvolve
from skimage.data import camera
from skimage.metrics import peak_signal_noise_ratio as psnr

from ssi_dask.ssi import load_checkpoint, predict, save_checkpoint, train_ssi


def main():
    print("cuda", torch.cuda.is_available())
    r = np.arange(17) - 8
    rr = np.sqrt(r[:, None] ** 2 + r[None] ** 2)
    psf = np.exp(-((rr - 4) ** 2) / 2).astype(np.float32)  # a ring
    psf /= psf.sum()
    gt = camera().astype(np.float32) / 255
    rng = np.random.default_rng(0)
    y = fftconvolve(gt, psf, mode="same") + 0.1 * rng.standard_normal(gt.shape)
    y = np.clip(y, 0, 1).astype(np.float32)
    for seed in (0, 0):
        t = time.perf_counter()
        m = train_ssi(y, psf, seed=seed, device="auto")
        torch.cuda.synchronize()
        print(f"train {time.perf_counter() - t:.1f}s", m.training["device"], m.training["val_loss"])
        s = sum(float(v.double().sum()) for v in m.network.state_dict().values())
        print("weights checksum", s)
    t = time.perf_counter()
    out = predict(m, y, tile_shape=256, batch_size=4, amp=True)
    out32 = predict(m, y)
    print(f"predict {time.perf_counter() - t:.2f}s  amp-vs-fp32 {np.abs(out - out32).max():.4f}")
    print(f"PSNR input {psnr(gt, y, data_range=1):.2f}  SSI {psnr(gt, out32, data_range=1):.2f}")
    save_checkpoint(m, "/tmp/m.pt")
    m2 = load_checkpoint("/tmp/m.pt")
    cpu = predict(m2, y, device="cpu")
    print("cpu-vs-cuda max diff", np.abs(cpu - out32).max())


if __name__ == "__main__":
    main()
