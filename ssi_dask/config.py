"""Typed, validated settings of what to compute; the defaults live here.

A setting is checked when its object is built, before any Dask work, and a bad value fails
with the parameter's name (the command line maps names to flags, see
:data:`CLI_FLAGS`). These objects are what :func:`ssi_dask.deconvolve` validates its keyword
arguments with, so the Python API and the command line accept and refuse the same values.
"""

from __future__ import annotations

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

#: Library parameter -> command-line flag, for messages that must name what the user typed.
CLI_FLAGS = {
    "num_iter": "--iterations",
    "back_projector": "--back-projector",
    "wiener_alpha": "--wiener-alpha",
    "butterworth_order": "--butterworth-order",
    "cutoff": "--cutoff",
    "offset": "--offset",
    "auto_max_iter": "--auto-max-iterations",
    "auto_samples": "--auto-samples",
}


def cli_message(message: str) -> str:
    """A library error message with its parameter names replaced by the command's flags."""
    import re  # noqa: PLC0415

    for name, flag in CLI_FLAGS.items():
        message = re.sub(rf"(?<![\w-]){name}(?![\w-])", flag, message)
    return message


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}")
    return float(value)


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
            "chunks=, depth= and device="
        )
