"""Empty-region skipping (issue 15, item 6): compute, bytes read and output, three ways.

A mostly empty OME-Zarr volume (a quarter of the field holds blurred spots, the rest is a
camera offset of 100 with uniform noise of +-5, which does not compress), with a level-1
pyramid of 2x2x2 block means, is deconvolved with LR three ways in one run, on one
LocalCluster (2 worker processes, 1 thread each):

* ``none``: every chunk computed;
* ``input``: ``--skip-background 110``, each task deciding from the full-resolution input it
  reads (saves the compute);
* ``pyramid``: ``--skip-background 110 --skip-background-level 1``, each task deciding from the
  pyramid level first (saves the compute and the full-resolution read).

Recorded per mode: wall time, chunks skipped (and of them, unread), the bytes the workers read
through system calls (``rchar`` of /proc/PID/io, page cache included) and how far the output
is from ``none``'s (the skipped chunks hold their background value instead of LR's result;
the computed chunks must be identical). Ratios are against ``none`` in the same run.

Usage::

    nice -n 19 python benchmarks/bench_skip_background.py --json benchmarks/skip_background_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (32, 768, 768)
CHUNKS = (32, 128, 128)


def make_input(path: Path, shape: tuple[int, ...]) -> None:
    """The OME-Zarr 0.5 input: signal in one quadrant, zeros elsewhere; level 1 block means."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscale
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    volume = rng.uniform(95, 105, shape).astype(np.float32)  # camera offset 100 with noise
    quadrant = (slice(None), slice(0, shape[1] // 2), slice(0, shape[2] // 2))
    spots = (rng.random(volume[quadrant].shape) > 0.999).astype(np.float32)
    volume[quadrant] += gaussian_filter(spots, 2.0) * 20000
    z, y, x = (s // 2 for s in shape)
    level1 = volume.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5)).astype(np.float32)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    transforms = [[{"type": "scale", "scale": [0.3 * f, 0.1 * f, 0.1 * f]}] for f in (1, 2)]
    write_multiscale(
        [volume, level1],
        group,
        fmt=FormatV05(),
        axes=axes,
        coordinate_transformations=transforms,
        storage_options={"chunks": CHUNKS},
    )
    for name, data in zip(("s0", "s1"), (volume, level1)):  # every chunk stored, zeros too
        zarr.open_array(str(path / name), mode="r+").with_config({"write_empty_chunks": True})[
            ...
        ] = data
    ome = dict(group.attrs["ome"])
    ome["multiscales"] = [{**ome["multiscales"][0], "type": "mean"}]
    group.attrs["ome"] = ome


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    import zarr
    from distributed import Client, LocalCluster

    import ssi_dask

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        source = root / "in.ome.zarr"
        make_input(source, shape)
        import tifffile

        psf_file = root / "psf.tif"
        grid = np.indices((9, 15, 15), dtype=np.float32) - np.array([4, 7, 7])[:, None, None, None]
        psf = np.exp(-0.5 * ((grid[0] / 1.5) ** 2 + (grid[1] / 1.2) ** 2 + (grid[2] / 1.2) ** 2))
        tifffile.imwrite(psf_file, (psf / psf.sum()).astype(np.float32))
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            modes = {"none": {}, "input": {"skip_background": 110.0},
                     "pyramid": {"skip_background": 110.0, "skip_background_level": 1}}  # fmt: skip
            reference = None
            for mode, layout in modes.items():
                job = ssi_dask.Job(
                    input=source,
                    output=root / f"{mode}.zarr",
                    psf=ssi_dask.PSFSettings(files=(str(psf_file),)),
                    lr=ssi_dask.LRSettings(num_iter=args.iterations),
                    layout=ssi_dask.LayoutSettings(chunks=CHUNKS, output_format="zarr", **layout),
                    progress=False,
                )
                before = sum(client.run(_rchar).values())
                started = time.perf_counter()
                report = ssi_dask.run(job, client=client, echo=None)
                seconds = time.perf_counter() - started
                read = sum(client.run(_rchar).values()) - before
                output = zarr.open_array(str(root / f"{mode}.zarr"), mode="r")[...]
                if reference is None:
                    reference = output
                rows.append(
                    {
                        "mode": mode,
                        "seconds": round(seconds, 2),
                        "chunks": report.chunks,
                        "skipped": report.skipped,
                        "skipped_unread": report.skipped_unread,
                        "worker_bytes_read": int(read),
                        "max_abs_difference_to_none": float(np.abs(output - reference).max()),
                        "mean_abs_difference_to_none": float(np.abs(output - reference).mean()),
                        "signal_quadrant_identical": bool(
                            np.array_equal(
                                output[:, : shape[1] // 2, : shape[2] // 2],
                                reference[:, : shape[1] // 2, : shape[2] // 2],
                            )
                        ),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows:
        row["time_ratio"] = round(row["seconds"] / base["seconds"], 3)
        row["read_ratio"] = round(row["worker_bytes_read"] / max(1, base["worker_bytes_read"]), 3)
    result = {
        "shape": list(shape),
        "chunks": list(CHUNKS),
        "iterations": args.iterations,
        "workers": "2 processes x 1 thread",
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
