"""Which iteration count SSI's ``lr_prior="auto"`` picks on the 2D grid, over two ranges.

Issue 16: the hold-out rule behind ``lr_prior="auto"`` scores counts 1 to
``lr_prior_max_iter``. This script shows, for every run of the 2D grid of
``benchmarks/ssi_protocol.py`` (the nine images, 512x512 crops, the protocol's noise with
seeds 0-2 and the three other conditions with seed 0), the count the training itself computes
(``train_ssi``'s own call on its normalised image and prior zero; the training is stopped right
after) with the range capped at each of ``--caps``, and the plain minimum of the hold-out error
over the largest range. Where the counts agree, the two settings train the same network. No
training: about 7 s per run on one core.

Usage::

    cd benchmarks
    python ssi_prior_counts.py --crop 512 --json ssi_prior_counts_nine512_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ssi_protocol import DEFAULT_IMAGES, _crop


class _Counted(Exception):
    """Raised by the hook once the prior's counts are known (stops the training)."""


def prior_counts(noisy: np.ndarray, psf: np.ndarray, seed: int, caps: list[int]) -> dict:
    """The prior counts ``train_ssi(noisy, psf, seed=seed)`` would use under each cap.

    Hooks :func:`ssi_dask.ssi.train._prior_iterations` (the function training calls with its
    normalised image and the prior's zero), evaluates it once per cap, records the hold-out
    curve of the largest cap, and stops the training.
    """
    import ssi_dask.lr_auto as lr_auto
    import ssi_dask.ssi.train as train
    from ssi_dask.ssi import train_ssi

    original_rule, original_count = lr_auto.choose_iterations, train._prior_iterations
    found: dict = {}

    def hook(lr_prior, image, psf, seed, zero, max_iter):  # max_iter: replaced by each cap
        for cap in caps:
            curves = []

            def rule(*args, cap=cap, curves=curves, **kwargs):
                choice = original_rule(*args, **{**kwargs, "max_iter": cap})
                curves.append(choice.errors["classic"])
                return choice

            lr_auto.choose_iterations = rule
            try:
                found[cap] = original_count(lr_prior, image, psf, seed, zero, max_iter=cap)
            finally:
                lr_auto.choose_iterations = original_rule
        mean = np.mean(np.array(curves), axis=0)
        found["minimum"] = int(np.argmin(mean[1:]) + 1)
        raise _Counted

    train._prior_iterations = hook
    try:
        train_ssi(noisy, psf, seed=seed, device="cpu", lr_prior="auto")
    except _Counted:
        pass
    finally:
        train._prior_iterations = original_count
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--caps", default="50,200")
    parser.add_argument("--json")
    args = parser.parse_args()

    from ssi_dask.bench.protocol import CONDITIONS, degrade_condition
    from ssi_dask.bench.synthetic import load_ground_truth
    from ssi_dask.psf import protocol_psf

    caps = sorted(int(c) for c in args.caps.split(","))
    folder = Path(args.images)
    if not folder.is_dir():
        raise SystemExit(f"no images at {folder} (give --images)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
    rows = []
    for condition in CONDITIONS:
        for path in files:
            truth = _crop(load_ground_truth(path), args.crop)
            for seed in (0, 1, 2) if condition == "protocol" else (0,):
                noisy, psf = degrade_condition(truth, protocol_psf(2), condition, seed)
                started = time.perf_counter()
                found = prior_counts(noisy, psf, seed, caps)
                row = {"image": path.stem, "condition": condition, "seed": seed}
                row.update({f"count_cap{c}": found[c] for c in caps})
                row["minimum"] = found["minimum"]
                row["s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(row, flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2))
    differ = [r for r in rows if len({r[f"count_cap{c}"] for c in caps}) > 1]
    print(f"\n{len(rows)} runs; counts differ between caps {caps} on {len(differ)}:")
    for r in differ:
        counts = " / ".join(str(r[f"count_cap{c}"]) for c in caps)
        print(f"  {r['image']} {r['condition']} seed {r['seed']}: {counts}")


if __name__ == "__main__":
    main()
