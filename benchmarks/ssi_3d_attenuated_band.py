"""What the band the PSF attenuates holds, per kind of the 3D benchmark: can data tell noise there?

The noise-sensitivity penalty (``noise_penalty_weight``) penalises the output's response to
noise at frequencies the PSF transmits poorly (weights ``1 - |OTF|^2``). It helps where that
band of the restoration is noise and hurts where it is signal. This script measures, per kind
(very low noise by default, the benchmark's generator and PSF), three energies in that band
(mean per voxel, the training's own penalty weights and window, normalised units):

* ``noise share``: the share of the *data's* power that is noise there (Welch estimate over
  the volume's patches against the white-noise power of the MAD noise estimate, or the mean
  power at frequencies the PSF does not transmit if larger), averaged with the band's weights;
* ``prior noise / prior``: the Lucy-Richardson prior's response to added noise of the data's
  level against the prior's own energy there (accelerated iterations, the count given);
* ``truth``: the ground truth's energy there (what a method should restore), and the prior's
  error there.

Only the first two are available without ground truth; a useful per-volume weight would have
to follow the third.

Usage::

    python benchmarks/ssi_3d_attenuated_band.py --shape 64,128,128 \
        --json benchmarks/ssi_3d_attenuated_band_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: the prior's accelerated count per kind: what the 3D default picked at 128x256x256, very low
#: noise, seed 0 (RESULTS.md, twelfth session)
PRIOR_COUNTS = {"filaments": 41, "shells": 68, "beads": 30, "blobs": 36}


def noise_share(volume: np.ndarray, sigma: float, op, patch: int) -> float:
    """The band-weighted mean share of the data's power that is noise (see the module doc)."""
    from ssi_dask.ssi.train import _NullSpacePenalty, _patch_sampler

    shape = (patch,) * volume.ndim
    band = _NullSpacePenalty(op, shape, "cpu")  # the training's window and band weights
    win = band.window.numpy().astype(np.float64)
    weight = band.weight.numpy()
    patches, _ = _patch_sampler(volume, shape, seed=1).batch(32)
    x = patches - patches.mean(axis=(1, 2, 3), keepdims=True)
    power = (np.abs(np.fft.rfftn(x * win, axes=(1, 2, 3))) ** 2).mean(axis=0)
    noise = sigma**2 * float((win**2).sum())
    otf = op._otf(shape).abs().numpy()
    noise_only = otf < 0.01 * otf.max()
    if noise_only.sum() >= 16:
        noise = max(noise, float(power[noise_only].mean()))
    share = np.minimum(noise / np.maximum(power, 1e-30), 1.0)
    return float((share * weight).sum() / weight.sum())


def main() -> None:
    import ssi_3d
    import torch

    from ssi_dask import lr
    from ssi_dask.bench.synthetic import structure_3d
    from ssi_dask.ssi.forward import forward_operator
    from ssi_dask.ssi.train import _noise_sigma, _NullSpacePenalty

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,128,128")
    parser.add_argument("--kinds", default="filaments,shells,beads,blobs")
    parser.add_argument("--noise", default="very-low")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    shape = tuple(int(v) for v in args.shape.split(","))
    psf = ssi_3d.benchmark_psf("17,31,31", 0.3, 1.2)
    op, _ = forward_operator(psf, shape, torch.device("cpu"), "same")
    band = _NullSpacePenalty(op, shape, "cpu")  # the penalties' band energy, whole volume
    patch_op, _ = forward_operator(psf, (args.patch,) * 3, torch.device("cpu"), "valid")
    plan = lr.get_plan(psf, shape)

    def energy(values: np.ndarray) -> float:
        return float(band(torch.from_numpy(np.ascontiguousarray(values, np.float32))[None]))

    rows = []
    for kind in args.kinds.split(","):
        truth = structure_3d(kind, shape, aspect=3.0, seed=args.seed)
        noisy = ssi_3d.degrade(truth, psf, args.noise, args.seed)
        lo, hi = np.percentile(noisy, (0.01, 99.99))
        x = ((noisy - lo) / (hi - lo)).astype(np.float32)
        sigma = _noise_sigma(x)
        added = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * sigma
        count = PRIOR_COUNTS.get(kind, 40)
        prior = plan.deconvolve(np.clip(x, 1e-3, None), count, acceleration="nesterov")
        moved = plan.deconvolve(np.clip(x + added, 1e-3, None), count, acceleration="nesterov")
        scaled_truth = (truth - lo) / (hi - lo)
        row = {
            "kind": kind,
            "sigma": sigma,
            "prior_count": count,
            "noise_share": noise_share(x, sigma, patch_op, args.patch),
            "prior_energy": energy(prior),
            "prior_noise_response": energy(moved - prior),
            "truth_energy": energy(scaled_truth),
            "prior_error_energy": energy(prior - scaled_truth),
        }
        row["prior_noise_fraction"] = row["prior_noise_response"] / row["prior_energy"]
        rows.append(row)
        print(
            f"{kind}: sigma {sigma:.4f}, noise share {row['noise_share']:.2f}, prior noise / "
            f"prior {row['prior_noise_fraction']:.3f}, truth {row['truth_energy']:.2e}, prior "
            f"error {row['prior_error_energy']:.2e}",
            flush=True,
        )
    print()
    print(
        "| kind | sigma (normalised) | noise share of the data | prior noise / prior | truth "
        "| prior's error |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['kind']} | {r['sigma']:.4f} | {r['noise_share']:.2f} | "
            f"{r['prior_noise_fraction']:.3f} | {r['truth_energy']:.2e} | "
            f"{r['prior_error_energy']:.2e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
