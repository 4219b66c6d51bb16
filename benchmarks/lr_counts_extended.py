"""Is best-n LR's grid wide enough? Lucy-Richardson at more counts on protocol runs' data.

``benchmarks/ssi_protocol.py`` compares SSI with the best of Lucy-Richardson at 2, 5, 10 and
20 iterations (the SSI paper's protocol). Where the best count is the grid's largest (20), a
larger count may restore better and the comparison flatters SSI. This script reads the JSON
of protocol runs, degrades each record's ground truth again exactly as that run did (same
image, crop, condition and seed), runs Lucy-Richardson at ``--counts`` and prints, per record,
the best over the protocol's grid and over the extended one, against the record's SSI.

Usage::

    python benchmarks/lr_counts_extended.py benchmarks/ssi_protocol_XXX.json --crop 512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ssi_protocol import DEFAULT_IMAGES, _crop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="ssi_protocol.py JSON files")
    parser.add_argument("--crop", type=int, required=True, help="the runs' --crop")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--counts", default="2,5,10,20,30,50,100")
    parser.add_argument("--out", help="write the rows here (JSON)")
    args = parser.parse_args()

    from ssi_dask.bench.metrics import all_metrics
    from ssi_dask.bench.protocol import degrade_condition, to_truth_units
    from ssi_dask.bench.synthetic import load_ground_truth
    from ssi_dask.lr import richardson_lucy
    from ssi_dask.psf import protocol_psf

    counts = [int(c) for c in args.counts.split(",")]
    records = [r for path in args.json for r in json.loads(Path(path).read_text())]
    files = {p.stem: p for p in Path(args.images).iterdir()}
    rows = []
    print(
        "| image | condition | seed | best LR, n <= 20 (n) | best LR, n <= "
        f"{max(counts)} (n) | SSI | SSI - best LR (extended) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        truth = _crop(load_ground_truth(files[r["image"]]), args.crop)
        assert list(truth.shape) == r["shape"], (r["image"], truth.shape, r["shape"])
        degraded, psf = degrade_condition(truth, protocol_psf(2), r["condition"], r["seed"])
        scores = {}
        for n in counts:
            restored = richardson_lucy(degraded, psf, num_iter=n)
            scores[n] = all_metrics(truth, to_truth_units(restored, r["condition"]))
        check = r["metrics"].get(f"lr-{r['best_lr_iterations']}")
        mine = scores.get(r["best_lr_iterations"])
        if check and mine:  # the same data as the run: the run's own LR figure is reproduced
            assert abs(check["psnr"] - mine["psnr"]) < 1e-3, (r["image"], check, mine)
        grid = {n: s for n, s in scores.items() if n <= 20}
        n20 = max(grid, key=lambda n: grid[n]["psnr"])
        nx = max(scores, key=lambda n: scores[n]["psnr"])
        ssi = r["metrics"]["ssi"]
        gain = (
            f"{ssi['psnr'] - scores[nx]['psnr']:+.2f} dB / {ssi['ssim'] - scores[nx]['ssim']:+.3f}"
        )
        row = dict(
            image=r["image"],
            condition=r["condition"],
            seed=r["seed"],
            best_n_grid=n20,
            best_grid=scores[n20],
            best_n_extended=nx,
            best_extended=scores[nx],
            ssi=ssi,
        )
        rows.append(row)
        print(
            f"| {r['image']} | {r['condition']} | {r['seed']} | "
            f"{scores[n20]['psnr']:.2f} / {scores[n20]['ssim']:.3f} ({n20}) | "
            f"{scores[nx]['psnr']:.2f} / {scores[nx]['ssim']:.3f} ({nx}) | "
            f"{ssi['psnr']:.2f} / {ssi['ssim']:.3f} | "
            f"{gain} |",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
