"""How far a chunk's cut reaches into Lucy-Richardson's result, classic and accelerated.

The halo rule :func:`ssi_dask.lr.lr_default_depth` maps ``n`` Nesterov-accelerated iterations
to a classic count of at least equal reach (:func:`ssi_dask.lr.classic_equivalent`; it was
``max(6 n, n^2 / 8)`` from the linearised response, ``6 n`` since this script's figures) and
then applies the classic rule. This script measures the error of a cut directly: it
deconvolves a volume of ``benchmarks/ssi_3d.py`` (its 17x31x31 widefield PSF, NA 1.2) whole,
then the same volume cut along the last (lateral) axis at ``core + h`` voxels, and reports the
largest difference within the first ``core`` columns, relative to the whole result's range,
for each halo ``h``. Where the whole result's own edge matters, it is far from the cut
(``core`` starts at the volume's first column, so the only cut that differs is the one at
``core + h``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/lr_halo_seams.py --json benchmarks/lr_halo_seams_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,128,256")
    parser.add_argument("--kinds", default="filaments,blobs")
    parser.add_argument("--noise", default="very-low")
    parser.add_argument("--core", type=int, default=96, help="columns compared, from the first")
    parser.add_argument("--halos", default="16,24,32,40,48,56,64,80,96,128")
    parser.add_argument(
        "--runs",
        default="none:100,none:200,nesterov:20,nesterov:30,nesterov:40,nesterov:60",
        help="ACCELERATION:ITERATIONS pairs",
    )
    parser.add_argument("--json")
    args = parser.parse_args()

    from ssi_3d import benchmark_psf, degrade  # noqa: PLC0415

    from ssi_dask.bench.synthetic import structure_3d  # noqa: PLC0415
    from ssi_dask.lr import lr_default_depth, richardson_lucy  # noqa: PLC0415

    shape = tuple(int(v) for v in args.shape.split(","))
    halos = [int(h) for h in args.halos.split(",") if args.core + int(h) < shape[-1]]
    psf = benchmark_psf("17,31,31", 0.3, 1.2)
    rows = []
    for kind in args.kinds.split(","):
        truth = structure_3d(kind, shape, aspect=3.0, seed=0, density=1.0)
        noisy = degrade(truth, psf, args.noise, 0)
        for run in args.runs.split(","):
            acceleration, count = run.split(":")
            count = int(count)
            started = time.perf_counter()
            whole = richardson_lucy(noisy, psf, count, acceleration=acceleration, workers=1)
            scale = float(np.ptp(whole))
            errors = {}
            for halo in halos:
                cut = richardson_lucy(
                    noisy[..., : args.core + halo], psf, count, acceleration=acceleration, workers=1
                )
                difference = np.abs(cut[..., : args.core] - whole[..., : args.core])
                errors[halo] = float(difference.max()) / scale
            row = dict(
                kind=kind,
                acceleration=acceleration,
                iterations=count,
                default_halo=int(lr_default_depth(psf.shape, count, acceleration=acceleration)[-1]),
                errors=errors,
                seconds=time.perf_counter() - started,
            )
            rows.append(row)
            print(
                f"{kind} {acceleration} {count}: default halo {row['default_halo']}; "
                + ", ".join(f"h {h}: {e:.1e}" for h, e in errors.items()),
                flush=True,
            )
    columns = " | ".join(f"h {h}" for h in halos)
    print(f"\n| kind | acceleration | n | default halo | {columns} |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in halos) + " |")
    for r in rows:
        cells = " | ".join(f"{r['errors'][h]:.1e}" for h in halos)
        print(
            f"| {r['kind']} | {r['acceleration']} | {r['iterations']} | {r['default_halo']} | "
            f"{cells} |"
        )
    if args.json:
        record = dict(shape=shape, core=args.core, rows=rows)
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
