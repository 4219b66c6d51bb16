"""Exploratory (issue 16): correct SSI's output from its residual, an empirical Wiener estimate.

SSI fits less of the well-transmitted detail than Lucy-Richardson at low noise. This script
trains SSI (default recipe) on protocol-degraded images, then corrects its output ``S`` with
the Wiener estimate of its error from the residual ``R = y - h * S``: per band of |OTF| (40
quantile bins) the residual's power above the noise floor (measured on the residual where
|OTF| < 0.01 max, kept where it exceeds the floor by 3 standard errors) over |OTF|^2 is the
error's power ``E``. Variants:

* ``zero``: ``S + conj(H) E / (|H|^2 E + noise) R`` with the residual under the protocol's
  zero-padded blur (it knows the image is dark outside: not usable on real data);
* ``extended``: the correction solved on the image padded by 32 pixels, SSI's output mirrored
  there, data scored inside only (nothing assumed outside), by conjugate gradients;
* ``gated``: either, weighted per pixel by the local significance of the residual
  ``max(0, 1 - noise / mean(R^2))`` over 5x5 pixels, smoothed.

Not part of the package: the correction is a global filter (not chunk-consistent) and was tried
on four images (``benchmarks/RESULTS.md``, "Exploratory runs of the fourth session").

Usage::

    nice -n 19 python benchmarks/ssi_residual_correction.py --only roofs,nuclei \
        --condition low-noise --crop 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "ssi2d"
BINS = 40
PAD = 32
RIM = 16


def _otf(psf: np.ndarray, shape) -> np.ndarray:
    kernel = np.zeros(shape)
    kernel[: psf.shape[0], : psf.shape[1]] = psf
    return np.fft.rfft2(np.roll(kernel, [-(s // 2) for s in psf.shape], (0, 1)))


def _error_spectrum(residual: np.ndarray, psf: np.ndarray):
    """(|OTF| bin centres, error power per bin, noise floor) of a residual image."""
    h = np.abs(_otf(psf, residual.shape))
    power = np.abs(np.fft.rfft2(residual)) ** 2 / residual.size
    edges = np.quantile(h, np.linspace(0, 1, BINS + 1))
    index = np.clip(np.digitize(h, edges) - 1, 0, BINS - 1)
    mean_power = np.array([power[index == i].mean() for i in range(BINS)])
    mean_h2 = np.array([(h[index == i] ** 2).mean() for i in range(BINS)])
    counts = np.array([(index == i).sum() for i in range(BINS)])
    noise = float(mean_power[mean_h2 < (0.01 * h.max()) ** 2].mean())
    excess = np.maximum(mean_power - noise * (1 + 3 / np.sqrt(counts)), 0)
    return np.sqrt(mean_h2), excess / np.maximum(mean_h2, 1e-12), noise


def _gate(residual: np.ndarray, noise: float) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    local = uniform_filter(residual**2, 5)
    return uniform_filter(np.clip((local - noise) / np.maximum(local, 1e-12), 0, 1), 5)


def correct_zero(data: np.ndarray, ssi: np.ndarray, psf: np.ndarray):
    """The Wiener correction under the protocol's zero-padded blur; (corrected, residual, noise)."""
    from scipy.signal import fftconvolve

    residual = data - fftconvolve(ssi, psf, mode="same")
    centres, error, noise = _error_spectrum(residual, psf)
    otf = _otf(psf, data.shape)
    e = np.interp(np.abs(otf), centres, error)
    gain = np.conj(otf) * e / (np.abs(otf) ** 2 * e + noise)
    return ssi + np.fft.irfft2(gain * np.fft.rfft2(residual), s=data.shape), residual, noise


def correct_extended(data: np.ndarray, ssi: np.ndarray, psf: np.ndarray, iterations: int = 30):
    """The correction on an extended domain, data scored inside only (conjugate gradients)."""
    shape = tuple(s + 2 * PAD for s in data.shape)
    otf = _otf(psf, shape)
    inside = np.zeros(shape)
    inside[PAD:-PAD, PAD:-PAD] = 1

    def blur(x, transpose=False):
        kernel = np.conj(otf) if transpose else otf
        return np.fft.irfft2(np.fft.rfft2(x) * kernel, s=shape)

    extended = np.pad(ssi, PAD, mode="symmetric")
    residual = data - blur(extended)[PAD:-PAD, PAD:-PAD]
    r = psf.shape[0] // 2
    centres, error, noise = _error_spectrum(residual[r:-r, r:-r], psf)
    root = np.sqrt(np.interp(np.abs(otf), centres, error))

    def prior(u):
        return np.fft.irfft2(np.fft.rfft2(u) * root, s=shape)

    target = np.zeros(shape)
    target[PAD:-PAD, PAD:-PAD] = data
    b = prior(blur(inside * (target - blur(extended)), transpose=True)) / noise

    def normal(u):
        return prior(blur(inside * blur(prior(u)), transpose=True)) / noise + u

    u = np.zeros(shape)
    res = b - normal(u)
    direction, norm = res.copy(), float((res * res).sum())
    for _ in range(iterations):
        applied = normal(direction)
        step = norm / float((direction * applied).sum())
        u += step * direction
        res -= step * applied
        new_norm = float((res * res).sum())
        direction = res + new_norm / norm * direction
        norm = new_norm
    return ssi + prior(u)[PAD:-PAD, PAD:-PAD], residual, noise


def _scores(image: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    from ssi_dask.bench.metrics import psnr, ssim

    image = np.clip(image, 0, 1)
    inner = (slice(RIM, -RIM),) * 2
    return psnr(truth[inner], image[inner]), psnr(truth, image), ssim(truth, image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--only", help="comma-separated image name prefixes")
    parser.add_argument("--condition", default="low-noise")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", default="10,20,50,100")
    args = parser.parse_args()

    from ssi_dask.bench.protocol import degrade_condition
    from ssi_dask.bench.synthetic import load_ground_truth
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.psf import protocol_psf
    from ssi_dask.ssi import predict, train_ssi

    files = sorted(p for p in Path(args.images).glob("*") if p.suffix in (".png", ".tif"))
    if args.only:
        files = [p for p in files if any(p.stem.startswith(o) for o in args.only.split(","))]
    print("| image | method | PSNR interior | PSNR whole | SSIM |")
    print("| --- | --- | --- | --- | --- |")
    for path in files:
        truth = load_ground_truth(path)
        y0, x0 = (max(s - args.crop, 0) // 2 for s in truth.shape)
        truth = np.ascontiguousarray(truth[y0 : y0 + args.crop, x0 : x0 + args.crop])
        data, psf = degrade_condition(truth, protocol_psf(2), args.condition, args.seed)
        model = train_ssi(data, psf, seed=args.seed)
        ssi = predict(model, data)
        rows = {"SSI": ssi}
        for n in (int(v) for v in args.lr.split(",")):
            rows[f"LR-{n}"] = richardson_lucy(data, psf, num_iter=n)
        for name, correct in (("zero", correct_zero), ("extended", correct_extended)):
            corrected, residual, noise = correct(data, ssi, psf)
            rows[f"SSI + {name}"] = corrected
            rows[f"SSI + {name}, gated"] = ssi + _gate(residual, noise) * (corrected - ssi)
        for name, image in rows.items():
            inner, whole, similarity = _scores(image, truth)
            print(f"| {path.stem} | {name} | {inner:.2f} | {whole:.2f} | {similarity:.3f} |")


if __name__ == "__main__":
    main()
