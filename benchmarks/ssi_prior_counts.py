"""Which iteration count SSI's ``lr_prior="auto"`` picks, per range and rule, in 2D and 3D.

Issue 16: the hold-out rule behind ``lr_prior="auto"`` scores counts 1 to
``lr_prior_max_iter`` and takes, below the hold-out error's minimum, the fewest counts allowed
by ``lr_prior_rule`` (``"one-se"`` or ``"paired"``). This script shows the count the training
itself computes (``train_ssi``'s own call on its normalised image and prior zero; the training
is stopped right after) under every combination of ``--caps`` and ``--rules``, and the plain
minimum of the hold-out error over the largest range, for

* ``--dims 2``: every run of the 2D grid of ``benchmarks/ssi_protocol.py`` (the nine images,
  512x512 crops, the protocol's noise with seeds 0-2 and the three other conditions with seed
  0); about 7 s per run and setting on one core;
* ``--dims 3``: the volumes of ``benchmarks/ssi_3d.py`` (``--kinds``, ``--noise``,
  ``--seeds``, ``--shape``); about 2 minutes per volume and setting at 128x256x256.

Where the counts agree, the settings train the same network. No training.

Usage::

    cd benchmarks
    python ssi_prior_counts.py --crop 512 --json ssi_prior_counts_nine512_cpu.json
    python ssi_prior_counts.py --dims 3 --caps 200 --rules one-se,paired \\
        --json ssi_prior_counts_3d_rules_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ssi_3d import add_volume_arguments, benchmark_psf, benchmark_volumes
from ssi_protocol import DEFAULT_IMAGES, _crop


class _Counted(Exception):
    """Raised by the hook once the prior's counts are known (stops the training)."""


def _key(cap: int, rule: str) -> str:
    return f"count_cap{cap}" if rule == "one-se" else f"count_cap{cap}_{rule}"


def prior_counts(
    noisy: np.ndarray,
    psf: np.ndarray,
    seed: int,
    caps: list[int],
    rules: tuple[str, ...] = ("one-se",),
) -> dict:
    """The prior counts ``train_ssi(noisy, psf, seed=seed)`` would use per cap and rule.

    Hooks :func:`ssi_dask.ssi.train._prior_iterations` (the function training calls with its
    normalised image and the prior's zero), evaluates it once per cap and rule (keys as
    :func:`_key`), records the hold-out curve of the largest cap, and stops the training.
    """
    import ssi_dask.lr_auto as lr_auto
    import ssi_dask.ssi.train as train
    from ssi_dask.ssi import train_ssi

    original_rule, original_count = lr_auto.choose_iterations, train._prior_iterations
    found: dict = {}

    # max_iter and rule: replaced by each cap and rule
    def hook(lr_prior, image, psf, seed, zero, max_iter, rule, acceleration):
        for cap in caps:
            for name in rules:
                curves = []

                def choose(*args, cap=cap, curves=curves, **kwargs):
                    choice = original_rule(*args, **{**kwargs, "max_iter": cap})
                    curves.append(choice.errors["classic"])
                    return choice

                lr_auto.choose_iterations = choose
                try:
                    found[_key(cap, name)] = original_count(
                        lr_prior, image, psf, seed, zero, cap, name, acceleration
                    )
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


def _grid_2d(args) -> Iterator[tuple[dict, np.ndarray, np.ndarray, int]]:
    from ssi_dask.bench.protocol import CONDITIONS, degrade_condition
    from ssi_dask.bench.synthetic import load_ground_truth
    from ssi_dask.psf import protocol_psf

    folder = Path(args.images)
    if not folder.is_dir():
        raise SystemExit(f"no images at {folder} (give --images)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
    for condition in CONDITIONS:
        for path in files:
            truth = _crop(load_ground_truth(path), args.crop)
            for seed in (0, 1, 2) if condition == "protocol" else (0,):
                noisy, psf = degrade_condition(truth, protocol_psf(2), condition, seed)
                yield {"image": path.stem, "condition": condition, "seed": seed}, noisy, psf, seed


def _volumes_3d(args) -> Iterator[tuple[dict, np.ndarray, np.ndarray, int]]:
    psf = benchmark_psf(args.psf_shape, args.z_step, args.na)
    for kind, seed, level, _, noisy in benchmark_volumes(args, psf):
        shape = [int(v) for v in args.shape.split(",")]
        row = {"kind": kind, "noise": level, "seed": seed, "shape": shape}
        yield row, noisy, psf, seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--caps", default="50,200")
    parser.add_argument("--rules", default="one-se", help="comma-separated: one-se, paired")
    add_volume_arguments(parser)  # --dims 3: the volumes, as ssi_3d.py
    parser.add_argument("--json")
    args = parser.parse_args()

    caps = sorted(int(c) for c in args.caps.split(","))
    rules = tuple(args.rules.split(","))
    keys = [_key(c, r) for c in caps for r in rules]
    rows = []
    runs = _grid_2d(args) if args.dims == 2 else _volumes_3d(args)
    for row, noisy, psf, seed in runs:
        started = time.perf_counter()
        found = prior_counts(noisy, psf, seed, caps, rules)
        row.update({key: found[key] for key in keys})
        row["minimum"] = found["minimum"]
        row["s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(row, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    differ = [r for r in rows if len({r[key] for key in keys}) > 1]
    print(f"\n{len(rows)} runs; counts differ between {', '.join(keys)} on {len(differ)}:")
    for r in differ:
        labels = ("image", "kind", "condition", "noise")
        name = " ".join(str(value) for key, value in r.items() if key in labels)
        print(f"  {name} seed {r['seed']}: {' / '.join(str(r[key]) for key in keys)}")


if __name__ == "__main__":
    main()
