"""What of SSI's error on a 3D benchmark volume its loss can see, and what is bias or noise.

Loads a checkpoint saved by ``benchmarks/ssi_3d.py --save-models``, regenerates its volume
(kind, seed, noise level: the benchmark's generator and PSF) and, per region of the truth
(those of ``ssi_3d_error_regions.py``: far background, background within 6 lateral voxels of
an object, object edges, interiors), splits the squared error of each estimate two ways:

- **seen / unseen**: the share of the region's error energy at frequencies the PSF
  transmits, weighted by ``|OTF|^2`` (normalised to 1 at its peak: what a forward-model
  loss, which compares the *blurred* estimate with the data, can see of it), and the rest;
- **bias / noise** for the Lucy-Richardson estimates: each is also run on the noise-free
  blurred volume; its error there is the method's bias (what it makes of the truth with no
  noise), and the noisy run's error minus it is, to first order, what the noise adds.

Estimates: SSI (``--tta`` transforms), classic Lucy-Richardson at ``--lr`` counts, and the
accelerated (Nesterov) Lucy-Richardson at the model's prior count (its prior's recipe on the
whole volume, not per patch; ``--prior`` overrides the count).

Usage::

    python benchmarks/ssi_3d_error_split.py MODEL.ckpt --kind blobs --seed 0 \
        --noise very-low --json benchmarks/ssi_3d_error_split_blobs_s0_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def seen_share(error: np.ndarray, mask: np.ndarray, otf2: np.ndarray) -> float:
    """The ``|OTF|^2``-weighted share of the energy of ``error`` restricted to ``mask``."""
    spectrum = np.abs(np.fft.rfftn(error * mask)) ** 2
    total = float(spectrum.sum())
    return float((otf2 * spectrum).sum()) / total if total else 0.0


def main() -> None:
    from ssi_3d_error_regions import add_model_volume_arguments, benchmark_volume, regions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_volume_arguments(parser)
    parser.add_argument("--prior", type=int, help="accelerated count (default: the model's)")
    args = parser.parse_args()

    import torch

    from ssi_dask.lr import _rolled_otf, richardson_lucy
    from ssi_dask.psf import blur
    from ssi_dask.ssi import load_checkpoint, predict

    torch.set_num_threads(1)
    psf, truth, noisy = benchmark_volume(args)
    shape = truth.shape
    clean = np.asarray(blur(truth, psf), dtype=np.float32)
    model = load_checkpoint(args.model)
    prior_count = args.prior or int(model.training.get("lr_prior", {}).get("iterations", 0))
    methods = {f"LR {n}": dict(num_iter=n) for n in (int(v) for v in args.lr.split(","))}
    if prior_count:
        methods[f"accelerated LR {prior_count}"] = dict(
            num_iter=prior_count, acceleration="nesterov"
        )
    t0 = time.perf_counter()
    estimates = {"SSI": (np.asarray(predict(model, noisy, tta=args.tta)), None)}
    for name, options in methods.items():
        estimates[name] = (
            np.asarray(richardson_lucy(noisy, psf, **options)),
            np.asarray(richardson_lucy(clean, psf, **options)),
        )
    print(f"estimates in {time.perf_counter() - t0:.0f} s", flush=True)

    otf2 = np.abs(_rolled_otf(psf, shape)) ** 2
    otf2 /= otf2.max()
    masks = regions(truth, args.z_step)
    rows = []
    for name, (estimate, noise_free) in estimates.items():
        error = estimate.astype(np.float64) - truth
        row = {"estimate": name, "regions": {}}
        for region, mask in masks.items():
            total = float((error[mask] ** 2).sum())
            seen = seen_share(error, mask, otf2) * total
            cell = {"total": total, "seen": seen, "unseen": total - seen}
            if noise_free is not None:
                bias = float(((noise_free.astype(np.float64) - truth)[mask] ** 2).sum())
                cell.update(bias=bias, noise=total - bias)
            row["regions"][region] = cell
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| estimate | region | squared error | seen by the loss | unseen | bias | noise |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        for region, cell in row["regions"].items():
            extra = [f"{cell[k]:.0f}" if k in cell else "-" for k in ("bias", "noise")]
            print(
                f"| {row['estimate']} | {region} | {cell['total']:.0f} | {cell['seen']:.0f} "
                f"| {cell['unseen']:.0f} | " + " | ".join(extra) + " |"
            )
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        record = dict(meta, prior_count=prior_count, model_sha256=model.training.get("sha256"))
        Path(args.json).write_text(json.dumps(dict(record, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
