"""Typed, validated settings of what to compute; the defaults live here.

A setting is checked when its object is built, before any Dask work, and a bad value fails
with the parameter's name (the command line maps names to flags, see
:data:`CLI_FLAGS`). These objects are what :func:`ssi_dask.deconvolve` validates its keyword
arguments with, so the Python API and the command line accept and refuse the same values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any

from .errors import ParameterError

#: Lucy-Richardson iterations when none are given.
DEFAULT_NUM_ITER = 10

#: Back projectors of Lucy-Richardson.
BACK_PROJECTORS = ("classic", "wiener-butterworth")

#: Wiener-Butterworth back projector: Wiener alpha by default (the OTF's relative level at the
#: cut-off, ``ssi_dask.lr.WB_SUPPORT_FRACTION``) and Butterworth order (Guo et al. 2020: 4 .. 15).
WB_DEFAULT_ALPHA = 0.05
WB_DEFAULT_ORDER = 10

#: ``iterations="auto"``: largest count scored per back projector, and chunks sampled.
DEFAULT_AUTO_MAX_ITER = {"classic": 50, "wiener-butterworth": 10}
DEFAULT_AUTO_SAMPLES = 4

#: Default working-chunk size in voxels per dimensionality (``ssi_dask.blockwise``).
DEFAULT_TARGET_VOXELS = {2: 2048 * 2048, 3: 64 * 256 * 256}

#: Share of a PSF's energy the default PSF shape holds (``ssi-dask psf`` without ``--shape``).
PSF_ENERGY_FRACTION = 0.99

#: Immersion refractive index when none is given (water).
DEFAULT_REFRACTIVE_INDEX = 1.33


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``cls`` (for help texts)."""
    return {f.name: f.default for f in fields(cls)}[name]


def voxels_text(voxels: int) -> str:
    """``4194304`` -> ``"4.2M"``: a voxel count for help texts."""
    return f"{voxels / 1e6:.1f}M"


#: Library parameter -> command-line flag: the one table the command line maps library
#: messages with. Library messages name a parameter either as a keyword (``chunks=``,
#: ``resume=True``, ``voxel_size=(1, 0.1, 0.1)``), which is mapped whatever the name, or bare
#: when the name cannot be mistaken for an ordinary word (underscores, dotted paths).
CLI_FLAGS = {
    "lr.num_iter": "--iterations",
    "num_iter": "--iterations",
    "back_projector": "--back-projector",
    "wiener_alpha": "--wiener-alpha",
    "acceleration": "--acceleration",
    "butterworth_order": "--butterworth-order",
    "cutoff": "--cutoff",
    "offset": "--offset",
    "auto_max_iter": "--auto-max-iterations",
    "auto_samples": "--auto-samples",
    "ssi.model": "--model",
    "ssi.save_model": "--save-model",
    "save_model": "--save-model",
    "model": "--model",
    "train.device": "--train-device",
    "on_worker": "--train-on worker",
    "patch_size": "--patch-size",
    "batch_size": "--batch-size",
    "net_levels": "--net-levels",
    "lr_prior": "--lr-prior",
    "tta": "--tta",
    "base_channels": "--base-channels",
    "refractive_index": "--refractive-index",
    "psf_shape": "--psf-shape",
    "psf": "--psf",
    "na": "--na",
    "wavelength": "--wavelength",
    "zarr_format": "--zarr-format",
    "output_format": "--output-format",
    "output_shards": "--output-shards",
    "output_dtype": "--output-dtype",
    "skip_background": "--skip-background",
    "skip_background_level": "--skip-background-level",
    "output_chunks": "--output-chunks",
    "shards": "--shards",
    "chunks": "--chunks",
    "depth": "--depth",
    "level": "--level",
    "channels": "--channel",
    "voxel_size": "--voxel-size",
    "resume": "--resume",
    "repair": "--repair",
    "overwrite": "--overwrite",
    "method": "--method",
    "scheduler": "--scheduler",
    "scheduler_file": "--scheduler-file",
    "workers": "--workers",
    "threads_per_worker": "--threads-per-worker",
    "memory_limit": "--memory-limit",
    "gpu": "--gpu",
    "worker_timeout": "--worker-timeout",
    "connect_timeout": "--connect-timeout",
}


def _flag_value(value: str) -> str:
    """A Python literal in a message as the command line spells it: ``(1, 2)`` -> ``1,2``."""
    value = value.strip("'\"")
    if value.startswith("(") and value.endswith(")"):
        value = value[1:-1].replace(" ", "").rstrip(",")
    return value


def cli_message(message: str) -> str:
    """A library message with its parameter names replaced by the command's flags.

    ``resume=True`` -> ``--resume``; ``chunks=(64, 256, 256)`` -> ``--chunks 64,256,256``;
    ``psf=FILE`` -> ``--psf FILE``; ``memory_limit`` -> ``--memory-limit``. Names not in
    :data:`CLI_FLAGS` are left as they are.
    """
    import re  # noqa: PLC0415

    def keyword(match: re.Match) -> str:
        name, value = match.group(1), match.group(2) or ""
        flag = CLI_FLAGS.get(name)
        if flag is None:
            return match.group(0)
        if value == "True":
            return flag
        return f"{flag} {_flag_value(value)}" if value else flag

    literal = r"\([^()]*\)|'[^']*'|\"[^\"]*\"|[^\s,;)]+"
    message = re.sub(rf"(?<![\w.-])([a-z_.]+)=({literal})?", keyword, message)
    for name, flag in CLI_FLAGS.items():
        if "_" in name or "." in name or name == "cutoff":
            message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", flag, message)
    return message


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def one_of(name: str, value: Any, choices: Sequence[str]) -> Any:
    """``value`` if it is one of ``choices``; else the one-line error naming ``name``."""
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ParameterError(f"{name} must be a finite number > 0, got {value!r}")
    number = float(value)
    return number


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class LRSettings:
    """What Lucy-Richardson computes on every chunk.

    Parameters
    ----------
    num_iter : int or "auto"
        Iterations; ``"auto"`` chooses them without ground truth
        (:func:`ssi_dask.lr_auto.choose_iterations`).
    back_projector : {"classic", "wiener-butterworth"}
        The flipped PSF, or the unmatched Wiener-Butterworth back projector (Guo et al. 2020).
    wiener_alpha, butterworth_order, cutoff : optional
        Wiener-Butterworth parameters (defaults in :mod:`ssi_dask.lr`); refused with the
        classic back projector.
    offset : float
        Background subtracted from the input before deconvolving; values still below 0 are
        treated as 0.
    eps, edge_threshold : float
        Kernel tolerances of :func:`ssi_dask.lr.richardson_lucy`.
    acceleration : {"none", "nesterov"}
        Momentum of the classic iterations (:func:`ssi_dask.lr.richardson_lucy`); with
        ``num_iter="auto"`` the count is chosen for the accelerated iterations.
    auto_options : mapping, optional
        Passed to :func:`~ssi_dask.lr_auto.choose_iterations` with ``num_iter="auto"``.
    """

    num_iter: int | str = DEFAULT_NUM_ITER
    back_projector: str = "classic"
    wiener_alpha: float | None = None
    butterworth_order: float | None = None
    cutoff: float | tuple[float, ...] | None = None
    offset: float = 0.0
    eps: float = 1e-6
    edge_threshold: float = 1e-3
    acceleration: str = "none"
    auto_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_iter != "auto":
            if isinstance(self.num_iter, bool) or not isinstance(self.num_iter, Integral):
                raise ParameterError(
                    f"num_iter must be an integer >= 0 or 'auto', got {self.num_iter!r}"
                )
            _count("num_iter", int(self.num_iter), 0)
        if self.back_projector not in BACK_PROJECTORS:
            raise ParameterError(
                f"unknown back projector {self.back_projector!r}; choose 'classic' or "
                "'wiener-butterworth'"
            )
        for name in ("wiener_alpha", "butterworth_order"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        if self.cutoff is not None:
            values = self.cutoff if isinstance(self.cutoff, Sequence) else (self.cutoff,)
            for value in values:
                number = _positive("cutoff", value)
                if number > 0.5:
                    raise ParameterError(
                        f"cutoff is in cycles per pixel and must be <= 0.5, got {value!r}"
                    )
        given = [
            name
            for name in ("wiener_alpha", "butterworth_order", "cutoff")
            if getattr(self, name) is not None
        ]
        if given and self.back_projector == "classic":
            raise ParameterError(
                f"{', '.join(given)} only apply to the Wiener-Butterworth back projector; "
                "pass back_projector='wiener-butterworth' or drop them"
            )
        one_of("acceleration", self.acceleration, ACCELERATIONS)
        if self.acceleration != "none" and self.back_projector != "classic":
            raise ParameterError(
                f"acceleration={self.acceleration!r} applies to the classic back projector "
                "only; pass back_projector='classic' or acceleration='none'"
            )
        _finite("offset", self.offset)
        _positive("eps", self.eps)
        _positive("edge_threshold", self.edge_threshold)
        if self.auto_options and self.num_iter != "auto":
            raise ParameterError("auto_options apply with num_iter='auto' only")

    @classmethod
    def from_options(cls, num_iter: int | str | None = None, **options: Any) -> LRSettings:
        """Build from :func:`ssi_dask.deconvolve`'s keywords; unknown names are refused."""
        known = {f.name for f in fields(cls)} - {"num_iter"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ParameterError(
                f"unknown option(s) {', '.join(unknown)} for method 'lr'; expected some of "
                f"{', '.join(sorted(known))}"
            )
        if num_iter is None:
            num_iter = DEFAULT_NUM_ITER
        return cls(num_iter=num_iter, **options)

    def kernel_options(self) -> dict[str, Any]:
        """Keywords of :func:`ssi_dask.lr.richardson_lucy` that differ from its defaults."""
        options: dict[str, Any] = {}
        if self.back_projector != "classic":
            options["back_projector"] = self.back_projector
        for name in ("wiener_alpha", "butterworth_order", "cutoff"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.acceleration != "none":
            options["acceleration"] = self.acceleration
        defaults = {f.name: f.default for f in fields(type(self))}
        for name in ("eps", "edge_threshold"):
            if getattr(self, name) != defaults[name]:
                options[name] = getattr(self, name)
        return options

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for provenance."""
        return {
            key: (list(value) if isinstance(value, tuple) else value)
            for key, value in asdict(self).items()
            if key != "auto_options"
        }


#: Keywords of :func:`ssi_dask.deconvolve` that belong to Lucy-Richardson only.
LR_ONLY_OPTIONS = frozenset({f.name for f in fields(LRSettings)})


def refuse_lr_options(method: str, given: Mapping[str, Any]) -> None:
    """Refuse Lucy-Richardson options passed with another method (they would be dropped)."""
    names = sorted(name for name, value in given.items() if value is not None)
    if names:
        raise ParameterError(
            f"{', '.join(names)} apply to method 'lr' only; method {method!r} takes model=, "
            "tta=, chunks=, depth= and device="
        )


#: Lucy-Richardson accelerations (``acceleration`` of :meth:`ssi_dask.lr.RLPlan.deconvolve`).
ACCELERATIONS = ("none", "nesterov")

#: Rules of the hold-out count choice (``rule`` of :func:`ssi_dask.lr_auto.choose_iterations`).
PRIOR_RULES = ("one-se", "paired")
#: Where the noise-sensitivity penalty counts (:class:`TrainingRecipe`).
NOISE_PENALTY_REGIONS = ("everywhere", "background", "interiors")

#: The tuned SSI training defaults per dimensionality (:meth:`TrainingRecipe.for_ndim` fills
#: them in; the command line's help shows them). ``levels``: the UNet's resolution levels.
SSI_TRAINING_DEFAULTS = {
    2: dict(
        patch_size=96,
        batch_size=16,
        steps=800,
        levels=3,
        base_channels=8,
        lr_prior="auto",
        lr_prior_max_iter=50,
        lr_prior_rule="one-se",
        lr_prior_acceleration="none",
        noise_penalty_weight=0.0,
        noise_penalty_region="everywhere",
    ),
    3: dict(
        patch_size=64,
        batch_size=2,
        steps=600,
        levels=3,
        base_channels=8,
        lr_prior="auto",
        lr_prior_max_iter=100,
        lr_prior_rule="paired",
        lr_prior_acceleration="nesterov",
        noise_penalty_weight=0.2,
        noise_penalty_region="interiors",
    ),
}

#: Test-time transforms (PSF symmetries averaged at inference) per dimensionality when none
#: are given; chosen from ``benchmarks/ssi_tta.py`` (``benchmarks/RESULTS.md``, issue 16).
SSI_TTA_DEFAULTS = {2: 8, 3: 2}

#: The numbers of test-time transforms one can ask for (subgroups of the PSF's symmetries).
TTA_CHOICES = (1, 2, 4, 8, 16)

#: Forward operators of SSI training (:mod:`ssi_dask.ssi.forward`).
FORWARD_MODES = ("auto", "valid", "same")

#: How SSI training treats the volume's edges (``TrainingRecipe.edges``).
EDGE_MODES = ("background", "inside")


def ssi_default_text(key: str) -> str:
    """``"96 2D, 64 3D"``-style text of a training default, for help texts."""
    table = SSI_TTA_DEFAULTS if key == "tta" else None
    values = {ndim: (table[ndim] if table else SSI_TRAINING_DEFAULTS[ndim][key]) for ndim in (2, 3)}
    if values[2] == values[3]:
        return str(values[2])
    return f"{values[2]} 2D, {values[3]} 3D"


#: Extra SSI training runs (other seeds) when a run fails its self-supervised check, and
#: networks averaged (``ssi_dask.ssi.train_ssi``).
DEFAULT_RESTARTS = 2
DEFAULT_ENSEMBLE = 1


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a pair (low, high), got {value!r}") from None
    lo, hi = _finite(name, lo), _finite(name, hi)
    if not lo < hi:
        raise ParameterError(f"{name} must be (low, high) with low < high, got {value!r}")
    return lo, hi


def _fraction(name: str, value: Any, *, low_open: bool = True, high_open: bool = True) -> float:
    number = _finite(name, value)
    ok_low = number > 0 if low_open else number >= 0
    ok_high = number < 1 if high_open else number <= 1
    if not (ok_low and ok_high):
        low, high = "(0" if low_open else "[0", "1)" if high_open else "1]"
        raise ParameterError(f"{name} must be in {low}, {high}, got {value!r}")
    return number


def _non_negative(name: str, value: Any) -> float:
    number = _finite(name, value)
    if number < 0:
        raise ParameterError(f"{name} must be >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class TrainingRecipe:
    """How one SSI network is trained: the one place for the training defaults.

    ``None`` in ``steps``, ``patch_size``, ``batch_size``, ``levels``, ``base_channels``,
    ``lr_prior``, ``lr_prior_max_iter``, ``lr_prior_rule`` and ``lr_prior_acceleration`` means
    the tuned default for the image's dimensionality
    (:data:`SSI_TRAINING_DEFAULTS`); :meth:`for_ndim` fills them in. Every value is checked
    when the recipe is built and a bad one fails with the parameter's name.
    :func:`ssi_dask.ssi.train_ssi` documents what each field does;
    ``recipe.replace(steps=100)`` gives a changed copy.

    Parameters
    ----------
    steps, patch_size, batch_size : int, optional
        Optimiser steps per run, patch side, patches per step.
    levels, base_channels, max_channels, batch_norm :
        UNet architecture: resolution levels, channels at full resolution (doubled per level
        up to ``max_channels``), BatchNorm.
    learning_rate, weight_decay : float
        Peak one-cycle learning rate and AdamW weight decay.
    rho_start, rho_target, rho_decay_fraction : float
        Masking density schedule.
    validation_density, validation_patches, eval_every, patience :
        Self-supervised validation (held-out pixels) and early stopping.
    restarts, ensemble : int
        Extra runs after a failed run (validation loss, or the output-level self-check that
        every run gets); runs averaged into one network.
    norm_percentiles : (float, float)
        Normalisation percentiles of the image (they map to 0 and 1 for the network).
    output_range : "auto" or (float, float)
        The output's clip range in normalised units; ``"auto"`` (default): ``(0, 1 / p)`` with
        ``p`` the PSF's peak-to-sum ratio, the largest object value a non-negative object can
        have under the forward model when the blurred image peaks at the input's upper
        normalisation percentile (see :func:`ssi_dask.ssi.train_ssi`).
    bounds_weight, null_space_weight, null_space_scale, null_space_max, null_space_threshold :
        Penalties (``null_space_weight="auto"``: from the image's signal-to-noise ratio).
    sensor_clipping : "auto", None or (low, high)
        Detector clipping modelled in the loss.
    noise_penalty_weight, noise_penalty_fraction, augment, average_fraction :
        Noise-sensitivity penalty, PSF-symmetry augmentation, weight averaging.
        ``noise_penalty_weight`` default: 0 in 2D, 0.2 in 3D.
    noise_penalty_region : {"everywhere", "background", "interiors"}
        Where the noise-sensitivity penalty counts: every voxel; each voxel weighted by how
        far the Lucy-Richardson prior (the network's own output without a prior) there is
        within its own noise of the zero level; or, ``"interiors"``, also deep inside large bright
        objects (see :func:`ssi_dask.ssi.train_ssi`).
        Default: ``"interiors"`` in 3D (``"everywhere"`` in 2D, where the weight is 0).
    forward : {"auto", "valid", "same"}
        Forward operator of the loss: ``"valid"`` blurs each patch and scores the interior the
        PSF has full context for (patches must exceed the PSF); ``"same"`` blurs the patch
        zero-extended (plus the patch mean outside it) and scores where most of the PSF's
        energy falls inside the patch, for PSFs as large as the patches or the volume;
        ``"auto"``: ``"valid"`` when the patches are larger than the PSF, else ``"same"``.
    edges : {"background", "inside"}
        ``"background"``: training patches may reach half a patch past the volume's edges,
        where they hold the background level (the normalisation's offset), and the loss scores
        every pixel inside the volume up to its edge; the network's output past the edge stands
        for the unknown object there (as Lucy-Richardson's extended domain does), and at
        inference the volume is padded with the same background level. ``"inside"``: every
        patch lies inside the volume, so the pixels within the PSF's radius of an edge are
        never scored, and inference mirrors the volume at its edges. With ``forward="same"``
        patches always lie inside.
    lr_prior : int, "auto" or None
        Lucy-Richardson prior: with ``n > 0`` the network also sees the Lucy-Richardson
        restoration of its input after ``n`` iterations and predicts a correction to it (the
        null-space penalty applies to the correction); ``"auto"``: ``n`` chosen from the image
        by :func:`ssi_dask.lr_auto.choose_iterations`; 0: no prior. Default: ``"auto"``.
        At a training step the masked pixels count as unmeasured for the prior. Its zero
        level is the normalisation's offset, or, for data with noise around a zero
        background (negative values), the data's zero (see ``_prior_background`` in
        :mod:`ssi_dask.ssi.train`).
    lr_prior_max_iter : int, optional
        With ``lr_prior="auto"``: the largest iteration count the hold-out rule scores.
        Default: 50 in 2D (the range of ``--iterations auto``), 100 in 3D (accelerated
        iterations: they reach the restoration of 100-200 classic ones, LR's best counts on
        the 3D benchmark, in 31-33 and pass it on shells; the classic prior's range was
        1-200, so ``lr_prior_acceleration="none"`` wants ``lr_prior_max_iter=200``).
    lr_prior_rule : {"one-se", "paired"}, optional
        With ``lr_prior="auto"``: how far below the hold-out error's minimum the count may go
        (``rule`` of :func:`ssi_dask.lr_auto.choose_iterations`): ``"one-se"``, the fewest
        iterations within one standard error of the minimum's mean error; ``"paired"``, the
        fewest whose error exceeds the best count's by at most one standard error of their
        per-pixel difference (stops closer to the minimum). Default: ``"one-se"`` in 2D,
        ``"paired"`` in 3D.
    lr_prior_acceleration : {"none", "nesterov"}, optional
        The prior's Lucy-Richardson iterations (``acceleration`` of
        :meth:`ssi_dask.lr.RLPlan.deconvolve`), in the count's choice too: ``"nesterov"``
        reaches a given restoration in 3-6x fewer iterations on the 3D benchmark (so a
        shorter prior, halo and training step) and degrades faster past its best count, so
        it goes with the paired rule (the one-standard-error rule stops it 0.8-2.7 dB early).
        Default: ``"none"`` in 2D, ``"nesterov"`` in 3D (``benchmarks/RESULTS.md``, issue
        16, twelfth session).
    prior_reuse : int
        With a Lucy-Richardson prior: how many training steps each prepared sample (a patch,
        its pixel mask and the prior of the masked patch) serves, each time under another
        random symmetry of the PSF (which the prior commutes with). ``r`` divides the prior's
        cost per step by ``r`` (the prior is most of a 3D step), but the network then sees
        ``r`` times fewer masks: ``r = 4`` gave -0.85, -0.01 and -0.06 dB against ``r = 1``
        on three 3D benchmark crops (``benchmarks/RESULTS.md``, issue 16). Default 1: every
        sample serves one step.
    """

    steps: int | None = None
    patch_size: int | None = None
    batch_size: int | None = None
    levels: int | None = None
    base_channels: int | None = None
    max_channels: int = 64
    batch_norm: bool = True
    learning_rate: float = 4e-3
    weight_decay: float = 1e-5
    rho_start: float = 0.5
    rho_target: float = 0.1
    rho_decay_fraction: float = 0.25
    validation_density: float = 0.1
    validation_patches: int | None = None
    eval_every: int = 50
    patience: int | None = None
    restarts: int = DEFAULT_RESTARTS
    ensemble: int = DEFAULT_ENSEMBLE
    norm_percentiles: tuple[float, float] = (0.01, 99.99)
    output_range: tuple[float, float] | str = "auto"
    bounds_weight: float = 0.1
    null_space_weight: float | str = "auto"
    null_space_scale: float = 2.5
    null_space_max: float = 0.1
    null_space_threshold: float = 1.0
    sensor_clipping: Any = "auto"
    noise_penalty_weight: float | None = None
    noise_penalty_fraction: float = 0.25
    noise_penalty_region: str | None = None
    augment: bool = True
    average_fraction: float = 0.5
    forward: str = "auto"
    edges: str = "inside"
    lr_prior: int | str | None = None
    lr_prior_max_iter: int | None = None
    lr_prior_rule: str | None = None
    lr_prior_acceleration: str | None = None
    prior_reuse: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "patch_size", "batch_size", "levels", "base_channels"):
            _optional_count(name, getattr(self, name), 1)
        _count("max_channels", self.max_channels, 1)
        _count("prior_reuse", self.prior_reuse, 1)
        _optional_count("lr_prior_max_iter", self.lr_prior_max_iter, 1)
        if self.lr_prior_rule is not None:
            one_of("lr_prior_rule", self.lr_prior_rule, PRIOR_RULES)
        if self.lr_prior_acceleration is not None:
            one_of("lr_prior_acceleration", self.lr_prior_acceleration, ACCELERATIONS)
        _optional_count("validation_patches", self.validation_patches, 1)
        _optional_count("patience", self.patience, 1)
        _count("eval_every", self.eval_every, 1)
        _count("restarts", self.restarts, 0)
        _count("ensemble", self.ensemble, 1)
        for name in ("batch_norm", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _positive("learning_rate", self.learning_rate)
        for name in ("weight_decay", "bounds_weight", "null_space_scale", "null_space_max"):
            _non_negative(name, getattr(self, name))
        if self.noise_penalty_weight is not None:
            _non_negative("noise_penalty_weight", self.noise_penalty_weight)
        if self.noise_penalty_region is not None:
            one_of("noise_penalty_region", self.noise_penalty_region, NOISE_PENALTY_REGIONS)
        _positive("null_space_threshold", self.null_space_threshold)
        _fraction("rho_start", self.rho_start)
        _fraction("rho_target", self.rho_target)
        if self.rho_target > self.rho_start:
            raise ParameterError(
                f"rho_target must be <= rho_start, got rho_target={self.rho_target!r} and "
                f"rho_start={self.rho_start!r}"
            )
        _fraction("rho_decay_fraction", self.rho_decay_fraction, high_open=False)
        _fraction("validation_density", self.validation_density)
        _fraction("noise_penalty_fraction", self.noise_penalty_fraction, high_open=False)
        _fraction("average_fraction", self.average_fraction, low_open=False)
        lo, hi = _pair("norm_percentiles", self.norm_percentiles)
        if lo < 0 or hi > 100:
            raise ParameterError(
                f"norm_percentiles must lie in [0, 100], got {self.norm_percentiles!r}"
            )
        object.__setattr__(self, "norm_percentiles", (lo, hi))
        if isinstance(self.output_range, str):
            if self.output_range != "auto":
                raise ParameterError(
                    f"output_range must be 'auto' or (low, high), got {self.output_range!r}"
                )
        else:
            object.__setattr__(self, "output_range", _pair("output_range", self.output_range))
        if isinstance(self.null_space_weight, str):
            if self.null_space_weight != "auto":
                raise ParameterError(
                    "null_space_weight must be a number >= 0 or 'auto', got "
                    f"{self.null_space_weight!r}"
                )
        else:
            _non_negative("null_space_weight", self.null_space_weight)
        clipping = self.sensor_clipping
        if isinstance(clipping, str):
            if clipping != "auto":
                raise ParameterError(
                    f"sensor_clipping must be 'auto', None or (lower, upper), got {clipping!r}"
                )
        elif clipping is not None and clipping is not False:
            try:
                lower, upper = clipping
            except (TypeError, ValueError):
                raise ParameterError(
                    f"sensor_clipping must be 'auto', None or (lower, upper), got {clipping!r}"
                ) from None
            if lower is not None and upper is not None and not float(lower) < float(upper):
                raise ParameterError(f"sensor_clipping needs lower < upper, got {clipping!r}")
        if self.forward not in FORWARD_MODES:
            raise ParameterError(
                f"forward must be one of {', '.join(FORWARD_MODES)}, got {self.forward!r}"
            )
        if self.lr_prior is None:
            pass  # the default for the image's dimensionality (for_ndim)
        elif isinstance(self.lr_prior, str):
            if self.lr_prior != "auto":
                raise ParameterError(
                    f"lr_prior must be an iteration count >= 0 or 'auto', got {self.lr_prior!r}"
                )
        else:
            _count("lr_prior", self.lr_prior, 0)
        if self.prior_reuse > 1 and self.lr_prior == 0:
            raise ParameterError(
                f"prior_reuse={self.prior_reuse} needs a Lucy-Richardson prior, got lr_prior=0; "
                "give lr_prior='auto' or a count, or leave prior_reuse at 1"
            )
        if self.edges not in EDGE_MODES:
            raise ParameterError(
                f"edges must be one of {', '.join(EDGE_MODES)}, got {self.edges!r}"
            )

    def replace(self, **changes: Any) -> TrainingRecipe:
        """A copy with ``changes`` (checked; an unknown name is refused with the known ones)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ParameterError(
                f"unknown training option(s) {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)

    def for_ndim(self, ndim: int) -> TrainingRecipe:
        """This recipe with the 2D or 3D defaults in place of ``None``."""
        if ndim not in SSI_TRAINING_DEFAULTS:
            raise ParameterError(f"SSI trains on 2D or 3D images, got ndim={ndim!r}")
        defaults = SSI_TRAINING_DEFAULTS[ndim]
        return dataclasses.replace(
            self,
            **{key: value for key, value in defaults.items() if getattr(self, key) is None},
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for provenance."""
        return {
            key: (list(value) if isinstance(value, tuple) else value)
            for key, value in asdict(self).items()
        }


#: SSI training regions when none are given (``ssi_dask.training.DEFAULT_REGIONS``).
DEFAULT_REGIONS = 24

#: Share of the global range below which a region's 99th percentile counts as background.
DEFAULT_BACKGROUND = 0.05


def _optional_count(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        _count(name, value, minimum)


@dataclass(frozen=True)
class TrainSettings:
    """How an SSI network is trained (``ssi-dask train``, or ``run --method ssi`` without a model).

    The options a run exposes; :meth:`recipe` turns them into the :class:`TrainingRecipe` that
    :func:`ssi_dask.ssi.train_ssi` takes. ``None`` keeps the recipe's (tuned 2D/3D) default.
    """

    seed: int = 0
    steps: int | None = None
    restarts: int | None = None
    ensemble: int | None = None
    patch_size: int | None = None
    batch_size: int | None = None
    net_levels: int | None = None
    base_channels: int | None = None
    lr_prior: int | str | None = None
    clipping: Any = "auto"
    device: str = "auto"
    regions: int = DEFAULT_REGIONS
    region_size: Any = None
    background: float = DEFAULT_BACKGROUND
    on_worker: bool = False

    def __post_init__(self) -> None:
        _count("seed", self.seed, 0)
        for name in (
            "steps",
            "ensemble",
            "patch_size",
            "batch_size",
            "net_levels",
            "base_channels",
        ):
            _optional_count(name, getattr(self, name), 1)
        _optional_count("restarts", self.restarts, 0)
        if self.lr_prior is not None:
            TrainingRecipe(lr_prior=self.lr_prior)  # checked by name
        _count("regions", self.regions, 1)
        background = _finite("background", self.background)
        if not 0 <= background < 1:
            raise ParameterError(f"background must be in [0, 1), got {self.background!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ParameterError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def recipe(self) -> TrainingRecipe:
        """The :class:`TrainingRecipe` these settings describe (defaults where ``None``)."""
        changes: dict[str, Any] = {"sensor_clipping": self.clipping}
        for name, key in (
            ("steps", "steps"),
            ("restarts", "restarts"),
            ("ensemble", "ensemble"),
            ("patch_size", "patch_size"),
            ("batch_size", "batch_size"),
            ("net_levels", "levels"),
            ("base_channels", "base_channels"),
            ("lr_prior", "lr_prior"),
        ):
            if getattr(self, name) is not None:
                changes[key] = getattr(self, name)
        return TrainingRecipe(**changes)


@dataclass(frozen=True)
class SSISettings:
    """What SSI applies: a checkpoint (or model object), else a network trained by the run.

    ``tta``: test-time transforms averaged per chunk (1, 2, 4, 8 or 16 of the PSF's
    symmetries, capped at the number it has); ``None``: :data:`SSI_TTA_DEFAULTS`.
    """

    model: Any = None
    save_model: str | None = None
    train: TrainSettings = TrainSettings()
    tta: int | None = None

    def __post_init__(self) -> None:
        if self.model is not None and self.save_model is not None:
            raise ParameterError("save_model keeps a model trained by the run; drop it with model")
        check_tta(self.tta)


def check_tta(tta: Any) -> int | None:
    """``tta`` checked: None or one of :data:`TTA_CHOICES` (named in the error)."""
    if tta is None:
        return None
    if isinstance(tta, bool) or not isinstance(tta, Integral) or int(tta) not in TTA_CHOICES:
        raise ParameterError(
            f"tta={tta!r} is not a number of test-time transforms; give tta=1, 2, 4, 8 or 16"
        )
    return int(tta)


def ssi_tta(tta: Any, ndim: int) -> int:
    """The test-time transforms a run uses: ``tta`` checked, or the default for ``ndim``."""
    tta = check_tta(tta)
    return SSI_TTA_DEFAULTS[ndim] if tta is None else tta


@dataclass(frozen=True)
class PSFSettings:
    """Where the PSF comes from: files (one, or one per channel), or optics to compute one."""

    files: tuple[str, ...] = ()
    na: float | None = None
    wavelength: tuple[float, ...] = ()
    refractive_index: float = DEFAULT_REFRACTIVE_INDEX
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.files and (self.na is not None or self.wavelength):
            raise ParameterError("give PSF files or optics (na, wavelength), not both")
        _positive("refractive_index", self.refractive_index)
        if self.shape is not None and any(int(s) < 1 for s in self.shape):
            raise ParameterError(f"psf_shape must be positive sizes, got {self.shape}")


@dataclass(frozen=True)
class LayoutSettings:
    """How the volume is cut into tasks and how the output is stored."""

    chunks: Any = None
    output_chunks: Any = None
    depth: int | tuple[int, ...] | None = None
    output_shards: Any = None
    shards: bool = False
    zarr_format: int | None = None
    output_format: str = "auto"
    #: Stored type of the result (see :data:`OUTPUT_DTYPES` and README "Output dtype").
    output_dtype: str = "float32"
    #: LR, Zarr input: chunks whose input (with halo) is at most this everywhere are written
    #: as their background value without computing (None: compute every chunk).
    skip_background: float | None = None
    #: With skip_background and an OME-Zarr input: decide from this coarser pyramid level
    #: first, without reading a background chunk's full-resolution input (None: decide from
    #: the full-resolution input each chunk reads; exact).
    skip_background_level: int | None = None

    def __post_init__(self) -> None:
        if self.skip_background is not None:
            _finite("skip_background", self.skip_background)
        level = self.skip_background_level
        if level is not None:
            if isinstance(level, bool) or not isinstance(level, int) or level < 1:
                raise ParameterError(
                    f"skip_background_level must be a pyramid level >= 1, got {level!r}"
                )
            if self.skip_background is None:
                raise ParameterError(
                    "skip_background_level needs skip_background=THRESHOLD (the level only "
                    "says where the decision is read from)"
                )
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ParameterError(
                f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.output_dtype!r}"
            )
        if self.zarr_format not in (None, 2, 3):
            raise ParameterError(f"zarr_format must be 2 or 3, got {self.zarr_format!r}")
        if self.output_format not in ("auto", "ome-zarr", "zarr"):
            raise ParameterError(
                f"output_format must be auto, ome-zarr or zarr, got {self.output_format!r}"
            )
        if self.shards and self.output_shards is not None:
            raise ParameterError("give shards=True or output_shards=SPEC, not both")
        if self.shards and self.zarr_format == 2:
            raise ParameterError("shards=True needs zarr_format=3")
        depth = self.depth
        if depth is not None:
            values = (depth,) if isinstance(depth, int) else tuple(depth)
            for value in values:
                _count("depth", value, 0)


#: Choices of ``LayoutSettings.output_dtype``: ``same`` stores the input's type (float32,
#: float16, uint16 or uint8). Integer outputs hold round(value) with CF ``scale_factor`` 1
#: and ``add_offset`` 0 in the array's attributes; values outside the type's range are
#: clipped, counted and reported.
OUTPUT_DTYPES = ("float32", "float16", "uint16", "same")


@dataclass(frozen=True)
class ClusterSettings:
    """Where the run computes: a scheduler (address or file), or a local cluster of this size."""

    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    gpu: bool = False
    worker_timeout: float = 120.0
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.scheduler and self.scheduler_file:
            raise ParameterError("give either scheduler or scheduler_file, not both")
        _optional_count("workers", self.workers, 1)
        _count("threads_per_worker", self.threads_per_worker, 1)
        _positive("worker_timeout", self.worker_timeout)
        _positive("connect_timeout", self.connect_timeout)

    @property
    def remote(self) -> bool:
        """True when the run connects to an existing scheduler."""
        return bool(self.scheduler or self.scheduler_file)


@dataclass(frozen=True)
class Job:
    """One whole run: what to deconvolve, with what, how to lay it out, where to compute.

    Built by the command line from its flags and by notebooks directly; every field is
    checked when the job is built (see each settings class). :func:`ssi_dask.run` runs it.
    """

    input: Any
    output: Any
    method: str = "lr"
    lr: LRSettings = LRSettings()
    ssi: SSISettings = SSISettings()
    psf: PSFSettings = PSFSettings()
    layout: LayoutSettings = LayoutSettings()
    cluster: ClusterSettings = ClusterSettings()
    level: int = 0
    channels: tuple[int | str, ...] | None = None
    voxel_size: tuple[float, ...] | None = None
    overwrite: bool = False
    resume: bool = False
    repair: bool = False
    dry_run: bool = False
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.method not in ("lr", "ssi"):
            raise ParameterError(f"method must be 'lr' or 'ssi', got {self.method!r}")
        if self.resume and self.overwrite:
            raise ParameterError(
                "resume=True keeps the output and overwrite=True deletes it; give only one"
            )
        if self.repair and not self.resume:
            raise ParameterError(
                "repair=True checks an existing output; give it together with resume=True"
            )
        _count("level", self.level, 0)
        if self.voxel_size is not None:
            for value in self.voxel_size:
                _positive("voxel_size", value)
        if self.method == "ssi":
            changed = [
                f.name
                for f in fields(LRSettings)
                if f.name != "auto_options" and getattr(self.lr, f.name) != f.default
            ]
            if changed:
                raise ParameterError(
                    f"lr.{', lr.'.join(changed)} apply to method 'lr' only; method 'ssi' "
                    "applies a trained network"
                )
        elif self.ssi.model is not None or self.ssi.save_model is not None:
            raise ParameterError("ssi.model and ssi.save_model apply to method 'ssi' only")
        elif self.ssi.tta is not None:
            raise ParameterError("ssi.tta applies to method 'ssi' only")
