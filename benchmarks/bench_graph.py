"""Planning cost against volume size (issue 15, item 2): 10 GB, 1 TB, 100 TB and 1 PB.

For each size, a fresh ``dask scheduler`` process and one single-threaded ``dask worker``
process are started, and a fresh client process (this script with ``--one``):

1. creates a metadata-only uint16 Zarr v3 input (the array exists, no chunk is written) of
   that size, chunks (64, 256, 256);
2. plans a Zarr-to-Zarr LR run as ``ssi_dask.run`` does (``plan_blocks`` with the measured
   halo for 10 iterations of a 7x9x9 widefield PSF, the output's provenance and fingerprint,
   the output array created, metadata only) and builds the store graph
   (:mod:`ssi_dask.storegraph`);
3. submits the first wave of chunk tasks (the wave limit) and waits until the scheduler holds
   them, then cancels.

Recorded: plan time, time to the first wave on the scheduler, tasks on the scheduler per
working chunk submitted, the client process's peak RSS (VmHWM) and the scheduler process's
peak RSS. The ratio 1 PB / 10 GB of each figure shows whether the cost grows with the volume.

``--dry-run-reference`` also times ``ssi-dask run --dry-run`` on the 1.1 TB volume (17^3
PSF, 10 iterations, the issue's case) with this tree and with the tree at ``--reference``
(default /work/main, the map_overlap planner), each in its own process.

Usage::

    python benchmarks/bench_graph.py [--dry-run-reference] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # label: (z, y, x) uint16
    "10 GB": (432, 3456, 3456),
    "1 TB": (2048, 16384, 16384),
    "100 TB": (9216, 73728, 73728),
    "1 PB": (20480, 163840, 163840),
}
STORE_CHUNKS = (64, 256, 256)


def _peak_rss(pid: int | str = "self") -> int:
    """VmHWM (peak resident set) of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(label: str, address: str, folder: Path) -> dict:
    """Plan and submit the first wave for one size; runs in its own process."""
    import zarr
    from distributed import Client

    from ssi_dask.blockwise import plan_blocks
    from ssi_dask.chunkfiles import GridRegions
    from ssi_dask.io import create_output_array
    from ssi_dask.progress import fingerprint, new_run_id, parameters_of
    from ssi_dask.psf import widefield_psf
    from ssi_dask.store import output_provenance
    from ssi_dask.storegraph import store_result

    shape = SIZES[label]
    source = folder / "input.zarr"
    zarr.create_array(store=str(source), shape=shape, chunks=STORE_CHUNKS, dtype="uint16")
    psf = widefield_psf((7, 9, 9), (0.3, 0.15, 0.15), na=1.0, wavelength=0.52)
    client = Client(address, set_as_default=False)
    baseline = _peak_rss()

    started = time.perf_counter()
    input_array = zarr.open_array(str(source), mode="r")
    plan = plan_blocks(
        input_array.shape,
        input_array.dtype,
        psf.shape,
        num_iter=10,
        store_chunks=input_array.chunks,
        psf=psf,
        tasks_per_chunk=1,
    )
    result = store_result(
        str(source), (), [], None, [psf], plan, method="lr", num_iter=10, kernel_options={}
    )
    provenance = output_provenance(
        {"ssi_dask": {"method": "lr"}},
        shape=result.shape,
        grid=result.chunks,
        output_chunks=plan.output_chunks,
        output_shards=None,
        zarr_format=3,
        computation={"method": "lr", "iterations": 10},
    )
    output = folder / "out.zarr"
    create_output_array(
        output,
        shape=result.shape,
        chunks=plan.output_chunks,
        dtype="float32",
        zarr_format=3,
        attrs={"ssi_dask": provenance},
    )
    regions = GridRegions(result.chunks)
    assert fingerprint(parameters_of(provenance)) == provenance["fingerprint"]
    plan_seconds = time.perf_counter() - started

    tasks = result.chunk_tasks(str(output), provenance["fingerprint"], new_run_id())
    limit = tasks.in_flight(client)
    tasks.start(client)
    futures = [tasks.submit(client, index) for index, _ in zip(iter(regions), range(limit))]
    while True:  # until the scheduler holds the whole first wave
        held = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        if held >= len(futures) + 1:
            break
        time.sleep(0.01)
    wave_seconds = time.perf_counter() - started
    scheduler_pid = client.run_on_scheduler(os.getpid)
    client_peak = _peak_rss()
    client.cancel(futures)
    tasks.stop(client)
    client.close()
    return {
        "size": label,
        "shape": list(shape),
        "input_bytes": 2 * math.prod(shape),
        "working_chunks": list(plan.working_chunks),
        "chunks": len(regions),
        "plan_s": plan_seconds,
        "plan_and_first_wave_s": wave_seconds,
        "first_wave_tasks": held,
        "first_wave_chunks": len(futures),
        "tasks_per_chunk": held / len(futures),
        "client_peak_mib": client_peak / 2**20,
        "client_baseline_mib": baseline / 2**20,
        "scheduler_peak_mib": _peak_rss(scheduler_pid) / 2**20,
    }


def _cluster(folder: Path) -> tuple[str, list[subprocess.Popen]]:
    address = f"tcp://127.0.0.1:{_free_port()}"
    log = open(folder / "dask.log", "w")  # noqa: SIM115
    dask = [str(Path(sys.executable).with_name("dask"))]
    scheduler = subprocess.Popen(
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
         "--no-dashboard"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    time.sleep(2.0)
    worker = subprocess.Popen(
        [*dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
         "--memory-limit", "2GiB"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return address, [scheduler, worker]


def dry_run(tree: Path, folder: Path) -> dict:
    """``ssi-dask run --dry-run`` on the 1.1 TB volume with the code at ``tree``."""
    import zarr

    from ssi_dask.psf import widefield_psf

    source = folder / "tb.zarr"
    if not source.exists():
        zarr.create_array(
            store=str(source), shape=SIZES["1 TB"], chunks=STORE_CHUNKS, dtype="uint16"
        )
        import tifffile

        psf = widefield_psf((17, 17, 17), (0.3, 0.1, 0.1), na=1.0, wavelength=0.52)
        tifffile.imwrite(folder / "psf17.tif", psf)
    code = (
        "import resource, sys, time; from ssi_dask.cli import main; t = time.perf_counter(); "
        "code = main(sys.argv[1:]); "
        "print('SECONDS', time.perf_counter() - t); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code, "run", str(source), str(folder / "dry.zarr"), "--psf",
         str(folder / "psf17.tif"), "--iterations", "10", "--dry-run", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=1800, cwd=str(tree),
    )  # fmt: skip
    lines = {
        line.split()[0]: line.split()[1]
        for line in out.stdout.splitlines()
        if line[:4] in ("SECO", "PEAK")
    }
    tasks = [line.strip() for line in out.stdout.splitlines() if "tasks in graph" in line]
    return {
        "tree": str(tree),
        "returncode": out.returncode,
        "seconds": float(lines.get("SECONDS", "nan")),
        "client_peak_mib": int(lines.get("PEAK", 0)) / 2**20,
        "tasks": tasks[0] if tasks else out.stderr[-300:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run-reference", action="store_true")
    parser.add_argument("--reference", default="/work/main")
    parser.add_argument("--json")
    parser.add_argument("--only-dry-run", action="store_true", help="skip the four sizes")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.address, Path(args.folder))))
        return
    rows = []
    report: dict = {}
    for label in SIZES if not args.only_dry_run else ():
        with tempfile.TemporaryDirectory(prefix="bench-graph-") as tmp:
            folder = Path(tmp)
            address, processes = _cluster(folder)
            try:
                out = subprocess.run(
                    [sys.executable, __file__, "--one", label, "--address", address,
                     "--folder", str(folder)],
                    capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                row = json.loads(out.stdout.strip().splitlines()[-1])
            finally:
                for process in processes[::-1]:
                    process.terminate()
                    process.wait(timeout=30)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        first, last = rows[0], rows[-1]
        ratios = {
            key: last[key] / first[key]
            for key in ("plan_s", "plan_and_first_wave_s", "tasks_per_chunk", "client_peak_mib",
                        "scheduler_peak_mib")
        }  # fmt: skip
        print("ratio 1 PB / 10 GB:", json.dumps(ratios), flush=True)
        report = {"rows": rows, "ratios_1pb_over_10gb": ratios}
    if args.dry_run_reference:
        with tempfile.TemporaryDirectory(prefix="bench-dry-") as tmp:
            here = Path(__file__).resolve().parents[1]
            report["dry_run_1_1tb"] = [
                dry_run(here, Path(tmp)),
                dry_run(Path(args.reference), Path(tmp)),
            ]
        for entry in report["dry_run_1_1tb"]:
            print(json.dumps(entry), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
