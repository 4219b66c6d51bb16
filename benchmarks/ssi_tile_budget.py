"""SSI's chunk kernel per CPU core and its peak memory against the tile budget (issue 16 item 6).

:func:`ssi_dask.ssi.predict_chunk` cuts a chunk into tiles, each with the network's halo of
context, sized so that one network call's estimated activations (tile input voxels x
:func:`ssi_dask.ssi.tiling.bytes_per_voxel`) fit a budget (:data:`CPU_BUDGET_BYTES` on the
CPU). Small tiles recompute their halo many times over: with the 24-voxel halo of the 3D
default network, a 32x64x64 tile computes 7.7 voxels per voxel it keeps. This script measures,
for each budget, in a fresh process each (peak memory is a process's high-water mark):

* the CPU seconds of ``predict_chunk`` (the best of ``--repeats`` calls; the reference's
  one) on one chunk of ``--chunk`` output voxels with the
  model's halo around it, as a chunked run passes it (z held whole, the planner's rule: there
  only the network's edge halo), torch on one thread: voxels/s per core;
* the peak resident memory the call added above the memory before it (``VmHWM`` reset through
  ``/proc/self/clear_refs``; the block itself was allocated before), against the estimate of
  one network call's tiles and :func:`ssi_dask.ssi.tiling.chunk_task_bytes`, the task's
  estimate that the planner's memory checks use;
* the largest difference from the first output of the same model and transforms (tiling is
  exact: float rounding).

Two models, trained briefly (the weights do not change the cost): without a prior, and with
the 3D default's prior (``--prior`` Nesterov-accelerated Lucy-Richardson iterations, computed
once on the whole block before the tiles). ``--reference`` adds the filing-time kernel: the
plain network as trained (no inference copy), 16 test-time transforms, no prior, tiles chosen
with the 512 MiB budget and the filing-time estimate of 480 bytes per voxel; ``--previous``
the fast kernel with its tiles sized that way (main before issue 16's thirteenth session).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ssi_tile_budget.py --budgets 512,1024,2048 \\
        --reference --json benchmarks/ssi_tile_budget_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: The filing-time kernel's tile sizing: 512 MiB at 480 bytes per voxel (issue 16's main).
FILING_BUDGET = 512 * 2**20
FILING_BYTES_PER_VOXEL = 480


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _child(args) -> None:
    """One timed call in this (fresh) process; prints one JSON line."""
    import torch

    from ssi_dask.ssi import load_checkpoint, predict_chunk
    from ssi_dask.ssi.tiling import bytes_per_voxel, choose_tile, chunk_task_bytes

    torch.set_num_threads(1)
    if args.plain:
        import importlib

        importlib.import_module("ssi_dask.ssi.predict").FAST_INFERENCE = False
    model = load_checkpoint(args.model)
    chunk = tuple(int(v) for v in args.chunk.split(","))
    halo = model.halo
    margins = [halo] * len(chunk)
    outside = None
    if len(chunk) == 3:  # z held whole (the planner's rule): there only the network's halo
        margins[0] = model.edge_halo
        outside = [(margins[0], margins[0]), (0, 0), (0, 0)]
    rng = np.random.default_rng(0)
    block = rng.random(tuple(c + 2 * m for c, m in zip(chunk, margins)), dtype=np.float32)
    budget = int(args.budget * 2**20)
    old_tiles = args.plain or args.old_tiles  # tiles sized as before issue 16's 13th session
    per_voxel = FILING_BYTES_PER_VOXEL if old_tiles else bytes_per_voxel(model.network)
    tile = choose_tile(chunk, model.edge_halo, model.alignment, budget, per_voxel)
    tile_input = int(np.prod([t + 2 * model.edge_halo for t in tile]))
    kwargs = {"budget": budget}
    if old_tiles:  # the old tiles, batched as before: tiles per call = budget // (input x 480)
        now = bytes_per_voxel(model.network)  # what predict_chunk divides the budget by now
        kwargs = {"tile_shape": tile, "budget": budget * now // FILING_BYTES_PER_VOXEL}
    predict_chunk(  # warm-up on a small block: one-off allocations and the inference copy
        model,
        block[(Ellipsis, *[slice(0, 2 * m + 8) for m in margins[-2:]])],
        margin=margins,
        tta=args.tta,
        outside=outside,
        interior_only=True,
    )
    rss = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        reset = True
    except OSError:
        reset = False
    seconds = float("inf")
    for repeat in range(args.repeats):  # the best of the repeats; the peak of the first
        started = time.process_time()
        out = predict_chunk(
            model, block, margin=margins, tta=args.tta, outside=outside, interior_only=True,
            **kwargs,
        )  # fmt: skip
        seconds = min(seconds, time.process_time() - started)
        if repeat == 0:
            peak = _status_kib("VmHWM")
    np.save(args.out, out[tuple(slice(m, m + c) for m, c in zip(margins, chunk))])
    print(
        json.dumps(
            {
                "seconds": seconds,
                "voxels_per_s": int(np.prod(chunk)) / seconds,
                "tile": list(tile),
                "tile_input_voxels": tile_input,
                "estimate_bytes": tile_input * per_voxel,
                "task_estimate_bytes": chunk_task_bytes(model, chunk, margins, budget=budget),
                "peak_added_bytes": (peak - rss) * 1024 if reset else None,
                "peak_reset": reset,
            }
        )
    )


def _train(prior: int, ndim: int, path: Path) -> dict:
    from ssi_dask.bench.synthetic import add_poisson_gaussian_noise, blur, structure_3d
    from ssi_dask.config import SSI_TRAINING_DEFAULTS
    from ssi_dask.psf import widefield_psf
    from ssi_dask.ssi import save_checkpoint, train_ssi

    rng = np.random.default_rng(0)
    psf = widefield_psf((17, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)
    truth = structure_3d("filaments", (32, 96, 96), aspect=3.0, seed=0, density=4)
    if ndim == 2:  # the PSF's focal section and a projection of the filaments
        psf = psf[psf.shape[0] // 2]
        truth = structure_3d("filaments", (8, 256, 256), aspect=3.0, seed=0, density=4).max(0)
    psf = (psf / psf.sum()).astype(np.float32)
    noisy = add_poisson_gaussian_noise(blur(truth, psf), rng, 0.0002, 0.002).astype(np.float32)
    acceleration = SSI_TRAINING_DEFAULTS[ndim]["lr_prior_acceleration"]  # the default's
    model = train_ssi(
        noisy, psf, seed=0, device="cpu", steps=3, restarts=1, lr_prior=prior,
        lr_prior_acceleration=acceleration,
    )  # fmt: skip
    save_checkpoint(model, path)
    return {"halo": model.halo, "edge_halo": model.edge_halo, "acceleration": acceleration}


def _run_child(
    model: Path, chunk: str, budget: float, tta: int, how: str, out: Path, repeats: int
) -> dict:
    """One row in a fresh process; ``how``: "plain" (the filing-time kernel), "previous"
    (tiles sized as before) or "current"."""
    command = [sys.executable, __file__, "--child", "--model", str(model), "--chunk", chunk]
    command += ["--budget", str(budget), "--tta", str(tta), "--out", str(out)]
    command += ["--repeats", str(1 if how == "plain" else repeats)]
    command += {"plain": ["--plain"], "previous": ["--old-tiles"], "current": []}[how]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="512,1024,2048", help="MiB per network call")
    parser.add_argument(
        "--chunk",
        default="64,256,256",
        help="output voxels of one chunk; two sizes for 2D (e.g. 2048,2048)",
    )
    parser.add_argument(
        "--prior",
        type=int,
        default=30,
        help="prior iterations (accelerated as the dimension's default: in 3D, not in 2D)",
    )
    parser.add_argument("--tta", type=int, help="test-time transforms (default: 2 in 3D, 8 in 2D)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls per row, the best kept (reference: 1)"
    )
    parser.add_argument("--reference", action="store_true", help="add the filing-time kernel")
    parser.add_argument(
        "--previous",
        action="store_true",
        help="add the kernel's tiles as sized before (512 MiB at 480 bytes per voxel)",
    )
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--old-tiles", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from ssi_dask.config import SSI_TRAINING_DEFAULTS, SSI_TTA_DEFAULTS

        ndim = len(args.chunk.split(","))
        tta = args.tta or SSI_TTA_DEFAULTS[ndim]
        cases = []
        if args.reference:  # the filing-time default: 16 transforms in 3D, 8 in 2D
            most = {2: 8, 3: 16}[ndim]
            cases.append((f"filing-time (plain, tta {most}, no prior)", 0, "plain", most, [512.0]))
        budgets = [float(b) for b in args.budgets.split(",")]
        priors = [0] + ([args.prior] if args.prior else [])
        accelerated = SSI_TRAINING_DEFAULTS[ndim]["lr_prior_acceleration"] == "nesterov"
        for prior in priors:
            label = "no prior"
            if prior:
                label = f"prior {prior}{' accelerated' if accelerated else ''}"
            if args.previous:
                cases.append((f"{label}, tiles as before", prior, "previous", tta, [512.0]))
            cases.append((label, prior, "current", tta, budgets))
        models: dict[int, tuple[Path, dict]] = {}
        firsts: dict[tuple[int, int], np.ndarray] = {}
        for label, prior, how, tta, case_budgets in cases:
            if prior not in models:
                path = tmp / f"prior{prior}.ckpt"
                models[prior] = (path, _train(prior, ndim, path))
            path, info = models[prior]
            for budget in case_budgets:
                out = tmp / f"out_{len(rows)}.npy"
                row = {"kernel": label, "prior": prior, "tta": tta, "budget_mib": budget}
                row.update(info)
                row["chunk"] = [int(v) for v in args.chunk.split(",")]
                row.update(_run_child(path, args.chunk, budget, tta, how, out, args.repeats))
                result = np.load(out)
                first = firsts.setdefault((prior, tta), result)  # same model and transforms
                row["max_diff_vs_first"] = float(np.abs(result - first).max())
                rows.append(row)
                print(json.dumps(row), flush=True)
    reference = rows[0]["voxels_per_s"] if args.reference else None
    print()
    print(
        "| kernel | budget MiB | tile | vox/s/core | vs filing-time | peak added MiB | "
        "tiles' estimate MiB | task estimate MiB | peak / task estimate | max diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['voxels_per_s'] / reference:.1f}x" if reference else "-"
        added = r["peak_added_bytes"]
        added_mib = "-" if added is None else f"{added / 2**20:.0f}"
        share = "-" if added is None else f"{added / r['task_estimate_bytes']:.2f}"
        tile = "x".join(str(t) for t in r["tile"])
        print(
            f"| {r['kernel']} | {r['budget_mib']:.0f} | {tile} | {r['voxels_per_s']:.0f} | "
            f"{ratio} | {added_mib} | {r['estimate_bytes'] / 2**20:.0f} | "
            f"{r['task_estimate_bytes'] / 2**20:.0f} | {share} | "
            f"{r['max_diff_vs_first']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
