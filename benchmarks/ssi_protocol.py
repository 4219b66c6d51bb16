"""The METHOD.md benchmark protocol: LR (2/5/10/20, best-n) vs SSI on ground-truth images.

For every image in ``--images`` (8-bit PNG/TIFF ground truths, default ../shared/data/ssi2d)
and every seed: degrade with the protocol (2D ring PSF), restore with LR and SSI, score PSNR,
SSIM (data range 1, 7x7), MI and SMI. ``--conditions`` adds issue 16's other degradations
(low-noise, offset, gaussian-psf; see :data:`ssi_dask.bench.protocol.CONDITIONS`), ``--crop``
takes a centre crop (512 in issue 16). Every run reports SSI's self-check: how many training
runs it took and how many were flagged as failed (and retried). ``--volume3d`` adds the 3D
run on the built-in 64^3 ``binary_blobs`` volume with the 17^3 protocol PSF. Prints markdown
tables (per image and seed, per image mean over seeds, overall mean) and writes everything to
``--json``.

Usage::

    python benchmarks/ssi_protocol.py --seeds 0,1,2 --json benchmarks/ssi_protocol.json
    python benchmarks/ssi_protocol.py --crop 512 --seeds 0 --conditions low-noise,offset \
        --only membrane,nuclei --json low_offset.json
    python benchmarks/ssi_protocol.py --images none --volume3d --seeds 0
    python benchmarks/ssi_protocol.py --merge s0.json s1.json s2.json --json all.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "ssi2d"
ROWS = ("input", "lr-2", "lr-5", "lr-10", "lr-20", "best-lr", "ssi")


def _cases(args) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from ssi_dask.bench.synthetic import ground_truth_3d, load_ground_truth
    from ssi_dask.psf import protocol_psf

    cases = []
    if args.images != "none":
        folder = Path(args.images)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
        if args.only:
            wanted = args.only.split(",")
            files = [p for p in files if any(p.stem.startswith(w) for w in wanted)]
        if not files:
            raise SystemExit(f"no PNG/TIFF ground truths in {folder}")
        psf2d = protocol_psf(2)
        cases += [(p.stem, _crop(load_ground_truth(p), args.crop), psf2d) for p in files]
    if args.volume3d:
        cases.append(("blobs64-3d", ground_truth_3d((64, 64, 64), seed=1), protocol_psf(3)))
    return cases


def _crop(image: np.ndarray, size: int | None) -> np.ndarray:
    if not size:
        return image
    y0, x0 = (max(s - size, 0) // 2 for s in image.shape)
    return np.ascontiguousarray(image[y0 : y0 + size, x0 : x0 + size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder, or 'none'")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--volume3d", action="store_true", help="add the 3D synthetic run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, help="override SSI training steps")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--crop", type=int, help="centre crop of each 2D image (e.g. 512)")
    parser.add_argument("--only", help="comma-separated image name prefixes")
    parser.add_argument(
        "--conditions", default="protocol", help="comma-separated: protocol, low-noise, ..."
    )
    parser.add_argument("--png", metavar="DIR", help="also write one PNG figure per run here")
    parser.add_argument(
        "--output-range",
        help="SSI's output_range, 'lo,hi' in normalised units (default: the recipe's 'auto'; "
        "'0,1' = the default before issue 16's step 1)",
    )
    parser.add_argument(
        "--lr-prior",
        help="SSI's lr_prior: a Lucy-Richardson iteration count, or 'auto' (default: none)",
    )
    parser.add_argument(
        "--null-space-weight", type=float, help="SSI's null-space penalty weight (default: auto)"
    )
    parser.add_argument(
        "--ssi-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other TrainingRecipe field for SSI, e.g. average_fraction=0.25 (repeatable)",
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="print the tables of earlier runs' JSON files"
    )
    args = parser.parse_args()
    if args.merge:
        records = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        records.sort(key=lambda r: (r.get("condition", "protocol"), r["image"], r["seed"]))
        print(_tables(records))
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=2))
        return

    from ssi_dask.bench.protocol import run_protocol

    seeds = [int(s) for s in args.seeds.split(",")]
    options = {"steps": args.steps} if args.steps else {}
    if args.output_range:
        options["output_range"] = tuple(float(v) for v in args.output_range.split(","))
    if args.null_space_weight is not None:
        options["null_space_weight"] = args.null_space_weight
    for item in args.ssi_option:
        field, equals, value = item.partition("=")
        if not equals or not field.strip():
            parser.error(f"--ssi-option takes FIELD=VALUE, got {item!r}")
        try:
            options[field.strip()] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            options[field.strip()] = value  # a bare word: a string
    if args.lr_prior:
        options["lr_prior"] = args.lr_prior if args.lr_prior == "auto" else int(args.lr_prior)
    records = []
    conditions = args.conditions.split(",")
    for condition, (name, truth, psf), seed in (
        (c, case, seed) for c in conditions for case in _cases(args) for seed in seeds
    ):
        started = time.perf_counter()
        result = run_protocol(
            truth,
            psf,
            seed=seed,
            device=args.device,
            ssi_options=options,
            condition=condition,
        )
        if args.png:
            from ssi_dask.bench.figures import protocol_figure

            Path(args.png).mkdir(parents=True, exist_ok=True)
            protocol_figure(
                result, Path(args.png) / f"{name}_seed{seed}.png", title=f"{name}, seed {seed}"
            )
        record = {
            "image": name,
            "condition": condition,
            "shape": list(truth.shape),
            "seed": seed,
            "best_lr_iterations": result.best_lr_iterations,
            "metrics": result.metrics,
            "times_s": {k: round(v, 2) for k, v in result.times.items()},
            "wall_s": round(time.perf_counter() - started, 1),
            "training": result.info,
        }
        records.append(record)
        m = result.metrics
        print(
            f"{name} {condition} seed {seed}: input {m['input']['psnr']:.2f}, best LR "
            f"(n={result.best_lr_iterations}) {m['best-lr']['psnr']:.2f} / "
            f"{m['best-lr']['ssim']:.3f}, SSI {m['ssi']['psnr']:.2f} / {m['ssi']['ssim']:.3f} "
            f"(train {result.times['ssi_train']:.0f} s, runs {result.info.get('runs')}, "
            f"flagged failed {result.info.get('failed_runs')}"
            + (
                f" ({'; '.join(result.info['failed_reasons'])})"
                if result.info.get("failed_reasons")
                else ""
            )
            + f", retried {result.info.get('runs_retried')}, self-check flags "
            f"{','.join(result.info.get('self_check_flags', [])) or 'none'})",
            flush=True,
        )
        if args.json:  # written after every run: a long run leaves what it measured
            Path(args.json).write_text(json.dumps(records, indent=2))
    print()
    print(_tables(records))


def _tables(records: list[dict]) -> str:
    lines = [
        "| image | condition | seed | input | LR 2 | LR 5 | LR 10 | LR 20 | best-n LR (n) | SSI | "
        "SSI - best LR | runs (flagged failed) | runs retried | failed runs' reasons | "
        "self-check flags | train s | apply s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- | --- |",
    ]
    for r in records:
        m = r["metrics"]
        cells = [f"{m[k]['psnr']:.2f} / {m[k]['ssim']:.3f}" for k in ROWS[:5]]
        lines.append(
            f"| {r['image']} | {r.get('condition', 'protocol')} | {r['seed']} | "
            + " | ".join(cells)
            + f" | {m['best-lr']['psnr']:.2f} / {m['best-lr']['ssim']:.3f} "
            f"({r['best_lr_iterations']}) | {m['ssi']['psnr']:.2f} / {m['ssi']['ssim']:.3f} | "
            f"{m['ssi']['psnr'] - m['best-lr']['psnr']:+.2f} dB / "
            f"{m['ssi']['ssim'] - m['best-lr']['ssim']:+.3f} | "
            f"{r['training'].get('runs', '?')} ({r['training'].get('failed_runs', '?')}) | "
            f"{r['training'].get('runs_retried', '?')} | "
            f"{'; '.join(r['training'].get('failed_reasons', ['?'])) or 'none'} | "
            f"{', '.join(r['training'].get('self_check_flags', ['?'])) or 'none'} | "
            f"{r['times_s']['ssi_train']:.0f} | {r['times_s']['ssi_predict']:.1f} |"
        )
    lines += [
        "",
        "Mean over seeds (PSNR dB / SSIM / MI / SMI):",
        "",
        "| image | input | best-n LR | SSI | SSI wins (PSNR and SSIM) | runs retried |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def key(r: dict) -> str:
        condition = r.get("condition", "protocol")
        return r["image"] if condition == "protocol" else f"{r['image']} / {condition}"

    names = list(dict.fromkeys(key(r) for r in records))
    for name in names + ["mean"]:
        group = records if name == "mean" else [r for r in records if key(r) == name]
        cells = []
        for method in ("input", "best-lr", "ssi"):
            values = {
                k: np.mean([r["metrics"][method][k] for r in group])
                for k in ("psnr", "ssim", "mi", "smi")
            }
            cells.append(
                " / ".join(
                    f"{values[k]:.3f}" if k != "psnr" else f"{values[k]:.2f}"
                    for k in ("psnr", "ssim", "mi", "smi")
                )
            )
        wins = sum(
            r["metrics"]["ssi"]["psnr"] > r["metrics"]["best-lr"]["psnr"]
            and r["metrics"]["ssi"]["ssim"] > r["metrics"]["best-lr"]["ssim"]
            for r in group
        )
        retried = sum(_retried(r) for r in group)  # runs started beyond the ensemble
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wins}/{len(group)} | {retried} |")
    return "\n".join(lines)


def _retried(record: dict) -> int:
    """Runs retried in one record (older records without the count: runs beyond the first)."""
    training = record["training"]
    if "runs_retried" in training:
        return int(training["runs_retried"])
    return max(int(training.get("runs", 1)) - int(training.get("ensemble", 1) or 1), 0)


if __name__ == "__main__":
    main()
