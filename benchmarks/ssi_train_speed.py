"""SSI 3D training speed per CPU core and the quality it reaches (issue 16, item 6).

Trains the same generated volume (mixed structures through a widefield PSF, as in
``benchmarks/ssi_tta.py``) with the default 3D recipe, once per seed on each of two code paths:

- ``reference``: the training loop as at filing time: the network in the default memory
  layout on the CPU, and the Lucy-Richardson baselines / self-check FFTs at the padded patch
  size as it is (e.g. 52x94x94: 47 is prime);
- ``current``: channels-last training on the CPU (:data:`ssi_dask.ssi.train.CPU_CHANNELS_LAST`)
  and the FFTs of :class:`~ssi_dask.ssi.forward.PSFOperator` at the next 2^a 3^b 5^c size.

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
import time
from pathlib import Path

import numpy as np

PARTS = {
    # name: (file suffix, function name) of the cumulative cProfile entries
    "network forward": ("ssi/model.py", "forward"),
    "backward": ("autograd/graph.py", "_engine_run_backward"),
    "LR baselines": ("ssi/train.py", "_lr_baselines"),
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


def _set_path(path: str) -> dict:
    """Switch the code path; returns what to restore."""
    train = importlib.import_module("ssi_dask.ssi.train")
    operator = importlib.import_module("ssi_dask.ssi.forward").PSFOperator
    saved = {
        "channels_last": train.CPU_CHANNELS_LAST,
        "valid": operator.valid,
        "same_transpose": operator.same_transpose,
    }
    train.CPU_CHANNELS_LAST = path == "current"
    if path == "reference":
        operator.valid = _reference_valid
        operator.same_transpose = _reference_same_transpose
    return saved


def _restore(saved: dict) -> None:
    importlib.import_module("ssi_dask.ssi.train").CPU_CHANNELS_LAST = saved["channels_last"]
    operator = importlib.import_module("ssi_dask.ssi.forward").PSFOperator
    operator.valid = saved["valid"]
    operator.same_transpose = saved["same_transpose"]


def _parts(profile: cProfile.Profile) -> dict:
    stats = pstats.Stats(profile).stats
    out = dict.fromkeys(PARTS, 0.0)
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        for part, (suffix, function) in PARTS.items():
            if filename.endswith(suffix) and name == function:
                out[part] += cumulative
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,64,64")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--paths", default="reference,current")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from ssi_dask.bench.metrics import psnr, ssim
    from ssi_dask.bench.synthetic import degrade, structure_3d
    from ssi_dask.psf import widefield_psf
    from ssi_dask.ssi import predict, train_ssi

    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    truth = structure_3d("mixed", shape, aspect=3.0, seed=0, density=4.0)
    psf = widefield_psf((21, 31, 31), (0.3, 0.1, 0.1), na=1.2, wavelength=0.52)
    noisy = degrade(truth, psf, seed=0, poisson_scale=0.001, gaussian_std=0.02, salt_and_pepper=0)
    train_ssi(noisy, psf, seed=0, device="cpu", steps=2, restarts=0)  # imports, first-call costs
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for path in args.paths.split(","):
            saved = _set_path(path)
            profile = cProfile.Profile(timer=time.process_time)
            started = time.process_time()
            try:
                profile.enable()
                model = train_ssi(noisy, psf, seed=seed, device="cpu", steps=args.steps)
                profile.disable()
            finally:
                _restore(saved)
            seconds = time.process_time() - started
            restored = np.clip(predict(model, noisy, tta=2), 0, 1)
            row = {
                "path": path,
                "seed": seed,
                "steps": args.steps,
                "runs": model.training.get("runs"),
                "cpu_s": seconds,
                "parts_cpu_s": _parts(profile),
                "psnr": psnr(truth, restored),
                "ssim": ssim(truth, restored),
                "val_loss": model.training.get("val_loss"),
                "self_check_passed": model.training.get("self_check", {}).get("passed"),
            }
            rows.append(row)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["parts_cpu_s"].items())
            print(
                f"{path} seed {seed}: {seconds:.1f} CPU s (runs {row['runs']}; {parts}); "
                f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f}; "
                f"self-check passed {row['self_check_passed']}",
                flush=True,
            )
    print(f"\ninput PSNR {psnr(truth, noisy):.2f} dB")
    print("| path | seed | CPU s | forward | backward | LR baselines | PSNR | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p = r["parts_cpu_s"]
        print(
            f"| {r['path']} | {r['seed']} | {r['cpu_s']:.0f} | {p['network forward']:.0f} | "
            f"{p['backward']:.0f} | {p['LR baselines']:.0f} | {r['psnr']:.2f} | {r['ssim']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
