"""SSI training: J-invariant masking, PSF forward model, validation pixels, restarts.

One training run:

1. normalisation statistics (robust percentiles) from random patches, stored with the model;
2. a fixed validation set: random patches whose *validation pixels* (a deterministic ~10 % of the
   image, a hash of the global coordinates) are hidden in the input and scored by the forward
   model; these pixels never enter the training loss;
3. ``steps`` Adam steps with a one-cycle learning rate, each on a batch of random patches drawn
   from the whole image; masked L2 loss on the patch interior (cropped by the PSF radius, where
   the forward model has full context) + the bounds penalty of the reference;
4. the weights are averaged over the last part of the run (``average_fraction`` of the steps,
   BatchNorm statistics included): the masked loss does not constrain the frequencies the PSF
   barely transmits, so the weights keep drifting there from step to step and any single
   snapshot carries its own noise-like texture (PSNR against ground truth swings by several dB
   between snapshots of equal validation loss); the average cancels it. Without averaging, the
   snapshot with the best validation loss is kept.

The detector's clipping (``sensor_clipping="auto"``): where the data are clipped at a bound (a
pile-up of values at the minimum or maximum), the loss compares the data with the *expected
clipped measurement* of the blurred estimate, ``E[clip(h * f + noise)]`` under a noise model
fitted to the image (:mod:`ssi_dask.ssi.sensor`), instead of ``h * f``. Clipped noise has a
positive mean on a dark background (0.04 for a true 0 under noise of std 0.1), which the plain
forward model restores as a haze; on the protocol's images that bias was a fifth to a half of
the squared error.

Failure detection without ground truth: the validation loss is compared with that of the
trivial solutions evaluated the same J-invariant way (the identity and Lucy-Richardson with 2, 5,
10, 20 iterations, each on the masked input); a run that does not capture a tenth of the best
one's gain over the identity (or gives NaN) counts as failed. Every run's network is also
checked at the output (:func:`self_check`: clipped at the output range, or underfit against
the noise model where Lucy-Richardson fits better); a flagged run counts as failed too. A
failed run is retried with another seed, up to ``restarts`` extra runs; the runs that passed
are kept first, and when every run failed the best by validation loss is kept and the model's
``training["self_check"]["passed"]`` is False. The Lucy-Richardson references are computed
once per training call.

Ensembles: ``ensemble`` successful runs (different seeds) are kept and their networks averaged
(:class:`~ssi_dask.ssi.model.EnsembleUNet`): the output's quality is close to the mean of its
members' instead of one draw from their spread (runs that differ only by seed differ by up to
1 dB PSNR on the protocol's drosophila image).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SSI_TRAINING_DEFAULTS, TrainingRecipe
from ..errors import ParameterError
from ..summary import format_duration
from .device import resolve_device
from .forward import PSFOperator, fits_valid, forward_operator
from .masking import bernoulli_mask, mask_input, rho_schedule, validation_mask
from .model import EnsembleUNet, SSIModel, UNet
from .sampler import PatchSampler, inside_mask, sample_values
from .sensor import ClippedSensor, detect_clip_bounds, estimate_noise_model
from .symmetry import apply as apply_transform
from .symmetry import psf_symmetries

__all__ = [
    "train_ssi",
    "estimate_signal_to_noise",
    "object_range",
    "self_check",
    "describe_runs",
    "DEFAULTS",
]

DEFAULTS = SSI_TRAINING_DEFAULTS  # the tuned 2D/3D defaults live in ssi_dask.config


def _patch_sampler(image, patch_shape, seed: int, overhang=None, fill: float = 0.0):
    """Random patches of an image, or of a RegionPool's regions (global origins either way);
    with ``overhang``, patches may reach past the volume's edges, holding ``fill`` there."""
    if hasattr(image, "patch_sampler"):
        return image.patch_sampler(patch_shape, seed=seed, overhang=overhang, fill=fill)
    return PatchSampler(image, patch_shape, seed=seed, overhang=overhang, fill=fill)


def _inside_masks(origins, patch_shape, image_shape) -> np.ndarray:
    """``(N, *patch_shape)`` booleans: which positions of each patch lie inside the volume."""
    return np.stack([inside_mask(o, patch_shape, image_shape) for o in origins])


#: Lucy-Richardson iteration counts whose validation losses set the failure threshold.
LOSS_LR_ITERATIONS = (2, 5, 10, 20)

#: ``lr_prior="auto"`` on a region pool: regions the iteration count is chosen on (median).
PRIOR_AUTO_REGIONS = 8

#: The Lucy-Richardson prior of a training step (and of a validation patch) treats the
#: masked pixels as not measured rather than as the fill the network's input gets, so the
#: prior's distribution at training matches the unmasked prior at inference.
PRIOR_MASK_AS_MISSING = True

#: For data with noise around a zero background, the prior's zero is the data's zero rather
#: than the normalisation's offset below it (:func:`_prior_background`).
PRIOR_ZERO_AT_BACKGROUND = True

#: Lucy-Richardson iteration counts whose fit the self-check compares the output with.
SELF_CHECK_LR_ITERATIONS = (2, 5, 10, 20, 50, 100, 200)


def _lr_baselines(op: PSFOperator, x_in: torch.Tensor, iters=LOSS_LR_ITERATIONS) -> dict:
    """Lucy-Richardson on a (masked) normalised batch; returns {n: estimate}."""
    eps = 1e-6
    y = x_in.clamp_min(0) + eps
    est = torch.full_like(y, float(y.mean()))
    out = {}
    for n in range(1, max(iters) + 1):
        ratio = y / op.same(est).clamp_min(eps)
        est = est * op.same_transpose(ratio)
        if n in iters:
            out[n] = est.clone()
    return out


class _NullSpacePenalty:
    """Energy per pixel of the output at poorly transmitted frequencies (1 - |OTF|^2 weights)."""

    def __init__(self, op: PSFOperator, x_shape, device, threshold: float = 1.0):
        nd = len(x_shape)
        win = torch.ones(x_shape, device=device)
        for ax, n in enumerate(x_shape):
            w = torch.hann_window(n, periodic=False, device=device) ** 0.5
            shape = [1] * nd
            shape[ax] = n
            win = win * w.reshape(shape)
        self.window = win
        h2 = op._otf(x_shape).abs() ** 2
        self.weight = (1 - h2 / (h2.max() * threshold**2)).clamp_min(0)
        self.band_filter = self.weight.sqrt()  # amplitude of the band, for voxel weights
        self.window_energy = float(win.pow(2).sum())
        self.norm = self.window_energy * float(np.prod(x_shape)) / 2
        self.dims = tuple(range(-nd, 0))

    def __call__(self, out: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """The energy per pixel; with ``where`` (per-voxel weights, ``out``'s shape), the
        band-passed output's energy weighted by ``where`` voxel by voxel (equal to the plain
        energy for weights of 1 up to the real FFT's edge planes, counted once there)."""
        f = torch.fft.rfftn(out.float() * self.window, dim=self.dims)
        if where is None:
            return (self.weight * (f.real**2 + f.imag**2)).sum() / (self.norm * out.shape[0])
        shape = out.shape[-len(self.dims) :]
        band = torch.fft.irfftn(f * self.band_filter, s=shape, dim=self.dims)
        return (where * band**2).sum() / (self.window_energy * out.shape[0])


def _background_weight(reference: torch.Tensor, noisy: torch.Tensor, zero: float) -> torch.Tensor:
    """Per-voxel weight of the noise-sensitivity penalty with ``noise_penalty_region=
    "background"``: ``s^2 / (s^2 + max(r - zero, 0)^2)`` with ``r`` the reference restoration
    (the Lucy-Richardson prior) and ``s^2`` its noise variance, the mean squared change of
    ``r`` when the data's noise is added (``noisy``). 1 at or below the zero level, 1/2 one
    noise std above it, ``~(s / r)^2`` on structure well above the noise: the weight a
    Wiener filter gives "nothing here", with no constant to choose."""
    reference, noisy = reference.detach().float(), noisy.detach().float()
    var = (noisy - reference).pow(2).mean().clamp_min(1e-12)
    return var / (var + torch.relu(reference - zero) ** 2)


def psf_fwhm(psf) -> tuple[int, ...]:
    """Full width at half maximum of ``psf`` per axis, in pixels: the number of pixels at or
    above half the peak on the line through the peak along that axis (at least 1)."""
    psf = np.asarray(psf, dtype=np.float64)
    peak = np.unravel_index(int(np.argmax(psf)), psf.shape)
    widths = []
    for axis in range(psf.ndim):
        index = list(peak)
        index[axis] = slice(None)
        line = psf[tuple(index)]
        widths.append(max(1, int((line >= 0.5 * line.max()).sum())))
    return tuple(widths)


#: The interior share's weight in the noise-sensitivity penalty
#: (``noise_penalty_region="interiors"``), whatever ``noise_penalty_weight``: 1 counts the output's
#: noise variance there as much as its squared error counts it. Deep inside a large bright
#: object (everything within one and a half PSF widths stands above the noise), smoothing the
#: output's poorly transmitted content removes noise and no faint structure (there is no
#: background there for faint structure to hide in), so the variance is counted in full; in
#: the background it is not (faint structure looks like background), hence the recipe's
#: weight.
INTERIOR_WEIGHT = 1.0


def _box_mean(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``x`` (``(N, 1, *spatial)``) over a box of odd ``sizes`` centred on each voxel,
    over the part of the box inside the array."""
    pool = F.avg_pool2d if len(sizes) == 2 else F.avg_pool3d
    return pool(x, sizes, stride=1, padding=[s // 2 for s in sizes], count_include_pad=False)


def _box_min(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Minimum of ``x`` (``(N, 1, *spatial)``) over a box of odd ``sizes`` centred on each
    voxel, over the part of the box inside the array."""
    pool = F.max_pool2d if len(sizes) == 2 else F.max_pool3d
    return -pool(-x, sizes, stride=1, padding=[s // 2 for s in sizes])


def _interior_boxes(fwhm: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The boxes of the interior test: the PSF's half-maximum width per axis (made odd), over
    which the level is averaged, and three times that, over which its minimum is taken."""
    small = tuple(w + 1 - w % 2 for w in fwhm)
    return small, tuple(3 * w for w in small)


def _interior_level(x: torch.Tensor, fwhm: tuple[int, ...]) -> torch.Tensor:
    """The lowest level of ``x`` around each voxel: the minimum, over a box three PSF
    half-maximum widths across, of ``x`` averaged over one PSF width. High only deep inside a
    large bright object; at the level of the background near a bead, a filament, a membrane
    or an edge."""
    small, large = _interior_boxes(fwhm)
    return _box_min(_box_mean(x, small), large)


def _penalty_weights(
    region: str,
    weight: float,
    reference,
    noisy,
    zero: float,
    fwhm: tuple[int, ...],
    white_ratio=1.0,
) -> torch.Tensor:
    """Per-voxel weights ``where`` of the noise-sensitivity penalty (scaled by ``weight``).

    ``"background"``: :func:`_background_weight`. ``"interiors"``: the same background weight
    ``b = s^2 / (s^2 + max(r - zero, 0)^2)``, counted as ``"background"`` counts it whatever the
    probe (``white_ratio``: the white probe's variance over the probe's, per voxel or one
    number; ``s^2`` the patch mean of the reference's squared change under the probe, each
    voxel's times that ratio), plus the share of large bright interiors at
    :data:`INTERIOR_WEIGHT`: ``(1 - b)(1 - I)``, with ``I`` the same weight of the
    reference's :func:`_interior_level` (the voxel's whole neighbourhood, three PSF widths
    across, stands above the noise: not a bead, a filament, a membrane, an edge, nor a noise
    spike of the background). Where no such neighbourhood exists the weights are
    ``"background"``'s."""
    if region == "background":
        return _background_weight(reference, noisy, zero)
    reference, noisy = reference.detach().float(), noisy.detach().float()
    ratio = torch.as_tensor(white_ratio, dtype=torch.float32, device=reference.device)
    var = ((noisy - reference).pow(2) * ratio).mean().clamp_min(1e-12)
    background = var / (var + torch.relu(reference - zero) ** 2)
    low = _interior_level(reference, fwhm)
    interior = 1 - var / (var + torch.relu(low - zero) ** 2)
    return background * ratio + (1 - background) * interior * (INTERIOR_WEIGHT / weight)


def _probe_sigma(region: str, ctx: _RunContext, x: torch.Tensor):
    """Standard deviation of the noise the noise-sensitivity penalty adds to the batch ``x``:
    the image's white-noise estimate ``s_w`` (``ctx.noise_sigma``); for ``region="interiors"``, the
    data's own noise where it is larger, ``sqrt(max(s_d^2, s_w^2))`` with ``s_d^2 = gain *
    level + floor`` from the noise model fitted to the validation patches and ``level`` the
    input's :func:`_interior_level` (the lowest PSF-width mean within three PSF widths), so
    the interiors of large bright objects are probed with the noise they carry, and beads,
    filaments, membranes, edges and the background with the white estimate (as
    ``"background"``)."""
    if region != "interiors":
        return ctx.noise_sigma
    gain, floor = ctx.validator.noise_model()
    level = _interior_level(x.float(), ctx.psf_fwhm).clamp_min(0)
    return (gain * level + floor).clamp_min(ctx.noise_sigma**2).sqrt()


def estimate_signal_to_noise(
    patches: np.ndarray, op: PSFOperator, band: float = 0.3, null: float = 0.01
) -> float:
    """Signal-to-noise power ratio of an image, from patches, without ground truth.

    Welch estimate of the power spectrum (mean over Hann-tapered, mean-free patches). The noise
    floor is the power at frequencies the PSF does not transmit (``|OTF| < null * max``; there
    the measurement is noise only; the median of an exponential-distributed power is
    ``ln 2`` times its mean). The signal is the median power above that floor at well
    transmitted frequencies (``|OTF| >= band * max``, DC excluded), relative to the floor.

    Parameters
    ----------
    patches : numpy.ndarray
        ``(N, *patch_shape)`` patches of the image (any common scale).
    op : PSFOperator
        The PSF operator (its OTF on the patch grid is used).
    band, null : float
        Relative OTF moduli bounding the signal and noise-only frequency sets.

    Returns
    -------
    float
        ``median(P_signal) / noise_floor - 1`` (>= 0); ``inf`` when the PSF transmits every
        frequency above ``null`` (no noise-only frequencies to measure the floor on).
    """
    nd = patches.ndim - 1
    shape = patches.shape[1:]
    axes = tuple(range(1, nd + 1))
    win = np.ones(shape)
    for ax, n in enumerate(shape):
        w = np.hanning(n)
        win = win * w.reshape([n if i == ax else 1 for i in range(nd)])
    x = patches - patches.mean(axis=axes, keepdims=True)
    power = (np.abs(np.fft.rfftn(x * win, axes=axes)) ** 2).mean(axis=0)
    h = op._otf(shape).abs().cpu().numpy()
    h = h / h.max()
    noise_only = h < null
    signal = h >= band
    signal.flat[0] = False
    if noise_only.sum() < 16 or not signal.any():
        return math.inf
    floor = float(np.median(power[noise_only])) / math.log(2)
    if floor <= 0:
        return math.inf
    return max(float(np.median(power[signal])) / floor - 1.0, 0.0)


def _noise_sigma(patches: np.ndarray) -> float:
    """Robust white-noise std (normalised units) from neighbour differences (MAD)."""
    lo, hi = float(patches.min()), float(patches.max())
    a, b = patches[..., 1:], patches[..., :-1]
    ok = (a > lo) & (a < hi) & (b > lo) & (b < hi)  # pairs untouched by clipping
    d = (a - b)[ok] if ok.sum() > 100 else (a - b).ravel()
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / math.sqrt(2))


class _WeightAverage:
    """Running mean of a network's floating-point state (weights and BatchNorm statistics)."""

    def __init__(self):
        self.total: dict | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, net) -> None:
        state = net.state_dict()
        if self.total is None:
            self.total = {k: v.detach().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    self.total[k] += v.detach()
                else:
                    self.total[k].copy_(v.detach())
        self.count += 1

    def state(self) -> dict:
        return {
            k: (v / self.count if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in self.total.items()
        }


class _PreparedSamples:
    """Training samples with their Lucy-Richardson prior, each served ``reuse`` times.

    A sample is a patch ``x``, its scored pixels, its pixel mask ``m`` and the prior of the
    masked patch. The prior does not depend on the network, so a sample prepared once can
    serve several steps; each time it is served again it goes through another random symmetry
    of the PSF (the prior, the masked input and the forward model commute with those). The
    samples of the last ``capacity`` fresh ones are drawn at random.
    """

    def __init__(self, reuse: int, capacity: int, symmetries: list, generator: torch.Generator):
        self.reuse = int(reuse)
        self.capacity = int(capacity)
        self.symmetries = symmetries
        self.generator = generator
        self.samples: list[tuple[torch.Tensor, ...]] = []
        self.served = 0  # samples served in all (fresh and again)

    def fresh_count(self, batch_size: int) -> int:
        """How many fresh samples the next batch of ``batch_size`` takes: ``batch_size /
        reuse`` on average, all of them while nothing is kept yet."""
        if not self.samples:
            return batch_size
        due = (self.served + batch_size) // self.reuse - self.served // self.reuse
        return min(batch_size, due)

    def add(self, *tensors: torch.Tensor) -> None:
        """Keep fresh samples (``tensors``: batched, first axis the sample)."""
        for i in range(tensors[0].shape[0]):
            self.samples.append(tuple(t[i : i + 1] for t in tensors))
        del self.samples[: max(len(self.samples) - self.capacity, 0)]

    def again(self, n: int) -> list[torch.Tensor]:
        """``n`` kept samples at random, each under a random symmetry (batched like ``add``)."""
        picked = []
        for _ in range(n):
            sample = self.samples[
                int(torch.randint(len(self.samples), (1,), generator=self.generator))
            ]
            t = self.symmetries[
                int(torch.randint(len(self.symmetries), (1,), generator=self.generator))
            ]
            picked.append([apply_transform(v, t).contiguous() for v in sample])
        return [torch.cat(parts) for parts in zip(*picked)]


class _Validator:
    """Fixed validation patches and their J-invariant loss."""

    def __init__(self, patches, vmasks, op: PSFOperator, device, sensor=None):
        self.sensor = sensor
        self.x = torch.from_numpy(patches)[:, None].to(device)
        self.v = torch.from_numpy(vmasks)[:, None].to(device)
        self.op = op
        self.x_in = mask_input(self.x, self.v)
        self.weight = op.crop(self.v).float()
        self.target = op.crop(self.x)
        self._noise: torch.Tensor | None = None
        self._noise_model: tuple[float, float] | None = None
        # Lucy-Richardson priors of the fixed validation patches, computed once per setting
        self._priors: dict[tuple[int, int, int], torch.Tensor] = {}

    def loss_of(self, estimate: torch.Tensor, clip=(0.0, 1.0)) -> float:
        blurred = self.measure(self.op.valid(estimate.float().clamp(*clip)))
        err = (blurred - self.target) ** 2 * self.weight
        return float(err.sum() / self.weight.sum().clamp_min(1))

    def noise_model(self) -> tuple[float, float]:
        """``(gain, floor)`` of ``sigma^2 = gain * level + floor``: the sensor's fit when the
        data are clipped, else fitted to the validation patches (once)."""
        if self._noise_model is None:
            if self.sensor is not None:
                self._noise_model = (self.sensor.gain, self.sensor.floor)
            else:
                self._noise_model = estimate_noise_model(self.x[:, 0].double().cpu().numpy())
        return self._noise_model

    def noise_variance(self) -> torch.Tensor:
        """The noise variance of each scored pixel (``gain * level + floor``, see
        :meth:`noise_model`); sets ``level``."""
        if self._noise is None:
            gain, floor = self.noise_model()
            # the level: the blurred masked input, which does not see the validation pixels'
            # own noise (selecting or weighting pixels by their noisy value would bias both)
            self.level = self.op.valid(self.x_in.float()).clamp_min(0)
            self._noise = (gain * self.level + floor).float()
        return self._noise

    def measure(self, blurred: torch.Tensor) -> torch.Tensor:
        """The expected measurement of a blurred estimate (the sensor's clipping, if any)."""
        return blurred if self.sensor is None else self.sensor.expectation(blurred)

    @torch.no_grad()
    def evaluate(self, net, clip, autocast, chunk: int = 4) -> float:
        net.eval()
        outs = []
        for i in range(0, self.x_in.shape[0], chunk):
            x = self.x_in[i : i + chunk]
            prior = None
            if getattr(net, "prior_iterations", 0):
                key = (net.prior_iterations, i, chunk)
                if key not in self._priors:
                    hidden = self.v[i : i + chunk] if PRIOR_MASK_AS_MISSING else None
                    self._priors[key] = net.prior(x, hidden)
                prior = self._priors[key]
            with autocast():
                outs.append(net(x, prior=prior).float())
        net.train()
        return self.loss_of(torch.cat(outs), clip)

    @torch.no_grad()
    def baselines(self, clip, lr: dict | None = None, iters=LOSS_LR_ITERATIONS) -> dict:
        """Validation losses of the identity and Lucy-Richardson with ``iters`` iterations
        (taken from ``lr``, ``{n: estimate}`` of :func:`_lr_baselines`, when given)."""
        lr = _lr_baselines(self.op, self.x_in, iters) if lr is None else lr
        res = {"identity": self.loss_of(self.x_in, clip)}
        for n in iters:
            res[f"lr{n}"] = self.loss_of(lr[n], clip)
        return res


def device_name(dev: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``: the training device."""
    if dev.type == "cuda":
        try:
            return f"{dev} ({torch.cuda.get_device_name(dev)})"
        except Exception:  # pragma: no cover - a device that does not answer
            return str(dev)
    return f"{dev} ({torch.get_num_threads()} threads)"


class TrainingPrinter:
    """Prints SSI training progress on stderr: the plan first, then ``step k/N``, losses,
    elapsed time and an ETA, at each evaluation and at least every ``interval`` seconds.

    The ETA counts the steps left in this run and in the runs still planned (``ensemble``);
    a restart (a run that failed its self-supervised check) adds a run and is announced.
    """

    wants_heartbeats = True

    def __init__(self, *, interval: float = 10.0, file=None):
        self.interval = float(interval)
        self.file = file
        self.plan: dict = {}

    def _print(self, text: str) -> None:
        print(text, file=self.file or sys.stderr, flush=True)

    def start(self, plan: dict) -> None:
        """Print the training plan (device, runs, steps, batch, patches)."""
        self.plan = plan
        restarts = plan["restarts"]
        self._print(
            f"[ssi] training on {plan['device']}: {plan['ensemble']} network(s) x "
            f"{plan['steps']} steps, {plan['batch_size']} patches of "
            f"{'x'.join(map(str, plan['patch_shape']))} per step"
            + (
                f"; up to {restarts} restart(s) if a run fails its self-supervised check"
                if restarts
                else ""
            )
        )

    def run_done(
        self,
        run: int,
        failed: bool,
        val: float,
        threshold: float,
        more: bool,
        *,
        reasons: Sequence[str] | None = None,
        check: dict | None = None,
    ) -> None:
        """Say when a run failed its self-supervised check, why, and what follows.

        ``reasons``: ``"validation"`` (the validation loss misses the threshold) and the
        output-level self-check's flags (``"clipped"``, ``"underfit"``; details in ``check``).
        """
        if not failed:
            return
        reasons = ["validation"] if reasons is None else list(reasons)
        details = (check or {}).get("messages", {})
        why = []
        for reason in reasons:
            if reason == "validation":
                why.append(f"val {val:.5f} >= {threshold:.5f}")
            else:
                why.append(reason + (f": {details[reason]}" if reason in details else ""))
        ensemble, restarts = self.plan.get("ensemble", 1), self.plan.get("restarts", 0)
        if not more:
            then = "; no restart left, the best runs are kept"
        elif run + 1 >= ensemble:
            then = f"; retrying with another seed (restart {run + 2 - ensemble} of {restarts})"
        else:
            then = ""
        self._print(
            f"[ssi] run {run + 1} failed its self-supervised check ({'; '.join(why)}){then}"
        )

    def self_check(self, check: dict) -> None:
        """Say when the trained model's output is clipped or underfit (:func:`self_check`)."""
        if check["flags"]:
            self._print(f"[ssi] self-check flagged {', '.join(check['flags'])}: {check['message']}")

    def finished(self, training: dict) -> None:
        """One line on the runs (how many, retried, why they failed) and the verdict."""
        self._print(f"[ssi] training done: {describe_runs(training)}")

    def __call__(self, entry: dict) -> None:
        run, elapsed = entry["run"], entry["elapsed_s"]
        steps = self.plan.get("steps", entry.get("step", 1))
        ensemble = self.plan.get("ensemble", 1)
        label = f"[ssi] run {run + 1}" + (f" of {ensemble}" if run < ensemble else " (restart)")
        if "averaged_steps" in entry:
            self._print(
                f"{label}: weights averaged over the last {entry['averaged_steps']} steps, "
                f"val {entry['val_loss']:.5f}, run took {format_duration(elapsed)}"
            )
            return
        step = entry["step"]
        per_step = elapsed / max(step, 1)
        later_runs = max(ensemble - run - 1, 0)
        eta = per_step * ((steps - step) + later_runs * steps)
        text = f"{label}: step {step}/{steps} ({100 * step / steps:.0f} %)"
        text += f"  train {entry['train_loss']:.5f}"
        if "val_loss" in entry:
            text += f"  val {entry['val_loss']:.5f}  rho {entry['rho']:.3f}"
        text += f"  elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}"
        self._print(text)


def _progress_fn(progress) -> Callable[[dict], None] | None:
    if callable(progress):
        return progress
    if progress:
        return TrainingPrinter()
    return None


@dataclass
class _RunContext:
    """What every run of one :func:`train_ssi` call shares (built once from the recipe)."""

    arch: dict
    op: Any
    validator: _Validator
    patch_shape: tuple[int, ...]
    normalisation: dict
    device: torch.device
    clip: tuple[float, float]
    null_space_weight: float
    noise_sigma: float
    val_seed: int
    overhang: tuple[int, ...] | None
    image_shape: tuple[int, ...]
    symmetries: list
    max_time: float | None
    report: Callable[[dict], None] | None
    prior_psf: np.ndarray | None = None
    psf_fwhm: tuple[int, ...] = ()


def train_ssi(
    image,
    psf,
    recipe: TrainingRecipe | None = None,
    *,
    seed: int = 0,
    device="auto",
    progress=False,
    max_time: float | None = None,
    num_threads: int | None = None,
    **overrides: Any,
) -> SSIModel:
    """Train an SSI network on one image (2D or 3D) without ground truth.

    Parameters
    ----------
    image : array-like or RegionPool
        2D or 3D image (NumPy, Zarr, Dask...). Only random patches are read. Or a
        :class:`~ssi_dask.ssi.regions.RegionPool` of regions sampled from a large volume
        (:func:`ssi_dask.train`): patches are drawn inside the regions and the normalisation
        statistics come from the pool.
    psf : array-like
        The PSF, same number of dimensions as the image (any size: a PSF as large as the
        patches or the volume is trained with the ``"same"`` forward operator).
    recipe : TrainingRecipe, optional
        How to train (:class:`ssi_dask.config.TrainingRecipe`; default: the tuned 2D/3D
        recipe). Its fields are described below.
    seed : int
        Seed of the weights, patch positions, masks (same seed and device -> same weights).
        Restart ``r`` uses ``seed + 1000 * r``.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``. Mixed precision (bfloat16 autocast) on CUDA.
    progress : bool or callable
        Print progress lines, or call ``progress(entry)`` at each evaluation.
    max_time : float, optional
        Wall-clock budget in seconds for each run (stops early; not reproducible).
    num_threads : int, optional
        ``torch.set_num_threads`` for CPU training.
    **overrides
        Recipe fields changed for this call (``steps=100``); checked like the recipe's, an
        unknown name is refused with the known ones.

    Recipe fields
    -------------
    steps : int
        Optimiser steps per run (one-cycle schedule over them). Defaults:
        ``ssi_dask.config.SSI_TRAINING_DEFAULTS``.
    patch_size, batch_size : int
        Patch side and patches per step (defaults in :data:`ssi_dask.config.SSI_TRAINING_DEFAULTS`).
    levels, base_channels, max_channels, batch_norm :
        UNet architecture (defaults: 3 resolution levels, 8 base channels).
    learning_rate, weight_decay : float
        Peak learning rate of the one-cycle schedule and AdamW weight decay.
    rho_start, rho_target, rho_decay_fraction : float
        Masking density decays from ``rho_start`` to ``rho_target`` over the first
        ``rho_decay_fraction`` of the steps.
    validation_density : float
        Fraction of pixels held out from the training loss for validation.
    validation_patches : int
        Number of fixed validation patches (default: 2 batches' worth).
    eval_every : int
        Steps between validation evaluations.
    patience : int, optional
        Stop a run after this many evaluations without improvement (default: never before the
        schedule ends).
    restarts : int
        Extra runs allowed when a run fails, each with the next seed. A run fails when it does
        not capture a tenth of the validation-loss gain of the best Lucy-Richardson baseline
        over the identity (or diverges), or when the output-level :func:`self_check`, run on
        every run's network, flags it ``"clipped"`` or ``"underfit"``. Passing runs are kept
        first; if every run fails, the best by validation loss is kept and
        ``training["self_check"]["passed"]`` is False. Each run's seed, validation loss,
        flags and failure reasons are in ``training["run_checks"]``, the counts in
        ``training["runs"]``, ``["runs_retried"]`` (runs beyond ``ensemble``) and
        ``["failed_runs"]``.
    ensemble : int
        Number of independently seeded runs whose networks are averaged (an
        :class:`~ssi_dask.ssi.model.EnsembleUNet`): the result lands near the mean quality of
        its members instead of one draw of the spread between seeds. ``ensemble`` times the
        training and inference compute; 1 (default) gives a single network.
    norm_percentiles : (float, float)
        Percentiles of the image that map to 0 and 1 for the network.
    output_range : (float, float)
        Clip range of the output in normalised units.
    bounds_weight : float
        Weight of the penalty on raw outputs outside ``output_range``.
    null_space_weight : float or "auto"
        Weight of a Wiener-like penalty on the output's energy at frequencies the PSF transmits
        poorly (weight ``1 - |OTF|^2``, Hann-tapered patch). The masked loss cannot see those
        frequencies, so without it the network leaves noise-like textures there. ``"auto"``
        sets it per image from the measured signal-to-noise ratio (see
        :func:`estimate_signal_to_noise` on 128 to 512 random patches, about 4 Mpixels):
        ``min(null_space_scale / max(snr, 2)**2, null_space_max)``, so that noisy,
        low-contrast images are regularised and sharp, high-contrast ones keep their edges.
        The value used is stored in the model's ``training`` settings (with
        ``signal_to_noise``). With a Lucy-Richardson prior (``lr_prior``), ``"auto"`` is 0:
        the prior supplies those frequencies.
    null_space_scale, null_space_max : float
        Constant and cap of the ``"auto"`` rule. Above the cap the penalty costs more data fit
        than the self-supervised check accepts (runs flagged as failed and restarted) and, on
        drosophila, more PSNR than it gains (0.1 was worse than 0.05-0.06).
    null_space_threshold : float
        Relative OTF modulus below which the null-space penalty acts: weight
        ``max(0, 1 - |OTF|^2 / (threshold^2 max|OTF|^2))`` (1 = all attenuated frequencies).
    sensor_clipping : "auto", None or (float or None, float or None)
        Bounds (image units) at which the detector clipped the noisy signal. The forward model
        then compares the data with the *expected clipped measurement* of the blurred estimate
        (:class:`~ssi_dask.ssi.sensor.ClippedSensor`, noise model ``sigma^2 = gain s + floor``
        fitted to the image) instead of the blurred estimate itself, so the background under
        a clipped floor is not restored with the clipped noise's positive bias. ``"auto"``
        detects the bounds from a pile-up of values at the image's minimum / maximum (at
        least 0.1 % of the sampled values, more than at the next value); None: no clipping.
        The bounds and noise model used are stored in the model's ``training["sensor"]``.
    noise_penalty_weight : float
        Weight of a noise-sensitivity penalty: a fraction of each batch is also fed with added
        white noise (std estimated from the image, clipping-robust MAD of neighbour
        differences) and the mean energy per voxel of the output's change at poorly
        transmitted frequencies (``1 - |OTF|^2`` weights) is added to the loss with this
        weight. That energy estimates the output's noise variance there, in the units of the
        data term (the squared residual per masked voxel, whose floor is the noise variance),
        so the weight is a ratio that does not depend on the noise level or the image's
        scale: 1 counts that variance as much as the data term's squared error. Unlike the
        null-space penalty, this penalises passing *noise* into the null space rather than
        the output's content there, so sharp edges survive while noise leakage is suppressed.
        Default: 0 in 2D (not measured there), 0.2 in 3D with ``noise_penalty_region=
        "interiors"`` (``benchmarks/RESULTS.md``: at 128x256x256 the ``"background"``
        region raised SSI by about +0.9 dB on filaments and shells, +0.09 dB on beads, 0 to
        +0.05 dB on blobs; ``"interiors"`` adds 1.2-1.3 dB on blobs and leaves the others).
    noise_penalty_fraction : float
        Fraction of the batch duplicated with noise for that penalty (extra compute).
    noise_penalty_region : {"everywhere", "background", "interiors"}
        Where that penalty counts (default: ``"interiors"`` in 3D, ``"everywhere"`` in
        2D). ``"background"``: each voxel's share is weighted by
        ``s^2 / (s^2 + max(p - z, 0)^2)``, with ``p`` the Lucy-Richardson prior there (the
        network's own output without a prior), ``z`` the prior's zero level and ``s^2`` the
        prior's noise variance (its mean squared change under the same added noise): 1 where
        the prior cannot tell the voxel from empty, small on structure well above its noise.
        The network may then pass noise on structure (where restoring attenuated frequencies
        needs it) but not into the background. ``"interiors"``: besides, the
        interiors of large bright objects (voxels whose whole neighbourhood, three PSF
        half-maximum widths across, stands above the prior's noise) count at the full weight 1
        whatever ``noise_penalty_weight``, probed with the data's own noise there (the noise
        model fitted to the validation patches); smoothing what the PSF barely transmits deep
        inside an object removes noise and no faint structure. Beads, filaments, membranes,
        edges and the background keep the ``"background"`` weights and white probe.
    average_fraction : float
        Fraction of the steps, at the end of each run, over which the weights (and BatchNorm
        statistics) are averaged to give the run's model (stochastic weight averaging with the
        one-cycle schedule's decaying learning rate). 0: keep the snapshot with the best
        validation loss instead.
    augment : bool
        Random flips / axis swaps of each batch, restricted to the symmetries of the PSF (which
        leave the forward model unchanged). The same symmetries are averaged at inference.
    forward : {"auto", "valid", "same"}
        Forward operator of the loss (:mod:`ssi_dask.ssi.forward`): ``"valid"`` scores each
        patch's interior where the blur has full context (patches must be larger than the PSF
        + 4); ``"same"`` blurs the zero-extended patch plus its mean's share of the light from
        outside and scores the central box, for PSFs as large as the patches or the volume;
        ``"auto"`` (default) picks ``"valid"`` when it fits.

    Returns
    -------
    SSIModel
    """
    recipe = recipe if recipe is not None else TrainingRecipe()
    if not isinstance(recipe, TrainingRecipe):
        raise ParameterError(
            f"recipe must be a TrainingRecipe (ssi_dask.config), got {type(recipe).__name__}"
        )
    recipe = recipe.replace(**overrides) if overrides else recipe
    ndim = len(image.shape)
    if ndim not in (2, 3):
        raise ParameterError(f"SSI needs a 2D or 3D image, got shape {tuple(image.shape)}")
    psf = np.asarray(psf, dtype=np.float32)
    if psf.ndim != ndim:
        raise ParameterError(f"PSF has {psf.ndim} dimensions but the image has {ndim}")
    psf = psf / psf.sum()
    recipe = recipe.for_ndim(ndim)
    align = 2 ** (recipe.levels - 1)
    patch_shape = tuple(max(min(recipe.patch_size, s) // align * align, align) for s in image.shape)
    if recipe.forward == "valid" and not fits_valid(patch_shape, psf.shape):
        raise ParameterError(
            f"patches {patch_shape} must be larger than the PSF {psf.shape} (+4) with "
            "forward='valid'; use forward='same' (or 'auto'), a larger patch_size, or crop the PSF"
        )
    dev = resolve_device(device)
    if num_threads and dev.type == "cpu":
        torch.set_num_threads(int(num_threads))

    if hasattr(image, "statistics"):  # a RegionPool: global statistics from its samples
        values = image.sample_values()
    else:
        values = sample_values(image, seed=seed)
    lo, hi = (float(v) for v in np.percentile(values, recipe.norm_percentiles))
    scale = hi - lo if hi > lo else 1.0
    if recipe.output_range == "auto":
        clip = object_range(psf)
    else:
        clip = tuple(float(v) for v in recipe.output_range)
    normalisation = {"offset": lo, "scale": scale, "output_range": clip}

    op, forward = forward_operator(psf, patch_shape, dev, recipe.forward)
    # edges="background": patches reach half a patch past the volume's edges, holding the
    # background level (the normalisation's offset) there, and the loss scores the pixels up
    # to the edge, whose blur involves object values outside the volume (the network's output
    # there stands for them); inference pads the volume's edges with the same level
    overhang = None
    if recipe.edges == "background" and forward == "valid":
        overhang = tuple(p // 2 for p in patch_shape)
    # the validation patches (and the noise, sensor and self-check fits made on them) stay
    # inside the volume: the padding outside is not data
    n_val = int(recipe.validation_patches or 2 * recipe.batch_size)
    val_sampler = _patch_sampler(image, patch_shape, seed=seed + 7919)
    vpatches, vorigins = val_sampler.batch(n_val)
    vpatches = (vpatches - lo) / scale
    vmasks = np.stack(
        [validation_mask(o, patch_shape, recipe.validation_density, seed) for o in vorigins]
    )
    sensor = _clipped_sensor(recipe.sensor_clipping, values, vpatches, lo, scale)
    validator = _Validator(vpatches.astype(np.float32), vmasks, op, dev, sensor)
    # one Lucy-Richardson run on the masked validation patches, once per call: its 2-20
    # iterations set the failure threshold, 2-200 the fits every run's self-check compares with
    lr_estimates = _lr_baselines(op, validator.x_in, iters=SELF_CHECK_LR_ITERATIONS)
    baselines = validator.baselines(clip, lr_estimates)
    references = _reference_fits(validator, clip, lr_estimates)
    del lr_estimates
    at_bound_limit = (100.0 - recipe.norm_percentiles[1]) / 100.0
    snr = None
    null_space_weight = recipe.null_space_weight
    if null_space_weight == "auto" and recipe.lr_prior:
        # with a Lucy-Richardson prior, what the PSF barely transmits comes from the prior;
        # penalising the correction there only held it back (issue 16, sixth session:
        # +0.4 dB on the development images, +1.2 dB on held-out 3D beads, 3D filaments and
        # blobs unchanged)
        null_space_weight = 0.0
    if null_space_weight == "auto":
        # ~4 Mvoxels of patches: the estimate's spread between samples is about +-10 %
        n_snr = int(np.clip(2**22 // int(np.prod(patch_shape)), 128, 512))
        spatches, _ = _patch_sampler(image, patch_shape, seed=seed + 4253).batch(n_snr)
        snr = estimate_signal_to_noise((spatches - lo) / scale, op)
        null_space_weight = min(
            float(recipe.null_space_scale) / max(snr, 2.0) ** 2, float(recipe.null_space_max)
        )
    null_space_weight = float(null_space_weight)
    best_baseline = min(baselines.values())
    # A run fails when it does not capture at least a tenth of the validation-loss gain that
    # the best Lucy-Richardson baseline makes over the identity. The null-space penalty trades a
    # little data fit for smoothness, and on very noisy images the whole gain is ~1.5 % of the
    # loss (the demo's camera image: identity 0.01090, best LR 0.01074, a weight-averaged run
    # 0.01085 that beats LR in PSNR and SSIM), so a stricter threshold flags good runs; failed
    # runs in the reference's sense end far above the identity.
    fail_threshold = baselines["identity"] - 0.1 * (baselines["identity"] - best_baseline)

    settings = dict(
        seed=seed,
        steps=recipe.steps,
        patch_shape=list(patch_shape),
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        rho_start=recipe.rho_start,
        rho_target=recipe.rho_target,
        rho_decay_fraction=recipe.rho_decay_fraction,
        validation_density=recipe.validation_density,
        validation_patches=n_val,
        eval_every=recipe.eval_every,
        patience=recipe.patience,
        restarts=recipe.restarts,
        ensemble=recipe.ensemble,
        norm_percentiles=list(recipe.norm_percentiles),
        bounds_weight=recipe.bounds_weight,
        null_space_weight=null_space_weight,
        signal_to_noise=snr,
        null_space_scale=recipe.null_space_scale,
        null_space_max=recipe.null_space_max,
        null_space_threshold=recipe.null_space_threshold,
        sensor=None
        if sensor is None
        else dict(
            sensor.as_dict(),
            lower_raw=None if sensor.lower is None else sensor.lower * scale + lo,
            upper_raw=None if sensor.upper is None else sensor.upper * scale + lo,
            units="normalised (lower_raw/upper_raw: image units)",
        ),
        noise_penalty_weight=recipe.noise_penalty_weight,
        noise_penalty_fraction=recipe.noise_penalty_fraction,
        average_fraction=recipe.average_fraction,
        device=str(dev),
        loss="masked L2 on PSF-valid interior"
        + ("" if sensor is None else " (expected clipped measurement)"),
    )
    if recipe.noise_penalty_weight > 0:  # the weight's meaning since 2026-12-07 (before: / 1e2 s^2)
        settings["noise_penalty_units"] = "output noise variance per voxel, data-term units"
        if recipe.noise_penalty_region != "everywhere":  # older models' hashes stay as they were
            settings["noise_penalty_region"] = recipe.noise_penalty_region
    if overhang is not None:  # recorded only when used: older models' hashes stay as they were
        settings["edges"] = dict(mode="background", overhang=[int(h) for h in overhang])
    if forward == "same":  # recorded only when used: older models' hashes stay as they were
        settings["forward"] = dict(mode="same", scored_margins=list(op.margins))
        settings["loss"] = settings["loss"].replace(
            "PSF-valid interior", "central box, linear convolution + mean outside the patch"
        )
    symmetries = psf_symmetries(psf)
    settings["symmetries"] = [[list(f), bool(w)] for f, w in symmetries]
    log: list[dict] = [{"baselines": baselines}]
    arch = dict(
        ndim=ndim,
        levels=recipe.levels,
        base_channels=recipe.base_channels,
        max_channels=recipe.max_channels,
        batch_norm=recipe.batch_norm,
    )
    prior_background = (
        _prior_background(validator.noise_model, sensor, lo, scale, recipe.norm_percentiles[0])
        if recipe.lr_prior
        else 0.0
    )
    zero = lo + prior_background * scale  # the prior's zero in the image's units
    prior_iterations = _prior_iterations(
        recipe.lr_prior,
        image,
        psf,
        seed,
        zero,
        recipe.lr_prior_max_iter,
        recipe.lr_prior_rule,
        recipe.lr_prior_acceleration,
    )
    if prior_iterations:  # recorded only when used: older models' hashes stay as they were
        arch.update(
            prior_iterations=prior_iterations,
            prior_psf_shape=psf.shape,
            prior_background=prior_background,
        )
        settings["lr_prior"] = dict(
            iterations=prior_iterations, requested=recipe.lr_prior, background=zero
        )
        if recipe.lr_prior_acceleration != "none":  # recorded only when used
            arch["prior_acceleration"] = recipe.lr_prior_acceleration
            settings["lr_prior"]["acceleration"] = recipe.lr_prior_acceleration
        if recipe.lr_prior == "auto":
            settings["lr_prior"]["max_iter"] = recipe.lr_prior_max_iter
            if recipe.lr_prior_rule != "one-se":  # recorded only when used (older hashes stay)
                settings["lr_prior"]["rule"] = recipe.lr_prior_rule
        if recipe.prior_reuse > 1:  # recorded only when used: older models' hashes stay
            settings["lr_prior"]["reuse"] = recipe.prior_reuse
    ctx = _RunContext(
        arch=arch,
        prior_psf=psf if prior_iterations else None,
        psf_fwhm=psf_fwhm(psf),
        op=op,
        validator=validator,
        patch_shape=patch_shape,
        normalisation=normalisation,
        device=dev,
        clip=clip,
        null_space_weight=null_space_weight,
        noise_sigma=_noise_sigma(vpatches),
        val_seed=seed,
        overhang=overhang,
        image_shape=tuple(int(n) for n in getattr(image, "image_shape", image.shape)),
        symmetries=symmetries if recipe.augment else [((), False)],
        max_time=max_time,
        report=_progress_fn(progress),
    )
    if hasattr(ctx.report, "start"):
        ctx.report.start(
            dict(
                device=device_name(dev),
                ensemble=recipe.ensemble,
                restarts=recipe.restarts,
                steps=recipe.steps,
                batch_size=recipe.batch_size,
                patch_shape=list(patch_shape),
            )
        )
    runs = []  # (failed, val_loss, state, run, check) of every finite run
    records = []  # what each run gave: seed, validation loss, self-check flags, why it failed
    succeeded = 0
    autocast = _autocast_for(dev)
    total = recipe.ensemble + recipe.restarts
    for run in range(total):
        if succeeded == recipe.ensemble:
            break
        run_seed = seed + 1000 * run
        val, state, run_log = _train_run(image, recipe, ctx, run, run_seed)
        reasons = [] if math.isfinite(val) and val < fail_threshold else ["validation"]
        check = None
        if math.isfinite(val) and state is not None:
            # the output-level self-check on this run's (averaged) network: a flagged run
            # counts as failed like one that misses the validation-loss threshold
            check = self_check(
                _network(ctx.arch, state).to(dev),
                validator,
                clip,
                autocast,
                references=references,
                at_bound_limit=at_bound_limit,
            )
            reasons += check["flags"]
        failed = bool(reasons)
        log.extend(run_log)
        record = {
            "run": run,
            "seed": run_seed,
            "best_val_loss": val,
            "failed": failed,
            "reasons": reasons,
            "self_check_flags": [] if check is None else list(check["flags"]),
            "at_bound": None if check is None else check["at_bound"],
            "residual_to_noise": None if check is None else check["residual_to_noise"]["ssi"],
            "best_baseline": best_baseline,
            "fail_threshold": fail_threshold,
        }
        log.append(record)
        records.append({k: record[k] for k in ("run", "seed", "failed", "reasons")})
        records[-1].update(val_loss=val, flags=record["self_check_flags"])
        if math.isfinite(val):
            runs.append((failed, val, state, run, check))
        succeeded += not failed
        if hasattr(ctx.report, "run_done"):
            more = succeeded < recipe.ensemble and run + 1 < total
            ctx.report.run_done(
                run, failed, val, fail_threshold, more, reasons=reasons, check=check
            )
    if not runs:
        raise RuntimeError("SSI training diverged (NaN loss) in every run; lower learning_rate")
    # the `ensemble` runs that passed both checks, by validation loss, then the failed ones
    # (by validation loss too: when every run failed, the best of them is kept)
    members = sorted(runs, key=lambda r: (r[0], r[1]))[: recipe.ensemble]
    if len(members) == 1:
        net = _network(ctx.arch, members[0][2])
        val = members[0][1]
    else:
        net = EnsembleUNet(len(members), **ctx.arch)
        net.load_state_dict(
            {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m[2].items()}
        )
        val = validator.evaluate(net.to(dev), clip, autocast)
        net = net.cpu()
    net.eval()
    settings["selected_run"] = members[0][3]
    settings["selected_runs"] = [m[3] for m in members]
    settings["member_val_losses"] = [m[1] for m in members]
    settings["val_loss"] = val
    settings["baseline_val_losses"] = baselines
    settings["beats_baselines"] = bool(val < fail_threshold)
    settings["output_range"] = dict(
        rule="auto: (0, 1 / PSF peak-to-sum)" if recipe.output_range == "auto" else "given",
        normalised=list(clip),
        psf_peak_to_sum=float(psf.max()),
    )
    if len(members) == 1:  # the returned network is that run's: its check holds
        check = copy.deepcopy(members[0][4])
    else:  # the members' average: checked on its own (the references are the same)
        check = self_check(
            net.to(dev),
            validator,
            clip,
            autocast,
            references=references,
            at_bound_limit=at_bound_limit,
        )
        net = net.cpu()
    check["passed"] = bool(settings["beats_baselines"] and not check["flags"])
    failed_runs = sum(r["failed"] for r in records)
    check["every_run_failed"] = failed_runs == len(records)
    settings["self_check"] = check
    settings["runs"] = len(records)
    settings["runs_retried"] = max(len(records) - recipe.ensemble, 0)
    settings["failed_runs"] = failed_runs
    settings["run_checks"] = records
    log.append({"self_check": check})
    if hasattr(ctx.report, "self_check"):
        ctx.report.self_check(check)
    if hasattr(ctx.report, "finished"):
        ctx.report.finished(settings)
    return SSIModel(net, normalisation, psf, settings, log)


def _prior_iterations(
    lr_prior,
    image,
    psf: np.ndarray,
    seed: int,
    zero: float,
    max_iter: int,
    rule: str,
    acceleration: str = "none",
) -> int:
    """The Lucy-Richardson prior's iteration count.

    ``lr_prior="auto"``: chosen from the image minus the prior's zero level ``zero`` by the
    J-invariant hold-out criterion of :func:`ssi_dask.lr_auto.choose_iterations` over counts
    1 to ``max_iter`` (the recipe's ``lr_prior_max_iter``) with its ``rule`` (the recipe's
    ``lr_prior_rule``) and ``acceleration`` (``lr_prior_acceleration``); for a
    :class:`~ssi_dask.ssi.regions.RegionPool`, the median of the counts chosen on up to
    :data:`PRIOR_AUTO_REGIONS` of its regions.
    """
    if lr_prior != "auto":
        return int(lr_prior)
    from ..lr_auto import choose_iterations  # noqa: PLC0415

    level = np.float32(zero)
    if hasattr(image, "regions"):
        counts = [
            choose_iterations(
                np.asarray(region) - level,
                psf,
                n_samples=1,
                seed=seed + i,
                max_iter=max_iter,
                rule=rule,
                acceleration=acceleration,
            ).num_iter
            for i, region in enumerate(image.regions[:PRIOR_AUTO_REGIONS])
        ]
        return int(np.median(counts))
    return int(
        choose_iterations(
            np.asarray(image) - level,
            psf,
            seed=seed,
            max_iter=max_iter,
            rule=rule,
            acceleration=acceleration,
        ).num_iter
    )


def _prior_background(
    noise_model: Callable[[], tuple[float, float]],
    sensor: ClippedSensor | None,
    offset: float,
    scale: float,
    low: float,
) -> float:
    """The Lucy-Richardson prior's zero level in normalised units (0: the normalisation's
    offset).

    Lucy-Richardson explains every count above its zero as object, so a pedestal under the
    data is restored as object and slows the restoration of everything else. The
    normalisation's offset (the ``low`` percentile of the voxels) lies ``z`` noise standard
    deviations below the darkest noise-free level (``z = -Phi^-1(low / 100)``, 3.7 for the
    default 0.01 %). Where that offset is below zero, the data hold noise around a zero
    background (a camera offset already subtracted), and the offset is such a pedestal: the
    zero is then the data's own zero, or the darkest noise-free level (the offset plus ``z``
    sigmas of the noise model ``noise_model()``, fitted to the validation patches) where that
    is lower. Data that are never negative keep the offset as the zero: nothing tells a dark
    object from a background there. Clipping from below (``sensor``) needs no change: the
    offset is the clip level.
    """
    if not PRIOR_ZERO_AT_BACKGROUND or offset >= 0 or low <= 0:
        return 0.0
    if sensor is not None and sensor.lower is not None:
        return float(sensor.lower)
    gain, floor = noise_model()
    z = -NormalDist().inv_cdf(min(low, 50.0) / 100.0)
    darkest = 0.0
    for _ in range(4):  # sigma depends on the level it is measured at
        darkest = z * math.sqrt(max(gain * darkest + floor, 0.0))
    return float(min(-offset / scale, darkest))


def _network(arch: dict, state: dict) -> UNet:
    """A UNet of ``arch`` holding the weights ``state`` (on the CPU, in eval mode)."""
    net = UNet(**arch)
    net.load_state_dict(state)
    return net.eval()


def describe_runs(training: dict) -> str:
    """One line on a model's training runs and self-check, from ``model.training``.

    ``2 runs (1 retried; failed: run 1 clipped), self-check passed``; a model saved before
    runs were recorded gives only the self-check's verdict.
    """
    check = training.get("self_check") or {}
    runs = training.get("runs")
    if runs is None:
        text = "runs not recorded"
    else:
        failed = [r for r in training.get("run_checks", []) if r.get("failed")]
        text = f"{runs} run{'s' if runs != 1 else ''} ({training.get('runs_retried', 0)} retried"
        if failed:
            text += "; failed: " + ", ".join(
                f"run {r['run'] + 1} {'+'.join(r.get('reasons') or ['validation'])}" for r in failed
            )
        text += ")"
    if not check:
        return text
    if check.get("passed"):
        return text + ", self-check passed"
    why = list(check.get("flags", []))
    if not training.get("beats_baselines", True):
        why.insert(0, "validation")
    text += f", self-check FAILED ({', '.join(why) or 'validation'})"
    if check.get("every_run_failed"):
        text += ": every run failed, the best by validation loss was kept"
    return text


def object_range(psf) -> tuple[float, float]:
    """The ``"auto"`` output range in normalised units: ``(0, 1 / peak-to-sum of the PSF)``.

    A non-negative object ``f`` (above the image's background, normalised to 0) blurred by a
    PSF ``h`` of unit sum gives ``(h * f)(x) >= h_max f(x)`` at the PSF's peak offset, so no
    object value consistent with a blurred image that peaks at 1 (the input's upper
    normalisation percentile) exceeds ``1 / h_max``: a bound derived from the forward model
    alone. A point source reaches it; extended structures stay far below (their blur keeps
    their level), so the clip acts only on outputs the forward model cannot produce.
    """
    h = np.asarray(psf, dtype=np.float64)
    peak = float(h.max() / h.sum())
    return 0.0, 1.0 / peak


#: Unexplained residual, in units of the noise variance, above which an output is flagged as
#: underfit (see :func:`self_check`).
UNDERFIT_EXCESS = 1.0


@torch.no_grad()
def self_check(
    net,
    validator: _Validator,
    clip: tuple[float, float],
    autocast,
    *,
    baselines: dict | None = None,
    references: dict | None = None,
    at_bound_limit: float = 1e-4,
    chunk: int = 4,
) -> dict:
    """Ground-truth-free check of a trained network's output on the validation patches.

    :func:`train_ssi` runs it on every run's network (a flagged run counts as failed and is
    retried while restarts remain) and on the network it returns.

    Two failures the validation-loss comparison with the baselines cannot see:

    * **clipped**: the share of output voxels (the scored interior) at or beyond the upper
      bound of the output range exceeds ``at_bound_limit`` (by default the share of the input
      above its own upper normalisation percentile): the output range is too low for the
      object the data call for (deconvolved peaks lie far above the blurred image's);
    * **underfit**: the output, blurred by the PSF (through the sensor model, if any), leaves
      a residual against the held-out validation pixels whose part above the noise is larger
      than the noise itself (``residual / noise - 1 > UNDERFIT_EXCESS``) in the brightest
      tenth of the validation pixels, where the structure is, and where the best
      Lucy-Richardson baseline explains the data better: the output does not explain the input
      beyond the noise. The noise variance per pixel comes from the noise model fitted to the
      validation patches (``sigma^2 = gain * level + floor``, :func:`estimate_noise_model`).

    Parameters
    ----------
    net : torch.nn.Module
        The trained network (on the validator's device).
    validator : _Validator
        The validation patches, their held-out pixels and the forward model.
    clip : (float, float)
        The output range in normalised units.
    autocast : callable
        A context-manager factory for the forward passes (:func:`_autocast_for`).
    baselines : dict, optional
        The baselines' validation losses; when given (and ``references`` is not), the
        Lucy-Richardson references are computed here.
    references : dict, optional
        The residual-to-noise ratios of the identity and Lucy-Richardson
        (:data:`SELF_CHECK_LR_ITERATIONS`) from :func:`_reference_fits`: computed once per
        training call and passed to the check of every run. Neither given: no comparison
        (an output beyond the noise is flagged underfit on its own).
    at_bound_limit : float
        Share of the output at the upper bound above which it is flagged clipped.
    chunk : int
        Validation patches per forward pass.

    Returns
    -------
    dict
        ``at_bound`` (share of voxels at the upper bound), ``at_bound_limit``,
        ``residual_to_noise`` (all validation pixels and the brightest tenth, for the output
        and the baselines), ``flags`` (a list of ``"clipped"`` / ``"underfit"``), ``message``.
    """
    lo, hi = clip
    net.eval()
    outs = []
    for i in range(0, validator.x_in.shape[0], chunk):
        with autocast():
            outs.append(net(validator.x_in[i : i + chunk]).float())
    out = torch.cat(outs)
    interior = validator.op.crop(out)
    at_bound = float((interior >= hi - 1e-6 * (hi - lo)).float().mean())
    if references is None and baselines is not None:
        references = _reference_fits(validator, clip)
    ratios = {"ssi": _residual_to_noise(validator, out, clip), **(references or {})}
    flags = []
    if at_bound > at_bound_limit:
        flags.append("clipped")
    excess = ratios["ssi"]["bright"] - 1.0
    best_lr = min((r["bright"] for k, r in ratios.items() if k.startswith("lr")), default=None)
    if excess > UNDERFIT_EXCESS and (best_lr is None or best_lr < ratios["ssi"]["bright"]):
        flags.append("underfit")
    messages = {
        "clipped": f"{100 * at_bound:.2f} % of the output at its upper bound {hi:.3g} "
        "(normalised): the output range is too low",
        "underfit": f"the re-blurred output misses the data by {excess:.1f}x the noise "
        "variance on its brightest tenth (Lucy-Richardson: "
        + ("n/a" if best_lr is None else f"{best_lr - 1.0:.1f}x")
        + "): train longer, or use Lucy-Richardson",
    }
    return {
        "at_bound": at_bound,
        "at_bound_limit": float(at_bound_limit),
        "underfit_excess_limit": UNDERFIT_EXCESS,
        "residual_to_noise": ratios,
        "flags": flags,
        "message": "; ".join(messages[f] for f in flags),
        "messages": {f: messages[f] for f in flags},
    }


@torch.no_grad()
def _reference_fits(validator: _Validator, clip, lr: dict | None = None) -> dict:
    """:func:`_residual_to_noise` of the identity and of Lucy-Richardson with
    :data:`SELF_CHECK_LR_ITERATIONS` iterations (from ``lr``, ``{n: estimate}``, when given):
    the fits :func:`self_check` compares an output with, the same for every run."""
    if lr is None:
        lr = _lr_baselines(validator.op, validator.x_in, iters=SELF_CHECK_LR_ITERATIONS)
    fits = {"identity": _residual_to_noise(validator, validator.x_in, clip)}
    for n in SELF_CHECK_LR_ITERATIONS:
        fits[f"lr{n}"] = _residual_to_noise(validator, lr[n], clip)
    return fits


def _residual_to_noise(validator: _Validator, estimate: torch.Tensor, clip) -> dict:
    """Squared residual of the re-blurred estimate on the validation pixels over the noise
    model's variance there (robust: median), on all of them and on the brightest tenth by
    data level (``bright``; ``peak``: the brightest hundredth, recorded only); about 1 for an
    estimate that explains the data down to the noise."""
    blurred = validator.measure(validator.op.valid(estimate.float().clamp(*clip)))
    err = (blurred - validator.target) ** 2
    sel = validator.weight > 0
    var = validator.noise_variance()
    level = validator.level[sel]
    err, var = err[sel], var[sel]
    # robust like the noise model's fit (a median over the chi-square median, 0.4549 for one
    # degree of freedom): outliers such as salt-and-pepper do not count
    z2 = err / var.clamp_min(1e-12) / 0.4549364
    ratios = {"all": float(z2.median())}
    for name, q in (("bright", 0.9), ("peak", 0.99)):
        keep = level >= torch.quantile(level.float(), q) if level.numel() > 100 else slice(None)
        ratios[name] = float(z2[keep].median())
    return ratios


def _clipped_sensor(sensor_clipping, values, patches, offset, scale) -> ClippedSensor | None:
    """The sensor model in normalised units from the option, the sampled values and patches.

    ``sensor_clipping`` comes from a :class:`~ssi_dask.config.TrainingRecipe`, which checked
    it when it was built ('auto', None/False, or (lower, upper) with lower < upper).
    """
    if sensor_clipping is None or sensor_clipping is False:
        return None
    if sensor_clipping == "auto":
        lower, upper = detect_clip_bounds(values)
    else:
        lower, upper = sensor_clipping
    if lower is None and upper is None:
        return None
    lower = None if lower is None else (float(lower) - offset) / scale
    upper = None if upper is None else (float(upper) - offset) / scale
    gain, floor = estimate_noise_model(patches, lower, upper)
    return ClippedSensor(lower, upper, gain, floor)


def _autocast_for(dev: torch.device):
    """bfloat16 autocast on CUDA, nothing on the CPU (a context-manager factory)."""

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    return autocast


#: Train in the channels-last memory format on the CPU too (oneDNN convolutions: about 1.7x
#: faster per step than the default layout; ``benchmarks/ssi_train_speed.py``). The layout
#: changes the float rounding, so a run's trajectory differs from the default layout's.
CPU_CHANNELS_LAST = True


def _train_run(image, recipe: TrainingRecipe, ctx: _RunContext, run: int, run_seed: int):
    """One seeded training run; returns ``(validation loss, weights, log entries)``."""
    steps, batch_size = recipe.steps, recipe.batch_size
    op, validator, dev, patch_shape = ctx.op, ctx.validator, ctx.device, ctx.patch_shape
    null_space_weight, symmetries = ctx.null_space_weight, ctx.symmetries
    max_time, report, average_fraction = ctx.max_time, ctx.report, recipe.average_fraction
    torch.manual_seed(run_seed)
    net = UNet(**ctx.arch)
    if net.prior_iterations:
        net.prior_psf.copy_(torch.from_numpy(ctx.prior_psf))
    prior_zero = float(net.prior_background)  # normalised units
    net = net.to(dev)
    if dev.type == "cuda" or (CPU_CHANNELS_LAST and torch.backends.mkldnn.is_available()):
        net = net.to(
            memory_format=torch.channels_last if ctx.arch["ndim"] == 2 else torch.channels_last_3d
        )

    autocast = _autocast_for(dev)
    null_penalty = _NullSpacePenalty(
        op, x_shape=patch_shape, device=dev, threshold=recipe.null_space_threshold
    )
    opt = torch.optim.AdamW(
        net.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe.learning_rate,
        total_steps=steps,
        pct_start=0.15,
        div_factor=10,
        final_div_factor=100,
    )
    gen = torch.Generator().manual_seed(run_seed)
    offset, scale = ctx.normalisation["offset"], ctx.normalisation["scale"]
    sampler = _patch_sampler(image, patch_shape, run_seed + 1, ctx.overhang, fill=offset)
    best_val, best_state, since_best = math.inf, None, 0
    averager = _WeightAverage() if average_fraction > 0 else None
    average_start = int(round(steps * (1 - average_fraction)))
    run_log, running, t0 = [], [], time.perf_counter()
    heartbeat = getattr(report, "interval", None)  # a TrainingPrinter also prints between evals
    heartbeat = heartbeat if getattr(report, "wants_heartbeats", False) else None
    last_line = t0
    lo_c, hi_c = ctx.clip
    pool = None
    if net.prior_iterations and recipe.prior_reuse > 1:
        pool = _PreparedSamples(recipe.prior_reuse, 8 * batch_size, symmetries, gen)
    for step in range(1, steps + 1):
        n_fresh = batch_size if pool is None else pool.fresh_count(batch_size)
        rho = rho_schedule(
            step - 1, steps, recipe.rho_start, recipe.rho_target, recipe.rho_decay_fraction
        )
        if n_fresh:
            patches, origins = sampler.batch(n_fresh)
            x = torch.from_numpy((patches - offset) / scale)[:, None].to(dev, non_blocking=True)
            vmask = np.stack(
                [
                    validation_mask(o, patch_shape, recipe.validation_density, ctx.val_seed)
                    for o in origins
                ]
            )
            vmask = torch.from_numpy(vmask)[:, None].to(dev)
            # scored: not held out for validation, and inside the volume
            scored = ~vmask
            if ctx.overhang is not None:
                inside = _inside_masks(origins, patch_shape, ctx.image_shape)
                scored = scored & torch.from_numpy(inside)[:, None].to(dev)
            if len(symmetries) > 1:
                t = symmetries[int(torch.randint(len(symmetries), (1,), generator=gen))]
                x = apply_transform(x, t).contiguous()
                scored = apply_transform(scored, t).contiguous()
            m = bernoulli_mask(x.shape, rho, gen, dev)
        if pool is not None:  # the fresh samples' priors, then samples served again
            prior = None
            if n_fresh:
                prior = net.prior(mask_input(x, m), m if PRIOR_MASK_AS_MISSING else None)
                pool.add(x, scored, m, prior)
            if n_fresh < batch_size:
                kept = pool.again(batch_size - n_fresh)
                if n_fresh:
                    kept = [torch.cat([a, b]) for a, b in zip((x, scored, m, prior), kept)]
                x, scored, m, prior = kept
            pool.served += batch_size
        x_in = mask_input(x, m)
        n_noisy = 0
        if recipe.noise_penalty_weight > 0:
            n_noisy = max(1, int(round(recipe.noise_penalty_fraction * x.shape[0])))
            delta = torch.randn((n_noisy, *x_in.shape[1:]), generator=gen, device="cpu").to(dev)
            probe_sigma = _probe_sigma(recipe.noise_penalty_region, ctx, x_in[:n_noisy])
            delta = delta * probe_sigma
            white_ratio = ctx.noise_sigma**2 / torch.as_tensor(probe_sigma).float().pow(2)
            x_in = torch.cat([x_in, x_in[:n_noisy] + delta])
        hidden = None
        if PRIOR_MASK_AS_MISSING:
            hidden = m if not n_noisy else torch.cat([m, m[:n_noisy]])
        if pool is None:
            prior = net.prior(x_in, hidden)
        elif n_noisy:  # the noisy copies' own priors
            noisy_hidden = None if hidden is None else hidden[-n_noisy:]
            prior = torch.cat([prior, net.prior(x_in[-n_noisy:], noisy_hidden)])
        with autocast():
            out = net(x_in, prior=prior)
        out = out.float()
        if n_noisy:
            out, out_noisy = out[:-n_noisy], out[-n_noisy:]
            prior_noisy = None if prior is None else prior[-n_noisy:]
            prior = None if prior is None else prior[:-n_noisy]
        blurred = validator.measure(op.valid(out.clamp(lo_c, hi_c)))
        w = op.crop(m & scored).float()
        data = ((blurred - op.crop(x)) ** 2 * w).sum() / w.sum().clamp_min(1)
        bounds = (torch.relu(lo_c - out) + torch.relu(out - hi_c)).mean() ** 2
        loss = data + recipe.bounds_weight * bounds
        if null_space_weight > 0:
            # with a Lucy-Richardson prior, the penalty is on the network's correction to it
            loss = loss + null_space_weight * null_penalty(out if prior is None else out - prior)
        if n_noisy:
            # the output's change under added noise of the data's own level, at poorly
            # transmitted frequencies: an estimate of the output's noise variance there, in the
            # data term's units (both squared normalised intensities), so the weight is a ratio
            diff = out_noisy - out[:n_noisy]
            where = None
            if recipe.noise_penalty_region != "everywhere":
                reference, noisy_reference, zero = (
                    (out[:n_noisy], out_noisy, 0.0)
                    if prior is None
                    else (prior[:n_noisy], prior_noisy, prior_zero)
                )
                where = _penalty_weights(
                    recipe.noise_penalty_region,
                    recipe.noise_penalty_weight,
                    reference,
                    noisy_reference,
                    zero,
                    ctx.psf_fwhm,
                    white_ratio,
                )
            loss = loss + recipe.noise_penalty_weight * null_penalty(diff, where)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if averager is not None and step > average_start and math.isfinite(float(loss.detach())):
            averager.add(net)
        running.append(float(data.detach()))
        last = step == steps
        out_of_time = max_time is not None and time.perf_counter() - t0 > max_time
        if heartbeat and time.perf_counter() - last_line >= heartbeat and step % recipe.eval_every:
            last_line = time.perf_counter()  # a line between evaluations: the loss so far
            report(
                {
                    "run": run,
                    "step": step,
                    "train_loss": float(np.mean(running)),
                    "elapsed_s": last_line - t0,
                }
            )
        if step % recipe.eval_every == 0 or last or out_of_time:
            last_line = time.perf_counter()
            val = validator.evaluate(net, ctx.clip, autocast)
            entry = {
                "run": run,
                "step": step,
                "train_loss": float(np.mean(running)),
                "val_loss": val,
                "rho": rho,
                "lr": sched.get_last_lr()[0],
                "elapsed_s": time.perf_counter() - t0,
            }
            running = []
            run_log.append(entry)
            if report:
                report(entry)
            if math.isfinite(val) and val < best_val:
                best_val, since_best = val, 0
                best_state = copy.deepcopy(
                    {k: v.detach().cpu() for k, v in net.state_dict().items()}
                )
            else:
                since_best += 1
            if not math.isfinite(val) or (
                recipe.patience is not None and since_best >= recipe.patience
            ):
                break
        if out_of_time:
            break
    if averager is not None and averager.count:
        net.load_state_dict(averager.state())
        val = validator.evaluate(net, ctx.clip, autocast)
        entry = {
            "run": run,
            "step": step,
            "averaged_steps": averager.count,
            "val_loss": val,
            "elapsed_s": time.perf_counter() - t0,
        }
        run_log.append(entry)
        if report:
            report(entry)
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        return (val if math.isfinite(val) else math.inf), state, run_log
    if best_state is None:
        return math.inf, None, run_log
    return best_val, {k: v.contiguous() for k, v in best_state.items()}, run_log
