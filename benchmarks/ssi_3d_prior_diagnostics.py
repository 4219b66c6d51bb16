"""Where SSI's Lucy-Richardson prior loses in 3D (issue 16, item 3): its zero, its masking.

The volumes, PSF and noise of ``benchmarks/ssi_3d.py`` (32x64x64 crop, ``--density 4``, PSF
17x31x31, noise ``very-low`` by default). Two parts:

* ``--part zero`` (seconds): Lucy-Richardson alone, PSNR against the truth after ``n``
  iterations, with its zero at the data's zero (the package's LR of the data as given) and at
  the normalisation's offset (the 0.01 % percentile, ~3.7 noise sigmas below zero on these
  unclipped volumes: what the prior used before the sixth session).
* ``--part model`` (one SSI training per kind): the trained model's output (``predict``), its
  prior alone, the network on the whole volume in one pass, and the network on masked copies
  of the input averaged (8 masks at the final masking density): when the prior's training
  distribution (masked inputs) differs from inference (unmasked), the masked average moves.

Usage::

    python benchmarks/ssi_3d_prior_diagnostics.py --part zero --kinds beads,filaments,blobs
    nice -n 19 python benchmarks/ssi_3d_prior_diagnostics.py --part model --kinds beads \
        --json benchmarks/ssi_3d_prior_diagnostics_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

NOISE = {"high": (0.001, 0.05), "low": (0.001, 0.01), "very-low": (0.0002, 0.002)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("zero", "model"), default="zero")
    parser.add_argument("--kinds", default="beads,filaments,blobs")
    parser.add_argument("--noise", default="very-low")
    parser.add_argument("--lr", default="25,50,100,200")
    parser.add_argument("--null-space-weight", type=float, help="SSI (default: auto)")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    from ssi_dask.bench.metrics import psnr, ssim
    from ssi_dask.bench.synthetic import add_poisson_gaussian_noise, blur, structure_3d
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.psf import widefield_psf
    from ssi_dask.ssi import predict, train_ssi
    from ssi_dask.ssi.masking import bernoulli_mask, mask_input

    psf = widefield_psf((17, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)
    psf = psf / psf.sum()
    records = []
    for kind in args.kinds.split(","):
        for level in args.noise.split(","):
            truth = structure_3d(kind, (32, 64, 64), aspect=3.0, seed=0, density=4.0)
            rng = np.random.default_rng(0)
            noisy = add_poisson_gaussian_noise(blur(truth, psf), rng, *NOISE[level])
            noisy = noisy.astype(np.float32)

            def score(image, truth=truth):
                image = np.clip(image, 0, 1)
                return round(psnr(truth, image), 3), round(ssim(truth, image), 4)

            row = {"kind": kind, "noise": level, "part": args.part}
            if args.part == "zero":
                offset = float(np.percentile(noisy, 0.01))
                row["normalisation_offset"] = offset
                for n in (int(v) for v in args.lr.split(",")):
                    row[f"lr{n}_data_zero"] = score(richardson_lucy(noisy, psf, num_iter=n))
                    shifted = richardson_lucy(noisy - np.float32(offset), psf, num_iter=n)
                    row[f"lr{n}_offset_zero"] = score(shifted + offset)
            else:
                options = {}
                if args.null_space_weight is not None:
                    options["null_space_weight"] = args.null_space_weight
                started = time.perf_counter()
                model = train_ssi(noisy, psf, seed=0, device="cpu", **options)
                row["train_s"] = round(time.perf_counter() - started, 1)
                row["ssi_options"] = options
                row["lr_prior"] = model.training.get("lr_prior")
                row["null_space_weight"] = model.training["null_space_weight"]
                row["predict"] = score(predict(model, noisy))
                net = model.network.eval()
                o, s = model.normalisation["offset"], model.normalisation["scale"]
                x = torch.from_numpy((noisy - np.float32(o)) / np.float32(s))[None, None]
                with torch.no_grad():
                    prior = net.prior(x)
                    if prior is not None:
                        row["prior"] = score(prior[0, 0].numpy() * s + o)
                    row["network_one_pass"] = score(net(x)[0, 0].numpy() * s + o)
                    generator = torch.Generator().manual_seed(1)
                    total = 0
                    for _ in range(8):
                        mask = bernoulli_mask(x.shape, model.training["rho_target"], generator)
                        total = total + net(mask_input(x, mask))
                    row["network_masked_mean8"] = score(total[0, 0].numpy() / 8 * s + o)
            records.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
