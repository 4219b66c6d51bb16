"""Where the ``"interiors"`` noise penalty counts on the 3D benchmark's volumes, per truth region.

For each kind, regenerates a benchmark volume (its generator, PSF and degradation), runs the
accelerated Lucy-Richardson prior on it and on the same data with a second, independent draw
of the benchmark's noise added (the penalty's probe: the data's own noise), and reports, per
region of the truth (those of ``ssi_3d_error_regions.py``), the mean and 99th percentile of
the penalty's per-voxel weights: the background weight ``b`` and the interior share of
``noise_penalty_region="interiors"`` (:func:`ssi_dask.ssi.train._penalty_weights`,
``(1 - b)(1 - I)`` with ``I`` the background weight of the prior's lowest PSF-width mean
within three PSF widths), and, for comparison, the forms of the exploratory patches
(``benchmarks/exploratory/``): the contrast-energy flatness ``f`` gated by the wide box's
mean ``B`` (v9-v11, ``(1 - b)(1 - B) f``), ungated (v5-v8, ``(1 - b) f``), and the
interior share gated by the minimum over smaller boxes (one and two PSF widths). A design
aid: a share near 0 on a kind's structure and background means the penalty acts there as
the default does; the whole-volume prior stands in for the per-patch one of training.

Usage::

    python benchmarks/ssi_3d_flat_weights.py --shape 64,128,128 --kinds beads,blobs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from ssi_3d import add_volume_arguments, benchmark_psf, benchmark_volumes, degrade
    from ssi_3d_error_regions import regions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_volume_arguments(parser)
    parser.add_argument("--prior", type=int, default=36, help="accelerated prior count")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from ssi_dask.lr import richardson_lucy
    from ssi_dask.ssi.train import (
        _box_mean,
        _box_min,
        _interior_boxes,
        _penalty_weights,
        psf_fwhm,
    )

    torch.set_num_threads(1)
    psf = benchmark_psf(args.psf_shape, args.z_step, args.na)
    fwhm = psf_fwhm(psf)
    small, large = _interior_boxes(fwhm)

    def prior(x: np.ndarray) -> torch.Tensor:
        estimate = richardson_lucy(x, psf, num_iter=args.prior, acceleration="nesterov")
        return torch.from_numpy(np.asarray(estimate, dtype=np.float32))[None, None]

    def contrast_flatness(p: torch.Tensor, pn: torch.Tensor) -> torch.Tensor:
        """v9-v11's ``f``: the Wiener weight of the local contrast energy at the PSF's scale."""
        c, cn = p - _box_mean(p, large), pn - _box_mean(pn, large)
        var = _box_mean((cn - c).pow(2), large).clamp_min(1e-12)
        return var / (var + _box_mean(c**2, small))

    rows = []
    for kind, seed, level, truth, noisy in benchmark_volumes(args, psf):
        second = degrade(truth, psf, level, seed + 1000)
        probe = noisy + (second - noisy) / np.sqrt(2)  # one more draw of the data's noise
        p, pn = prior(noisy), prior(probe)
        var = (pn - p).pow(2).mean().clamp_min(1e-12)  # the white probe's, here the data's

        def above(x: torch.Tensor, var: torch.Tensor = var) -> torch.Tensor:
            return 1 - var / (var + torch.relu(x) ** 2)

        background = 1 - above(p)
        flat = contrast_flatness(p, pn)
        smooth = _box_mean(p, small)
        weights = {
            "background b": background,
            "interior share (1-b)(1-I) (v12)": _penalty_weights("interiors", 1.0, p, pn, 0.0, fwhm)
            - background,
            "gated flatness (1-b)(1-B) f (v9-v11)": (1 - background)
            * above(_box_mean(p, large))
            * flat,
            "ungated flatness (1-b) f (v5-v8)": (1 - background) * flat,
        }
        for name, box in (("1", small), ("2", tuple(2 * s - 1 for s in small))):
            low = _box_min(smooth, box)
            weights[f"interior share, minimum over {name} PSF width(s)"] = (1 - background) * above(
                low
            )
        masks = regions(truth, args.z_step)
        row = {"kind": kind, "seed": seed, "noise": level, "fwhm": list(fwhm)}
        for name, w in weights.items():
            w = w[0, 0].numpy()
            row[name] = {region: float(w[m].mean()) for region, m in masks.items()}
            row[name + ", 99th percentile"] = {
                region: float(np.quantile(w[m], 0.99)) for region, m in masks.items()
            }
            cells = " ".join(
                f"{region} {value:.3f} (p99 {row[name + ', 99th percentile'][region]:.3f})"
                for region, value in row[name].items()
            )
            print(f"{kind} seed {seed} {level}: {name}: {cells}", flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
