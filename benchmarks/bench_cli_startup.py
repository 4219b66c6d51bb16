"""Start-up time of the ``ssi-dask`` command line: lazy package imports vs eager ones.

Both sides run in one invocation, alternating, each in a fresh interpreter, best of N:

* ``lazy``: ``python -m ssi_dask --help`` as it is (``ssi_dask/__init__`` imports its public
  names on first use, so the parser loads neither Dask nor PyTorch);
* ``eager``: the same ``--help`` after importing every public name first, as the package's
  ``__init__`` did before (Dask, distributed, xarray, zarr...).

Usage: ``python benchmarks/bench_cli_startup.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

LAZY = "import sys; from ssi_dask.cli import main; sys.argv = ['ssi-dask', '--help']; main()"
EAGER = (
    "import sys, ssi_dask; [getattr(ssi_dask, n) for n in ssi_dask.__all__ if n != 'train']; "
    "from ssi_dask.cli import main; sys.argv = ['ssi-dask', '--help']; main()"
)


def _once(code: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], check=False, stdout=subprocess.DEVNULL, timeout=120
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"lazy": [], "eager": []}
    for _ in range(args.repeats):
        times["lazy"].append(_once(LAZY))
        times["eager"].append(_once(EAGER))
    lazy, eager = min(times["lazy"]), min(times["eager"])
    print(f"ssi-dask --help, best of {args.repeats} fresh interpreters")
    print(f"  lazy  (as shipped):          {lazy:.3f} s")
    print(f"  eager (all names imported):  {eager:.3f} s")
    print(f"  ratio eager / lazy:          {eager / lazy:.1f}x")


if __name__ == "__main__":
    main()
