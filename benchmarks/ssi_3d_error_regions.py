"""Where SSI's error lies on a volume of the 3D benchmark, against its prior and LR.

Loads a checkpoint saved by ``benchmarks/ssi_3d.py --save-models``, regenerates its volume
(kind, seed, noise level: the benchmark's own generator and PSF), and scores against the
ground truth: SSI's output (``--tta`` transforms), its Lucy-Richardson prior alone (the same
model with the correction's last layer set to zero: the output is then exactly the prior),
and classic Lucy-Richardson at ``--lr`` counts. Per region of the truth (far background,
background within 6 lateral voxels of an object, object edges = the upper half of the
smoothed truth's gradient inside objects, interiors = the rest): the squared error's sum, the
mean SSIM (scikit-image's map, data range 1, the benchmark's SSIM), and the background's
standard deviation; and the error's energy in bands of lateral spatial frequency.

Usage::

    python benchmarks/ssi_3d_error_regions.py MODEL.ckpt --kind blobs --seed 1 \
        --noise very-low --json benchmarks/ssi_3d_error_regions_blobs_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: lateral frequency bands, cycles per voxel
BANDS = ((0, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.5), (0.5, 0.71))


def regions(truth: np.ndarray, z_step: float) -> dict[str, np.ndarray]:
    """Boolean masks of the truth's far background, near background, edges and interiors."""
    from scipy import ndimage

    background = truth < 0.02 * truth.max()
    smoothed = ndimage.gaussian_filter(truth, 1.0)
    gradient = np.sqrt(sum(g**2 for g in np.gradient(smoothed, z_step / 0.1, 1.0, 1.0)))
    inside = ~background
    edge = inside & (gradient > np.percentile(gradient[inside], 50))
    near = background & (
        ndimage.distance_transform_edt(background, sampling=(z_step / 0.1, 1, 1)) < 6
    )
    return {
        "far background": background & ~near,
        "near background": near,
        "edges": edge,
        "interiors": inside & ~edge,
    }


def band_energy(error: np.ndarray) -> dict[str, float]:
    """The error's energy per band of lateral spatial frequency."""
    power = np.abs(np.fft.rfftn(error)) ** 2
    ky = np.abs(np.fft.fftfreq(error.shape[1]))[None, :, None]
    kx = np.fft.rfftfreq(error.shape[2])[None, None, :]
    radius = np.broadcast_to(np.sqrt(ky**2 + kx**2), power.shape)
    return {f"{lo}-{hi}": float(power[(radius >= lo) & (radius < hi)].sum()) for lo, hi in BANDS}


def add_model_volume_arguments(parser: argparse.ArgumentParser) -> None:
    """A checkpoint of ``ssi_3d.py --save-models`` and the options that regenerate its volume
    (and ``--tta``, ``--lr``, ``--json``)."""
    parser.add_argument("model", help="a checkpoint from ssi_3d.py --save-models")
    parser.add_argument("--kind", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="very-low")
    parser.add_argument("--shape", default="128,256,256")
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--na", type=float, default=1.2)
    parser.add_argument("--z-step", type=float, default=0.3)
    parser.add_argument("--psf-shape", default="17,31,31")
    parser.add_argument("--tta", type=int, default=2)
    parser.add_argument("--lr", default="100,200", help="classic Lucy-Richardson counts")
    parser.add_argument("--json")


def benchmark_volume(args: argparse.Namespace):
    """``(psf, truth, noisy)`` of the volume the options of :func:`add_model_volume_arguments`
    name: the benchmark's own PSF, generator and degradation."""
    from ssi_3d import benchmark_psf, degrade

    from ssi_dask.bench.synthetic import structure_3d

    shape = tuple(int(v) for v in args.shape.split(","))
    psf = benchmark_psf(args.psf_shape, args.z_step, args.na)
    truth = structure_3d(
        args.kind, shape, aspect=args.z_step / 0.1, seed=args.seed, density=args.density
    )
    return psf, truth, degrade(truth, psf, args.noise, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_volume_arguments(parser)
    args = parser.parse_args()

    import torch
    from skimage.metrics import structural_similarity

    from ssi_dask.bench.metrics import psnr
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.ssi import load_checkpoint, predict

    torch.set_num_threads(1)
    psf, truth, noisy = benchmark_volume(args)
    model = load_checkpoint(args.model)
    prior_only = copy.deepcopy(model)
    members = getattr(prior_only.network, "members", None) or [prior_only.network]
    with torch.no_grad():
        for member in members:  # the correction's last layer: zero makes the output the prior
            member.head.weight.zero_()
            member.head.bias.zero_()
    estimates = {
        "SSI": np.clip(predict(model, noisy, tta=args.tta), 0, 1),
        "its prior": np.clip(predict(prior_only, noisy, tta=1), 0, 1),
    }
    for n in (int(v) for v in args.lr.split(",")):
        estimates[f"LR {n}"] = np.clip(richardson_lucy(noisy, psf, num_iter=n), 0, 1)
    masks = regions(truth, args.z_step)
    rows = []
    for name, estimate in estimates.items():
        error = estimate - truth
        mean_ssim, ssim_map = structural_similarity(truth, estimate, data_range=1.0, full=True)
        row = {
            "estimate": name,
            "psnr": psnr(truth, estimate),
            "ssim": float(mean_ssim),
            "squared_error": {r: float((error[m] ** 2).sum()) for r, m in masks.items()},
            "ssim_by_region": {r: float(ssim_map[m].mean()) for r, m in masks.items()},
            "far_background_std": float(estimate[masks["far background"]].std()),
            "band_energy": band_energy(error),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    correction = band_energy(estimates["SSI"] - estimates["its prior"])
    fractions = {r: float(m.mean()) for r, m in masks.items()}
    print("correction (SSI - its prior) band energy:", correction)
    print("region fractions:", fractions)
    names = list(masks)
    print("\n| estimate | PSNR / SSIM | " + " | ".join(f"SSIM {r}" for r in names) + " | "
          + " | ".join(f"sq. error {r}" for r in names) + " | far bg std |")  # fmt: skip
    print("| --- " * (3 + 2 * len(names)) + "|")
    for r in rows:
        print(
            f"| {r['estimate']} | {r['psnr']:.2f} / {r['ssim']:.3f} | "
            + " | ".join(f"{r['ssim_by_region'][n]:.3f}" for n in names)
            + " | "
            + " | ".join(f"{r['squared_error'][n]:.0f}" for n in names)
            + f" | {r['far_background_std']:.4f} |"
        )
    print("\n| estimate | " + " | ".join(f"{lo}-{hi}" for lo, hi in BANDS) + " |")
    print("| --- " * (1 + len(BANDS)) + "|")
    for r in [*rows, {"estimate": "SSI - its prior", "band_energy": correction}]:
        print(
            f"| {r['estimate']} | "
            + " | ".join(f"{v:.3g}" for v in r["band_energy"].values())
            + " |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "region_fractions": fractions, "rows": rows,
                 "correction_band_energy": correction},
                indent=2,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
