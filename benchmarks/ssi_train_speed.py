"""SSI 3D training speed per CPU core and the quality it reaches (issue 16, item 6).

Trains the same generated volume (mixed structures through a widefield PSF, as in
``benchmarks/ssi_tta.py``) with the default 3D recipe, once per seed on each code path:

- ``reference``: the training loop as at filing time: the network in the default memory
  layout on the CPU, the Lucy-Richardson baselines / self-check FFTs at the padded patch
  size as it is (e.g. 52x94x94: 47 is prime), and no Lucy-Richardson prior (the recipe had
  none then);
- ``previous``: channels-last training on the CPU (:data:`ssi_dask.ssi.train.CPU_CHANNELS_LAST`),
  the FFTs of :class:`~ssi_dask.ssi.forward.PSFOperator` at the next 2^a 3^b 5^c size, and
  the Lucy-Richardson prior (the default since issue 16's fifth session) with its back
  projection as the valid part of the ratio padded by the PSF on each side (main before
  2026-12-06's ninth session);
- ``current``: the prior's back projection as a full convolution (FFTs at ``P + K - 1``
  instead of ``P + 2 (K - 1)``), once per ``--reuse`` value (``prior_reuse``: steps each
  prepared sample and its prior serve), and once per ``--prior-settings`` entry (the prior's
  count rule, acceleration and count range, e.g. ``one-se:none:200,paired:nesterov:100``).

Each run is profiled (``cProfile`` with ``time.process_time``, torch on one thread): CPU
seconds in total, and in the network's forward and backward passes, the Lucy-Richardson
baselines (training baselines and self-check), validation, masks and patch sampling. Quality:
PSNR / SSIM of the trained model (2 test-time transforms) against the ground truth.

Usage::

    nice -n 19 python benchmarks/ssi_train_speed.py --json benchmarks/ssi_train_speed_cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = {
    # name: (file suffix, function name) of the cumulative cProfile entries
    "network forward": ("ssi/model.py", "forward"),
    "backward": ("autograd/graph.py", "_engine_run_backward"),
    "LR baselines": ("ssi/train.py", "_lr_baselines"),
    "LR prior": ("ssi/forward.py", "__call__"),
    "validation": ("ssi/train.py", "evaluate"),
    "validation masks": ("ssi/masking.py", "validation_mask"),
    "masked input": ("ssi/masking.py", "mask_input"),
    "patch sampling": ("ssi/sampler.py", "batch"),
}


def _reference_valid(self, x):
    """``PSFOperator.valid`` at filing time: the FFT at the input's own size."""
    import torch  # noqa: PLC0415

    x = x.float()
    spatial = x.shape[-self.ndim :]
    dims = tuple(range(-self.ndim, 0))
    y = torch.fft.irfftn(torch.fft.rfftn(x, dim=dims) * self._otf(spatial), s=spatial, dim=dims)
    sl = tuple(slice(k - 1, s) for k, s in zip(self.psf.shape, spatial))
    return y[(Ellipsis, *sl)]


def _reference_same_transpose(self, x, mode="reflect"):
    """``PSFOperator.same_transpose`` at filing time: a new flipped operator per call."""
    flipped = type(self)(np.flip(self.psf).copy(), self.device)
    return flipped.same(x, mode)


def _previous_back_project(self, ratio):
    """The prior's back projection before the ninth session: ``valid`` of the padded ratio."""
    import torch  # noqa: PLC0415

    pad = []
    for k in reversed(self.op.psf.shape):
        pad += [k - 1, k - 1]
    return self.flipped.valid(torch.nn.functional.pad(ratio, pad))


def _set_path(path: str) -> dict:
    """Switch the code path; returns what to restore."""
    train = importlib.import_module("ssi_dask.ssi.train")
    forward = importlib.import_module("ssi_dask.ssi.forward")
    operator, prior = forward.PSFOperator, forward.LucyRichardsonPrior
    saved = {
        "channels_last": train.CPU_CHANNELS_LAST,
        "valid": operator.valid,
        "same_transpose": operator.same_transpose,
        "back_project": prior._back_project,
    }
    train.CPU_CHANNELS_LAST = path != "reference"
    if path == "reference":
        operator.valid = _reference_valid
        operator.same_transpose = _reference_same_transpose
    if path in ("reference", "previous"):
        prior._back_project = _previous_back_project
    return saved


def _restore(saved: dict) -> None:
    importlib.import_module("ssi_dask.ssi.train").CPU_CHANNELS_LAST = saved["channels_last"]
    forward = importlib.import_module("ssi_dask.ssi.forward")
    forward.PSFOperator.valid = saved["valid"]
    forward.PSFOperator.same_transpose = saved["same_transpose"]
    forward.LucyRichardsonPrior._back_project = saved["back_project"]


def _parts(profile: cProfile.Profile) -> dict:
    stats = pstats.Stats(profile).stats
    out = dict.fromkeys(PARTS, 0.0)
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        for part, (suffix, function) in PARTS.items():
            if filename.endswith(suffix) and name == function:
                out[part] += cumulative
    return out


def _num(value, digits: int) -> str:
    """``value`` with ``digits`` decimals, or "-" when not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,64")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument(
        "--current-steps",
        help="the current path once per value (training steps), e.g. 600,200,100 (default: "
        "--steps); the other paths train --steps steps",
    )
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--paths", default="reference,previous,current")
    parser.add_argument("--reuse", default="1", help="prior_reuse values of the current path")
    parser.add_argument(
        "--prior-settings",
        help="the current path once per RULE:ACCELERATION[:MAX_ITER] (lr_prior_rule, "
        "lr_prior_acceleration, lr_prior_max_iter), e.g. one-se:none:200,paired:nesterov:100 "
        "(default: the recipe's)",
    )
    parser.add_argument(
        "--kind",
        help="train on a volume of benchmarks/ssi_3d.py instead (filaments, shells, beads, "
        "blobs: its 17x31x31 widefield PSF, density 1, noise --noise)",
    )
    parser.add_argument("--noise", default="very-low", help="ssi_3d.py noise level (--kind)")
    parser.add_argument(
        "--no-quality",
        dest="quality",
        action="store_false",
        help="time the training only (no prediction, no PSNR / SSIM: for short runs)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from ssi_dask.bench.metrics import psnr, ssim
    from ssi_dask.bench.synthetic import degrade, structure_3d
    from ssi_dask.psf import widefield_psf
    from ssi_dask.ssi import predict, train_ssi

    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.kind:
        from ssi_3d import benchmark_psf  # noqa: PLC0415
        from ssi_3d import degrade as degrade_3d  # noqa: PLC0415

        truth = structure_3d(args.kind, shape, aspect=3.0, seed=0, density=1.0)
        psf = benchmark_psf("17,31,31", 0.3, 1.2)
        noisy = degrade_3d(truth, psf, args.noise, 0)
    else:
        truth = structure_3d("mixed", shape, aspect=3.0, seed=0, density=4.0)
        psf = widefield_psf((21, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)
        noisy = degrade(
            truth, psf, seed=0, poisson_scale=0.001, gaussian_std=0.02, salt_and_pepper=0
        )
    train_ssi(noisy, psf, seed=0, device="cpu", steps=2, restarts=0)  # imports, first-call costs
    rows = []
    variants = []
    settings = args.prior_settings.split(",") if args.prior_settings else []
    pairs = [p.split(":") for p in settings] or [None]
    current_steps = [int(v) for v in (args.current_steps or str(args.steps)).split(",")]
    for path in args.paths.split(","):
        if path == "current":
            for reuse in args.reuse.split(","):
                for pair in pairs:
                    for steps in current_steps:
                        options = {"prior_reuse": int(reuse), "steps": steps}
                        if pair:
                            options.update(lr_prior_rule=pair[0], lr_prior_acceleration=pair[1])
                            if len(pair) > 2:
                                options["lr_prior_max_iter"] = int(pair[2])
                        variants.append((path, options))
        else:
            options = {"steps": args.steps}
            variants.append((path, {"lr_prior": 0, **options} if path == "reference" else options))
    for seed in (int(s) for s in args.seeds.split(",")):
        for path, options in variants:
            saved = _set_path(path)
            profile = cProfile.Profile(timer=time.process_time)
            started = time.process_time()
            try:
                profile.enable()
                model = train_ssi(noisy, psf, seed=seed, device="cpu", **options)
                profile.disable()
            finally:
                _restore(saved)
            seconds = time.process_time() - started
            restored = np.clip(predict(model, noisy, tta=2), 0, 1) if args.quality else None
            row = {
                "path": path,
                "options": options,
                "prior_iterations": (model.training.get("lr_prior") or {}).get("iterations", 0),
                "seed": seed,
                "steps": options["steps"],
                "runs": model.training.get("runs"),
                "cpu_s": seconds,
                "parts_cpu_s": _parts(profile),
                "psnr": psnr(truth, restored) if args.quality else None,
                "ssim": ssim(truth, restored) if args.quality else None,
                "val_loss": model.training.get("val_loss"),
                "self_check_passed": model.training.get("self_check", {}).get("passed"),
            }
            rows.append(row)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["parts_cpu_s"].items())
            print(
                f"{path} {options} seed {seed}: {seconds:.1f} CPU s (runs {row['runs']}; {parts}); "
                f"PSNR {_num(row['psnr'], 2)} SSIM {_num(row['ssim'], 3)}; "
                f"self-check passed {row['self_check_passed']}",
                flush=True,
            )
    print(f"\ninput PSNR {psnr(truth, noisy):.2f} dB")
    print(
        "| path | options | seed | CPU s | forward | backward | LR prior | LR baselines | PSNR | "
        "SSIM |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p = r["parts_cpu_s"]
        print(
            f"| {r['path']} | {r['options']} | {r['seed']} | {r['cpu_s']:.0f} | "
            f"{p['network forward']:.0f} | {p['backward']:.0f} | {p['LR prior']:.0f} | "
            f"{p['LR baselines']:.0f} | {_num(r['psnr'], 2)} | {_num(r['ssim'], 3)} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
