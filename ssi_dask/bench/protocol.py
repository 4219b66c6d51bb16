"""The benchmark protocol of METHOD.md section 4 on one ground truth: degrade, restore, score.

Used by ``ssi-dask demo`` and ``benchmarks/ssi_protocol.py``; orchestration only (the
restorations come from :mod:`ssi_dask.lr` and :mod:`ssi_dask.ssi`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import all_metrics
from .synthetic import add_poisson_gaussian_noise, blur, degrade, quantise

LR_ITERATIONS = (2, 5, 10, 20)

#: Degradations of issue 16: the protocol, and three other conditions (low noise: read noise
#: 2 % of the range, no outliers, 12 bits; offset: ``0.15 + 0.7 * blurred`` before the noise,
#: so nothing clips; gaussian-psf: the protocol's noise through a Gaussian PSF, sigma 2 px).
CONDITIONS = ("protocol", "low-noise", "offset", "gaussian-psf")


def gaussian_psf_2d(sigma: float = 2.0, size: int = 17) -> np.ndarray:
    """A normalised 2D Gaussian PSF of ``size`` x ``size`` pixels."""
    r = np.arange(size) - size // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


#: The ``offset`` condition's camera: ``OFFSET_LEVEL + OFFSET_GAIN * blurred`` before the noise.
OFFSET_LEVEL, OFFSET_GAIN = 0.15, 0.7


def degrade_condition(
    truth: np.ndarray, psf: np.ndarray, condition: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The degraded image of one condition and the PSF it used (the restorations' PSF)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if condition == "gaussian-psf":
        psf = gaussian_psf_2d() if truth.ndim == 2 else psf
    if condition in ("protocol", "gaussian-psf"):
        return degrade(truth, psf, seed=seed), psf
    gen = np.random.default_rng(seed)
    if condition == "low-noise":
        y = add_poisson_gaussian_noise(blur(truth, psf), gen, gaussian_std=0.02)
        return np.clip(quantise(y, bits=12), 0, 1).astype(np.float32), psf
    y = add_poisson_gaussian_noise(OFFSET_LEVEL + OFFSET_GAIN * blur(truth, psf), gen)  # offset
    return np.clip(quantise(y, bits=10), 0, 1).astype(np.float32), psf


def to_truth_units(image: np.ndarray, condition: str) -> np.ndarray:
    """An image of ``condition``'s intensity scale mapped onto the ground truth's and clipped to
    [0, 1] (the scale every metric is computed on): the ``offset`` condition's level and gain
    undone, the other conditions' images only clipped."""
    image = np.asarray(image, dtype=np.float32)
    if condition == "offset":
        image = (image - np.float32(OFFSET_LEVEL)) / np.float32(OFFSET_GAIN)
    return np.clip(image, 0, 1)


@dataclass
class ProtocolResult:
    """Metrics, timings and images of one protocol run.

    Attributes
    ----------
    metrics : dict
        ``{"input": {...}, "lr-2": {...}, ..., "best-lr": {...}, "ssi": {...}}``, each with
        ``psnr``, ``ssim`` (data range 1, 7x7 window), ``mi`` and ``smi``.
    best_lr_iterations : int
        The LR iteration count with the best PSNR (an oracle choice).
    times : dict
        Seconds: ``lr-N`` per count, ``ssi_train`` and ``ssi_predict``.
    images : dict
        ``ground_truth``, ``input``, ``best-lr`` and ``ssi`` arrays (clipped to [0, 1]).
    info : dict
        Training summary (steps, restarts, validation losses) when SSI ran.
    """

    metrics: dict[str, dict[str, float]]
    best_lr_iterations: int
    times: dict[str, float]
    images: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table of the metrics, one row per restoration."""
        rows = ["| restoration | PSNR (dB) | SSIM | MI | SMI |", "| --- | --- | --- | --- | --- |"]
        for name, values in self.metrics.items():
            label = f"best LR (n={self.best_lr_iterations})" if name == "best-lr" else name
            rows.append(
                f"| {label} | {values['psnr']:.2f} | {values['ssim']:.3f} | "
                f"{values['mi']:.3f} | {values['smi']:.3f} |"
            )
        return "\n".join(rows)


def run_protocol(
    ground_truth: np.ndarray,
    psf: np.ndarray,
    *,
    seed: int = 0,
    lr_iterations: Sequence[int] = LR_ITERATIONS,
    ssi: bool = True,
    device: str = "auto",
    ssi_options: dict | None = None,
    progress: bool | Callable = False,
    log: Callable[[str], None] | None = None,
    condition: str = "protocol",
) -> ProtocolResult:
    """Degrade ``ground_truth`` with the protocol, restore it with LR and SSI, and score both.

    Parameters
    ----------
    ground_truth : numpy.ndarray
        2D or 3D image in [0, 1].
    psf : numpy.ndarray
        The blur kernel (e.g. :func:`ssi_dask.psf.protocol_psf`), used for degradation and for
        both restorations (the exact PSF, as in the protocol).
    seed : int
        Seed of the degradation noise and of SSI training.
    lr_iterations : sequence of int
        Lucy-Richardson iteration counts to compare.
    ssi : bool
        Also train and apply SSI.
    device : str
        Torch device for SSI: ``"auto"``, ``"cpu"``, ``"cuda"``.
    ssi_options : dict, optional
        Extra keyword arguments for :func:`ssi_dask.ssi.train_ssi`.
    progress : bool or callable
        Training progress, passed to :func:`ssi_dask.ssi.train_ssi`.
    log : callable, optional
        Receives one line per finished step.
    condition : str
        One of :data:`CONDITIONS` (the degradation; ``"gaussian-psf"`` replaces ``psf``).
    """
    from ..lr import richardson_lucy  # noqa: PLC0415

    say = log or (lambda line: None)
    truth = np.asarray(ground_truth, dtype=np.float32)
    degraded, psf = degrade_condition(truth, psf, condition, seed)
    # scored on the truth's scale: a restoration of the offset condition's data restores
    # OFFSET_LEVEL + OFFSET_GAIN * truth, which is mapped back before scoring
    metrics = {"input": all_metrics(truth, to_truth_units(degraded, condition))}
    times: dict[str, float] = {}
    images = {"ground_truth": truth, "input": degraded}
    best = None
    for n in lr_iterations:
        started = time.perf_counter()
        restored = to_truth_units(richardson_lucy(degraded, psf, num_iter=int(n)), condition)
        times[f"lr-{n}"] = time.perf_counter() - started
        metrics[f"lr-{n}"] = all_metrics(truth, restored)
        say(f"LR n={n}: PSNR {metrics[f'lr-{n}']['psnr']:.2f} dB")
        if best is None or metrics[f"lr-{n}"]["psnr"] > metrics[f"lr-{best}"]["psnr"]:
            best = int(n)
            images["best-lr"] = restored
    metrics["best-lr"] = dict(metrics[f"lr-{best}"])
    info: dict[str, Any] = {}
    if ssi:
        from ..ssi import predict, train_ssi  # noqa: PLC0415

        started = time.perf_counter()
        model = train_ssi(
            degraded, psf, seed=seed, device=device, progress=progress, **(ssi_options or {})
        )
        times["ssi_train"] = time.perf_counter() - started
        started = time.perf_counter()
        restored = to_truth_units(predict(model, degraded, device=device), condition)
        times["ssi_predict"] = time.perf_counter() - started
        metrics["ssi"] = all_metrics(truth, restored)
        images["ssi"] = restored
        info = _training_summary(model)
        info.update(run_outcome(model))
        info["output_range_used"] = list(model.normalisation["output_range"])
        say(
            f"SSI: PSNR {metrics['ssi']['psnr']:.2f} dB "
            f"(trained {times['ssi_train']:.0f} s, applied {times['ssi_predict']:.1f} s)"
        )
    return ProtocolResult(metrics, best, times, images, info)


def run_outcome(model: Any) -> dict[str, Any]:
    """How a model's training runs went, JSON-friendly, for the benchmark tables.

    ``runs`` (started), ``runs_retried`` (started beyond ``ensemble``: a run failed),
    ``failed_runs``, ``failed_reasons`` (per failed run: ``"run 1: validation+clipped"``;
    ``validation`` = the validation-loss check, ``clipped`` / ``underfit`` = the output-level
    self-check that runs on every run), and the returned network's self-check
    (``self_check_passed``, ``self_check_flags``, ``at_bound``, ``residual_to_noise``).
    """
    training = model.training
    runs = [entry for entry in model.log if "failed" in entry]
    ensemble = int(training.get("ensemble", 1) or 1)
    outcome: dict[str, Any] = {
        "runs": len(runs),
        "runs_retried": int(training.get("runs_retried", max(len(runs) - ensemble, 0))),
        "failed_runs": sum(bool(entry["failed"]) for entry in runs),
        "failed_reasons": [
            f"run {entry['run'] + 1}: {'+'.join(entry.get('reasons') or ['validation'])}"
            for entry in runs
            if entry["failed"]
        ],
    }
    check = training.get("self_check")
    if check is not None:  # the output-level self-check (clipped / underfit outputs)
        outcome["self_check_passed"] = bool(check["passed"])
        outcome["self_check_flags"] = list(check["flags"])
        outcome["at_bound"] = check["at_bound"]
        outcome["residual_to_noise"] = {k: dict(v) for k, v in check["residual_to_noise"].items()}
    return outcome


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _training_summary(model: Any) -> dict[str, Any]:
    """The JSON-friendly parts of a model's training record."""
    summary: dict[str, Any] = {}
    record = getattr(model, "training", None) or getattr(model, "training_log", None) or {}
    if isinstance(record, dict):
        for key, value in record.items():
            if _is_scalar(value):
                summary[key] = value
            elif isinstance(value, dict) and all(_is_scalar(v) for v in value.values()):
                summary[key] = dict(value)  # e.g. the sensor model, the baselines' losses
    return summary
