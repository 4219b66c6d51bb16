"""What the Lucy-Richardson prior costs at inference, per CPU core (issue 16 item 6).

SSI's default network (``lr_prior="auto"``, since issue 16's fifth session) takes a second
input: the Lucy-Richardson restoration of the input after ``N`` iterations. Inference then
computes that restoration once per chunk, and the chunk halo grows by Lucy-Richardson's halo
for ``N`` iterations. This script measures both, against a network without the prior, on the
same data and machine in one run:

* a model is trained (briefly: the weights do not change the cost) for each prior count
  ``N`` of ``--counts`` (0 = no prior);
* ``predict`` on the whole image or volume with the default number of test-time transforms
  for its dimensionality and with 1, timed in CPU seconds of this process with torch on one
  thread (``time.process_time``), so that "per core" holds on a shared machine;
* the chunk kernel (``predict_chunk``) on one chunk of ``--chunk2d`` / ``--chunk3d`` output
  voxels with the model's halo around it, as a chunked run passes it (in 3D with z held
  whole, the planner's rule: there only the network's edge halo), the network run for the
  chunk only (``interior_only``, as a chunked run calls it): the cost per output voxel of a
  chunked run, the halo's context included;
* the prior alone on that chunk (``block_prior``), and the halo; and the prior again with its
  back projection as main had it before the ninth session (``valid`` of the padded ratio,
  FFTs at ``P + 2 (K - 1)``; now a full convolution at ``P + K - 1``).

Usage::

    nice -n 19 python benchmarks/ssi_prior_cost.py --json benchmarks/ssi_prior_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ssi_train_speed import _restore, _set_path  # noqa: E402


def _cpu_seconds(repeats: int, fn, *args, **kwargs) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn(*args, **kwargs)
        best = min(best, time.process_time() - started)
    return best


def _case(ndim: int, args, log) -> list[dict]:
    import torch

    from ssi_dask.bench.synthetic import add_poisson_gaussian_noise, blur, structure_3d
    from ssi_dask.config import SSI_TTA_DEFAULTS
    from ssi_dask.psf import widefield_psf
    from ssi_dask.ssi import predict, predict_chunk, train_ssi
    from ssi_dask.ssi.predict import _prepare
    from ssi_dask.ssi.tiling import block_prior

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    if ndim == 3:
        shape = tuple(int(v) for v in args.shape3d.split(","))
        psf = widefield_psf((17, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)
        truth = structure_3d("filaments", shape, aspect=3.0, seed=0, density=4)
        chunk = tuple(int(v) for v in args.chunk3d.split(","))
    else:
        shape = (int(args.size2d),) * 2
        psf = widefield_psf((1, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)[0]
        truth = structure_3d("filaments", (8, *shape), aspect=3.0, seed=0, density=4).max(0)
        chunk = (int(args.chunk2d),) * 2
    psf = (psf / psf.sum()).astype(np.float32)
    noisy = add_poisson_gaussian_noise(blur(truth, psf), rng, 0.0002, 0.002).astype(np.float32)
    default_tta = SSI_TTA_DEFAULTS[ndim]
    rows = []
    for token in args.counts.split(","):
        # "30n": 30 Nesterov-accelerated iterations (lr_prior_acceleration="nesterov")
        acceleration = "nesterov" if token.endswith("n") else "none"
        count = int(token.rstrip("n"))
        model = train_ssi(
            noisy,
            psf,
            seed=0,
            device="cpu",
            steps=args.steps,
            restarts=1,
            lr_prior=count,
            lr_prior_acceleration=acceleration,
        )
        net, dev = _prepare(model, "cpu")
        halo = model.halo
        row = dict(
            ndim=ndim,
            shape=list(shape),
            prior_iterations=count,
            acceleration=acceleration,
            halo=halo,
            chunk=list(chunk),
        )
        for tta in sorted({1, default_tta}):
            seconds = _cpu_seconds(args.repeats, predict, model, noisy, tta=tta)
            row[f"predict_tta{tta}_voxels_per_s"] = noisy.size / seconds
        # a chunk inside the volume: the halo on every axis, except that in 3D z is held whole
        # (the planner's rule), where only the network's edge halo mirrors the volume's ends
        margins = [halo] * ndim
        outside = None
        if ndim == 3:
            margins[0] = model.edge_halo
            outside = [(margins[0], margins[0]), (0, 0), (0, 0)]
        block = rng.random(tuple(c + 2 * m for c, m in zip(chunk, margins)), dtype=np.float32)
        seconds = _cpu_seconds(
            args.repeats,
            predict_chunk,
            model,
            block,
            margin=margins,
            tta=default_tta,
            outside=outside,
            interior_only=True,  # as a chunked run calls it: the halo's output is cropped
        )
        row[f"chunk_tta{default_tta}_voxels_per_s"] = int(np.prod(chunk)) / seconds
        x = block.astype(np.float32)
        seconds = _cpu_seconds(args.repeats, block_prior, net, x, outside, False, dev)
        row["prior_seconds_per_chunk"] = seconds if count else 0.0
        if count and acceleration == "none":  # with the back projection before the ninth session
            saved = _set_path("previous")
            try:
                previous = _cpu_seconds(args.repeats, block_prior, net, x, outside, False, dev)
            finally:
                _restore(saved)
            row["prior_seconds_per_chunk_previous"] = previous
        row["chunk_voxels"] = int(np.prod(chunk))
        rows.append(row)
        rate = row[f"predict_tta{default_tta}_voxels_per_s"]
        log(
            f"{ndim}D N={token}: halo {halo}, predict {rate:.0f}"
            f" vox/s/core (tta {default_tta}), {row['predict_tta1_voxels_per_s']:.0f} (tta 1);"
            f" chunk {chunk} {row[f'chunk_tta{default_tta}_voxels_per_s']:.0f} vox/s/core;"
            f" prior {row['prior_seconds_per_chunk']:.2f} s per chunk"
            f" ({row.get('prior_seconds_per_chunk_previous', 0.0):.2f} s with the previous"
            " back projection)"
        )
    base = rows[0]
    for row in rows:
        for key in [k for k in row if k.endswith("_voxels_per_s")]:
            row[key.replace("_voxels_per_s", "_vs_no_prior")] = row[key] / base[key]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--counts",
        default="0,10,25,50",
        help="prior counts; 0 = no prior; a trailing n (30n) = Nesterov-accelerated",
    )
    parser.add_argument("--shape3d", default="32,128,128")
    parser.add_argument("--chunk3d", default="32,128,128", help="output voxels of one chunk")
    parser.add_argument("--size2d", type=int, default=512)
    parser.add_argument("--chunk2d", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="training steps (cost only)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dims", default="2,3")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for ndim in (int(d) for d in args.dims.split(",")):
        rows += _case(ndim, args, lambda line: print(line, flush=True))
    print()
    print(
        "| dim | prior N | halo | predict vox/s/core (default tta) | vs no prior "
        "| chunk vox/s/core | vs no prior | prior s/chunk | previous back projection |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = {2: 8, 3: 2}[r["ndim"]]
        print(
            f"| {r['ndim']}D | {r['prior_iterations']}"
            f"{' Nesterov' if r.get('acceleration') == 'nesterov' else ''} | {r['halo']} | "
            f"{r[f'predict_tta{t}_voxels_per_s']:.0f} | {r[f'predict_tta{t}_vs_no_prior']:.2f} | "
            f"{r[f'chunk_tta{t}_voxels_per_s']:.0f} | {r[f'chunk_tta{t}_vs_no_prior']:.2f} | "
            f"{r['prior_seconds_per_chunk']:.2f} | "
            f"{r.get('prior_seconds_per_chunk_previous', 0.0):.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
