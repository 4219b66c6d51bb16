"""Lucy-Richardson deconvolution kernel for one in-memory 2D or 3D array.

This module is a pure kernel: an array goes in and a ``float32`` array of the same array module
comes out (NumPy on the CPU with :mod:`scipy.fft`, CuPy on the GPU with :mod:`cupyx.scipy.fft`).
It performs no I/O and knows nothing about Dask; the chunked wrappers call it per block.

Model
-----
The image ``y`` (shape ``N`` per axis) is the ``'same'``-centred linear convolution of an
unknown object with the PSF ``h`` (shape ``K``), centred exactly like
``scipy.signal.fftconvolve(x, h, mode='same')``. The object that contributes to the image
extends ``K - 1`` pixels beyond it, so the estimate lives on a *linear working domain* of
``N + K - 1`` pixels per axis, rounded up to a fast FFT size. Because every circular
convolution is done on that domain, the FFT never wraps data around. The data are known only
on the image region: the ratio ``y / (h * x)`` is evaluated there and set to zero elsewhere, and
the back-projected update is divided by the Bertero-Boccacci edge weights
``w = h^T * 1_image`` where ``w`` exceeds ``edge_threshold * max(w)`` (zero elsewhere).

Layout of the working domain (per axis, ``M`` samples, ``c = (K - 1) // 2``): the image
occupies ``[0, N)``; the object margin beyond the image occupies ``[N, N + c)`` and, wrapped
around, ``[M - (K - 1 - c), M)``. The PSF is stored rolled so that its centre sample ``c``
sits at the origin.

Negative values
---------------
Lucy-Richardson is the maximum-likelihood estimate for Poisson counts, which are never
negative; its multiplicative update keeps a non-negative estimate non-negative only while the
data are. A negative data value turns the ratio ``y / max(h * x, eps)`` into ``-|y| / eps``,
the estimate changes sign and grows until it overflows: the result is NaN (scikit-image's
``richardson_lucy`` has no guard against this). The kernel therefore treats negative values of
``image`` as 0, as the lattice light-sheet ``RLdecon`` code that PetaKit5D grew from does after
subtracting its ``background`` (the caller's array is not modified), so a finite image always
gives a finite result. Subtracting the background first is the caller's choice
(``ssi-dask run --offset``; :func:`ssi_dask.deconvolve` ``offset=``).

Back projectors
---------------
Classic Lucy-Richardson back-projects with the flipped PSF ``h^T``. The unmatched
*Wiener-Butterworth* back projector of Guo et al. 2020 (Nat Biotech 38:1337, "Rapid image
deconvolution and multiview fusion for optical microscopy") replaces it by a kernel ``b`` of the
PSF's size whose transform is a Wiener filter times a Butterworth low-pass,

``B(k) = (1 + alpha) * conj(H(k)) / (|H(k)|^2 + alpha) / sqrt(1 + eps^2 * r(k)^(2 p))``,
``r(k)^2 = sum_i (k_i / kc_i)^2``, ``eps^2 = 1 / beta^2 - 1``,

computed on the PSF's own grid (so ``b`` has the PSF's support and the linear working domain
never wraps), normalised to unit sum. ``H(k) B(k)`` is close to 1 at low frequencies (where
``|H|^2 >> alpha``); the Butterworth factor is ``beta`` at the cut-off, so the product is at
most ``beta`` there and falls to about 0 beyond it, so a few iterations do the work of
tens of classic ones. Defaults (:func:`wiener_butterworth_defaults`), following the paper's
description with one level ``f = WB_SUPPORT_FRACTION = 0.05`` read off the PSF:

* cut-off ``kc_i`` along each axis: the largest frequency (cycles per pixel) at which ``|H|``
  is still at least ``f`` of its peak, i.e. the extent of the OTF's support. The paper uses
  the resolution limit ``1 / FWHM``; for a Gaussian PSF ``|H|`` falls to about 3 % there and
  to 5 % at ``0.92 / FWHM``, and unlike the FWHM the support is defined for any PSF (a
  defocused ring, an axially long widefield PSF). An axis whose OTF stays above ``f`` up to
  the Nyquist frequency gets no cut-off;
* ``alpha = f``: the Wiener parameter equals the OTF's relative level at the cut-off (the
  paper's option of taking it from the OTF at the resolution limit; its fixed defaults
  1e-4 .. 1e-3 suit high-SNR light-sheet data and over-amplify noise on the protocol images);
* ``beta = 0.01`` (the paper's range 0.001 .. 0.01) and order ``p = 10`` (the paper's code
  default; range 4 .. 15).

Measured on the 2D protocol image usaf (ring PSF, heavy noise) these defaults reach the best
classic PSNR (any n <= 50) in one iteration; ``--iterations auto`` also chooses alpha. The
update ``x * (b * ratio) / (b * 1)`` can turn negative where ``b``'s side lobes
dominate; it is clamped at zero.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ssi_dask._backend import get_array_module, get_fft_module
from ssi_dask.config import ACCELERATIONS, WB_DEFAULT_ALPHA, WB_DEFAULT_ORDER, one_of
from ssi_dask.errors import InputError, ParameterError, PSFError

__all__ = [
    "BACK_PROJECTORS",
    "BackProjector",
    "LinearConvolver",
    "RLPlan",
    "clear_plan_cache",
    "convolve_same",
    "get_plan",
    "lr_default_depth",
    "otf_cutoff",
    "resolve_back_projector",
    "richardson_lucy",
    "wiener_butterworth_defaults",
    "wiener_butterworth_kernel",
]

#: Names accepted by ``back_projector``.
BACK_PROJECTORS = ("classic", "wiener-butterworth")
#: The OTF's relative level that defines its support (cut-off) and the default Wiener alpha.
WB_SUPPORT_FRACTION = 0.05
# WB_DEFAULT_ALPHA (config): the Wiener alpha by default, the OTF's relative level at the
# cut-off (WB_SUPPORT_FRACTION); WB_DEFAULT_ORDER (config): the Butterworth order by default
# (Guo et al. 2020: 4 .. 15; their code's default).
assert WB_DEFAULT_ALPHA == WB_SUPPORT_FRACTION
#: Gain of the Butterworth filter at the cut-off (Guo et al. 2020: 0.001 .. 0.01).
WB_BETA = 0.01

_PLAN_CACHE_SIZE = 4
_plan_cache: OrderedDict[tuple, LinearConvolver] = OrderedDict()
_plan_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _fft_kwargs(xp: ModuleType) -> dict[str, Any]:
    """Extra keyword arguments for the FFT calls: ``workers=-1`` for SciPy, none for cupyx."""
    return {"workers": -1} if xp is np else {}


def _to_module(array: Any, xp: ModuleType) -> Any:
    """Return ``array`` as an array of module ``xp`` (moving it between host and device)."""
    if get_array_module(array) is xp:
        return array
    if xp is np:  # a CuPy array to the host
        return array.get()
    return xp.asarray(np.asarray(array))


def _check_image(image: Any) -> None:
    ndim = getattr(image, "ndim", None)
    if ndim not in (2, 3):
        raise InputError(
            f"the image must be a 2D or 3D array, got {ndim if ndim is not None else 'no'} "
            "dimensions; pass one image or one volume at a time"
        )
    kind = image.dtype.kind
    if kind not in "biuf":
        raise InputError(
            f"the image has dtype {image.dtype}, which is not a real number type; "
            "convert it to integers or floats first"
        )
    if image.size == 0:
        raise InputError(f"the image is empty (shape {tuple(image.shape)})")


def _prepare_psf(psf: Any, ndim: int, *, normalize: bool) -> np.ndarray:
    """Validate ``psf`` and return it as a C-contiguous ``float32`` host array."""
    if get_array_module(psf) is not np:
        psf = psf.get()
    psf = np.asarray(psf)
    if psf.ndim != ndim:
        raise PSFError(
            f"the PSF has {psf.ndim} dimensions but the image has {ndim}; "
            "pass a PSF with one axis per image axis"
        )
    if psf.size == 0:
        raise PSFError(f"the PSF is empty (shape {psf.shape})")
    if psf.dtype.kind not in "biuf":
        raise PSFError(f"the PSF has dtype {psf.dtype}; it must hold real numbers")
    psf64 = psf.astype(np.float64)
    if not np.all(np.isfinite(psf64)):
        raise PSFError("the PSF contains NaN or infinite values")
    if normalize:
        if psf64.min() < 0:
            raise PSFError(
                f"the PSF has negative values (min {psf64.min():.3g}); Lucy-Richardson needs a "
                "non-negative PSF: clip or background-subtract it first"
            )
        total = psf64.sum()
        if not total > 0:
            raise PSFError("the PSF sums to zero; it must contain some positive values")
        psf64 = psf64 / total
    return np.ascontiguousarray(psf64, dtype=np.float32)


def _non_negative_data(image: Any, xp: ModuleType) -> Any:
    """The image as contiguous ``float32`` with negative values set to 0 (a copy if any)."""
    y = xp.ascontiguousarray(_to_module(image, xp), dtype=xp.float32)
    if y.size and float(y.min()) < 0:  # never clip in place: y may be the caller's array
        y = xp.maximum(y, xp.float32(0))
    return y


def _check_acceleration(acceleration: Any) -> str:
    return one_of("acceleration", acceleration, ACCELERATIONS)


def _check_positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number, got {value!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise ParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_edge_threshold(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"edge_threshold must be a number, got {value!r}") from None
    if not 0 < value < 1:
        raise ParameterError(
            f"edge_threshold must lie strictly between 0 and 1 (relative to the largest edge "
            f"weight), got {value!r}"
        )
    return value


def _check_num_iter(num_iter: Any) -> int:
    if isinstance(num_iter, bool) or not isinstance(num_iter, numbers.Integral):
        raise ParameterError(f"num_iter must be an integer >= 0, got {num_iter!r}")
    if num_iter < 0:
        raise ParameterError(f"num_iter must be an integer >= 0, got {num_iter}")
    return int(num_iter)


def _check_workers(workers: Any) -> int:
    """Return the number of CPU threads for ``workers`` (-1: all available cores)."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers == 0:
        raise ParameterError(
            f"workers must be a positive integer or -1 (all cores), got {workers!r}"
        )
    if workers < 0:
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        return max(1, available + 1 + int(workers))
    return int(workers)


# Elementwise steps, applied to the index range [start, stop) of their first array's leading
# axis. On the CPU they run in a few threads (NumPy releases the GIL) on blocks large enough that
# the GIL is not the bottleneck; on CuPy the multi-op steps are single fused kernels.
_BLOCK = 1 << 20  # elements per block of a CPU step
_MAX_ELEMENTWISE_THREADS = 8  # memory bandwidth is saturated well before 8 threads


@functools.cache
def _cupy_kernels() -> dict[str, Any]:
    import cupy  # noqa: PLC0415

    return {
        "ratio": cupy.ElementwiseKernel(
            "float32 y, float32 b, float32 eps", "float32 r", "r = y / max(b, eps)", "ssi_lr_ratio"
        ),
        "update": cupy.ElementwiseKernel(
            "float32 u, float32 w", "float32 x", "x = x * (u * w)", "ssi_lr_update"
        ),
        "update_clamped": cupy.ElementwiseKernel(
            "float32 u, float32 w",
            "float32 x",
            "x = max(x * (u * w), 0.0f)",
            "ssi_lr_update_clamped",
        ),
    }


def _quietly(step: Callable[..., None], *args: Any) -> None:
    """Run an elementwise step without NumPy's overflow warnings (in any thread).

    Only finite-but-huge data (near float32's limit) overflow; the result then holds Inf or
    NaN, which callers see (``ssi-dask run`` refuses to write such a chunk), and a warning
    printed from a Dask worker would only add lines to the command's one-line errors.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        step(*args)


def _mul_inplace(start: int, stop: int, block: int | None, a: Any, b: Any) -> None:
    xp = get_array_module(a)
    step = block or stop - start
    for i in range(start, stop, step):
        j = min(i + step, stop)
        xp.multiply(a[i:j], b[i:j], out=a[i:j])


def _ratio(
    start: int, stop: int, block: int | None, y: Any, blurred: Any, ratio: Any, eps: Any
) -> None:
    xp = get_array_module(y)
    if xp is not np:
        _cupy_kernels()["ratio"](y[start:stop], blurred[start:stop], eps, ratio[start:stop])
        return
    step = max(1, block // y[0].size) if block else stop - start  # planes (rows in 2D)
    for i in range(start, stop, step):
        j = min(i + step, stop)
        out = ratio[i:j]
        np.maximum(blurred[i:j], eps, out=out)
        np.divide(y[i:j], out, out=out)


def _update(
    start: int, stop: int, block: int | None, x: Any, update: Any, inv_weights: Any
) -> None:
    xp = get_array_module(x)
    if xp is not np:
        _cupy_kernels()["update"](update[start:stop], inv_weights[start:stop], x[start:stop])
        return
    step = block or stop - start
    for i in range(start, stop, step):
        j = min(i + step, stop)
        u = update[i:j]
        np.multiply(u, inv_weights[i:j], out=u)
        np.multiply(x[i:j], u, out=x[i:j])


def _update_clamped(
    start: int, stop: int, block: int | None, x: Any, update: Any, inv_weights: Any
) -> None:
    """Like :func:`_update`, then ``x = max(x, 0)`` (unmatched back projectors have lobes)."""
    xp = get_array_module(x)
    if xp is not np:
        _cupy_kernels()["update_clamped"](
            update[start:stop], inv_weights[start:stop], x[start:stop]
        )
        return
    step = block or stop - start
    for i in range(start, stop, step):
        j = min(i + step, stop)
        u = update[i:j]
        np.multiply(u, inv_weights[i:j], out=u)
        np.multiply(x[i:j], u, out=x[i:j])
        np.maximum(x[i:j], 0, out=x[i:j])


class _BlockRunner:
    """Run an elementwise step over ``[0, n)``: threaded and blocked on NumPy, whole on CuPy."""

    def __init__(self, xp: ModuleType, threads: int) -> None:
        self.cpu = xp is np
        self.threads = min(threads, _MAX_ELEMENTWISE_THREADS) if self.cpu else 1
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def __enter__(self) -> _BlockRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __call__(self, step: Callable[..., None], n: int, *arrays: Any) -> None:
        if not self.cpu:
            step(0, n, None, *arrays)
            return
        if self.pool is None or n < 2 * self.threads:
            _quietly(step, 0, n, _BLOCK, *arrays)
            return
        bounds = [n * k // self.threads for k in range(self.threads + 1)]
        futures = [
            self.pool.submit(_quietly, step, bounds[k], bounds[k + 1], _BLOCK, *arrays)
            for k in range(self.threads)
            if bounds[k + 1] > bounds[k]
        ]
        for future in futures:
            future.result()


# --------------------------------------------------------------------------------------------
# back projectors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackProjector:
    """A back projector with every parameter resolved (no defaults left open).

    Attributes
    ----------
    kind : {"classic", "wiener-butterworth"}
        ``"classic"``: the flipped PSF. ``"wiener-butterworth"``: the kernel of
        :func:`wiener_butterworth_kernel` with the parameters below.
    wiener_alpha : float or None
        Wiener parameter ``alpha`` (``> 0``).
    butterworth_order : float or None
        Butterworth order ``p`` (``> 0``).
    cutoff : tuple of float or None
        Cut-off frequency per axis in cycles per pixel (``inf``: no cut-off on that axis).
    beta : float or None
        Gain of the Butterworth filter at the cut-off, in ``(0, 1)``.
    """

    kind: str = "classic"
    wiener_alpha: float | None = None
    butterworth_order: float | None = None
    cutoff: tuple[float, ...] | None = None
    beta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly description for provenance (``inf`` cut-offs become ``None``)."""
        out: dict[str, Any] = {"back_projector": self.kind}
        if self.kind == "wiener-butterworth":
            out.update(
                wiener_alpha=self.wiener_alpha,
                butterworth_order=self.butterworth_order,
                cutoff=[None if not np.isfinite(c) else round(c, 6) for c in self.cutoff or ()],
                butterworth_beta=self.beta,
            )
        return out


def _rfft_frequencies(shape: Sequence[int]) -> list[np.ndarray]:
    """Frequencies (cycles per sample) of each axis of an ``rfftn`` of ``shape``, broadcastable."""
    ndim = len(shape)
    freqs = []
    for axis, n in enumerate(shape):
        f = np.fft.rfftfreq(n) if axis == ndim - 1 else np.fft.fftfreq(n)
        view = [1] * ndim
        view[axis] = f.size
        freqs.append(f.reshape(view))
    return freqs


def _rolled_otf(psf: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``rfftn`` (float64) of ``psf`` zero-padded to ``shape`` with its centre at the origin."""
    work = np.zeros(tuple(shape), dtype=np.float64)
    work[tuple(slice(0, k) for k in psf.shape)] = psf
    work = np.roll(work, [-((k - 1) // 2) for k in psf.shape], axis=tuple(range(psf.ndim)))
    return np.fft.rfftn(work)


def otf_cutoff(psf: Any, fraction: float = WB_SUPPORT_FRACTION) -> tuple[float, ...]:
    """Extent of the OTF's support per axis, in cycles per pixel.

    Along each axis, the largest ``|k_i|`` over all frequencies where ``|OTF(k)|`` is at least
    ``fraction`` of its peak, measured on a finely sampled transform (the PSF zero-padded to at
    least 4 times its size and 64 samples per axis). ``inf`` where the OTF stays above the
    fraction up to the Nyquist frequency (no cut-off needed on that axis).

    Parameters
    ----------
    psf : array
        Non-negative PSF (normalised here).
    fraction : float, optional
        Relative level that defines the support's edge; default ``WB_SUPPORT_FRACTION``.

    Returns
    -------
    tuple of float
        One cut-off per axis.
    """
    fraction = _check_positive("fraction", fraction)
    h = _prepare_psf(psf, np.ndim(psf), normalize=True).astype(np.float64)
    fine = tuple(max(4 * k, 64) for k in h.shape)
    magnitude = np.abs(_rolled_otf(h, fine))
    inside = magnitude >= fraction * magnitude.max()
    cutoffs = []
    for f in _rfft_frequencies(fine):
        extent = float(np.max(np.abs(np.broadcast_to(f, inside.shape)[inside])))
        nyquist = float(np.max(np.abs(f)))
        cutoffs.append(float("inf") if extent >= nyquist - 1e-9 else extent)
    return tuple(cutoffs)


def wiener_butterworth_defaults(psf: Any) -> dict[str, Any]:
    """Default Wiener-Butterworth parameters for ``psf`` (see the module notes).

    Returns
    -------
    dict
        ``wiener_alpha`` (0.05, the OTF's level at the cut-off), ``butterworth_order`` (10),
        ``cutoff`` (per axis, from :func:`otf_cutoff` at 5 % of the OTF's peak) and ``beta``
        (0.01).
    """
    return {
        "wiener_alpha": WB_DEFAULT_ALPHA,
        "butterworth_order": float(WB_DEFAULT_ORDER),
        "cutoff": otf_cutoff(psf, WB_SUPPORT_FRACTION),
        "beta": WB_BETA,
    }


def _check_cutoff(cutoff: Any, ndim: int) -> tuple[float, ...]:
    values = np.atleast_1d(np.asarray(cutoff, dtype=object))
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.ndim != 1 or values.size != ndim:
        raise ParameterError(
            f"cutoff must be one number or {ndim} numbers (cycles per pixel per axis), "
            f"got {cutoff!r}"
        )
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ParameterError(f"cutoff must be numbers, got {cutoff!r}") from None
        if not v > 0:  # inf allowed: no cut-off on that axis
            raise ParameterError(f"cutoff must be > 0 cycles per pixel, got {cutoff!r}")
        out.append(v)
    return tuple(out)


def _wiener_butterworth_options_given(
    wiener_alpha: Any, butterworth_order: Any, cutoff: Any
) -> list[str]:
    """Names of the Wiener-Butterworth parameters that were given (not None)."""
    given = {"wiener_alpha": wiener_alpha, "butterworth_order": butterworth_order, "cutoff": cutoff}
    return [name for name, value in given.items() if value is not None]


def resolve_back_projector(
    psf: Any,
    back_projector: str = "classic",
    *,
    wiener_alpha: float | None = None,
    butterworth_order: float | None = None,
    cutoff: float | Sequence[float] | None = None,
) -> BackProjector:
    """Validate a back projector's name and parameters, filling defaults from ``psf``.

    Raises
    ------
    ParameterError
        For an unknown name, a non-positive parameter, or Wiener-Butterworth parameters given
        with the classic back projector.
    """
    if back_projector not in BACK_PROJECTORS:
        raise ParameterError(
            f"unknown back projector {back_projector!r}; choose 'classic' or 'wiener-butterworth'"
        )
    if back_projector == "classic":
        given = _wiener_butterworth_options_given(wiener_alpha, butterworth_order, cutoff)
        if given:
            raise ParameterError(
                f"{', '.join(given)} only apply to the Wiener-Butterworth back projector; "
                "pass back_projector='wiener-butterworth' or drop them"
            )
        return BackProjector("classic")
    ndim = np.ndim(psf)
    alpha = (
        WB_DEFAULT_ALPHA if wiener_alpha is None else _check_positive("wiener_alpha", wiener_alpha)
    )
    order = (
        float(WB_DEFAULT_ORDER)
        if butterworth_order is None
        else _check_positive("butterworth_order", butterworth_order)
    )
    cut = otf_cutoff(psf) if cutoff is None else _check_cutoff(cutoff, ndim)
    return BackProjector("wiener-butterworth", alpha, order, cut, WB_BETA)


def wiener_butterworth_kernel(psf: Any, spec: BackProjector | None = None) -> np.ndarray:
    """The Wiener-Butterworth back projector as a kernel of the PSF's shape (float32, sum 1).

    The kernel takes the place of the flipped PSF ``h^T``: Lucy-Richardson back-projects with
    ``scipy.signal.fftconvolve(ratio, kernel)`` where the classic algorithm uses the flipped
    PSF. Its transform on the PSF's grid is the formula in the module notes.

    Parameters
    ----------
    psf : array
        Non-negative PSF (normalised here).
    spec : BackProjector, optional
        Parameters; default :func:`resolve_back_projector` with the PSF's defaults.

    Returns
    -------
    numpy.ndarray
        ``float32`` kernel of the PSF's shape.
    """
    h = _prepare_psf(psf, np.ndim(psf), normalize=True).astype(np.float64)
    if spec is None:
        spec = resolve_back_projector(h, "wiener-butterworth")
    if spec.kind != "wiener-butterworth":
        raise ParameterError(f"expected a Wiener-Butterworth back projector, got {spec.kind!r}")
    otf = _rolled_otf(h, h.shape)
    alpha = float(spec.wiener_alpha)
    wiener = np.conj(otf) / (np.abs(otf) ** 2 + alpha)
    radius2 = sum(
        (f / c) ** 2 for f, c in zip(_rfft_frequencies(h.shape), spec.cutoff) if np.isfinite(c)
    )
    eps2 = 1.0 / float(spec.beta) ** 2 - 1.0
    butterworth = 1.0 / np.sqrt(1.0 + eps2 * np.asarray(radius2) ** float(spec.butterworth_order))
    transform = wiener * butterworth
    kernel = np.fft.irfftn(transform, s=h.shape)
    # origin (offset 0) back to sample K - 1 - (K - 1) // 2, where the flipped PSF has its centre
    kernel = np.roll(kernel, [k - 1 - (k - 1) // 2 for k in h.shape], axis=tuple(range(h.ndim)))
    return (kernel / kernel.sum()).astype(np.float32)


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
class LinearConvolver:
    """Linear (zero-padded, never wrapping) FFT convolution of one image shape with one PSF.

    The PSF's real FFT (the OTF) and its conjugate are computed once here, in ``complex64``,
    on a working shape of at least ``image + psf - 1`` per axis rounded up to a fast FFT size.

    Parameters
    ----------
    psf : array
        Point spread function, same number of dimensions as the images; used as given (it is not
        normalised here). Centred like ``scipy.signal.fftconvolve(mode='same')``: sample
        ``(K - 1) // 2`` on each axis is the origin.
    image_shape : tuple of int
        Shape of the images this plan convolves.
    xp : module, optional
        Array module (``numpy`` or ``cupy``) of the images; default ``numpy``.
    """

    def __init__(self, psf: Any, image_shape: tuple[int, ...], *, xp: ModuleType = np) -> None:
        image_shape = tuple(int(n) for n in image_shape)
        psf = _prepare_psf(psf, len(image_shape), normalize=False)
        self.xp = xp
        self.fft = get_fft_module(xp)
        self._kw = _fft_kwargs(xp)
        self.image_shape = image_shape
        self.psf_shape = psf.shape
        self.work_shape = tuple(
            int(self.fft.next_fast_len(n + k - 1, real=True))
            for n, k in zip(image_shape, psf.shape, strict=True)
        )
        self.image_slices = tuple(slice(0, n) for n in image_shape)
        # PSF on the working domain with its centre sample c = (K - 1) // 2 rolled to the origin.
        h_work = np.zeros(self.work_shape, dtype=np.float32)
        h_work[tuple(slice(0, k) for k in psf.shape)] = psf
        h_work = np.roll(h_work, [-((k - 1) // 2) for k in psf.shape], axis=tuple(range(psf.ndim)))
        self.otf = self.fft.rfftn(xp.asarray(h_work), **self._kw).astype(xp.complex64, copy=False)
        self.otf_conj = xp.conj(self.otf)

    @property
    def nbytes(self) -> int:
        """Device or host memory held by the plan, in bytes."""
        return int(self.otf.nbytes + self.otf_conj.nbytes)

    def _check_shape(self, image: Any) -> None:
        if tuple(image.shape) != self.image_shape:
            raise InputError(
                f"this plan was built for images of shape {self.image_shape}, "
                f"got {tuple(image.shape)}; build a plan for that shape"
            )

    def _apply(self, work: Any, otf: Any) -> Any:
        """Circular convolution of a working-shape array with ``otf`` (a new float32 array)."""
        spectrum = self.fft.rfftn(work, **self._kw)
        self.xp.multiply(spectrum, otf, out=spectrum)
        return self.fft.irfftn(spectrum, s=self.work_shape, **self._kw)

    def _embed(self, image: Any) -> Any:
        work = self.xp.zeros(self.work_shape, dtype=self.xp.float32)
        if not isinstance(image, float):
            image = _to_module(image, self.xp)
        work[self.image_slices] = image
        return work

    def convolve(self, image: Any) -> Any:
        """Return the ``'same'``-size linear convolution of ``image`` with the PSF (float32)."""
        self._check_shape(image)
        out = self._apply(self._embed(image), self.otf)
        return self.xp.ascontiguousarray(out[self.image_slices])

    def correlate(self, image: Any) -> Any:
        """Return the ``'same'``-size convolution of ``image`` with the flipped PSF (float32).

        This is the adjoint of :meth:`convolve` restricted to the image region.
        """
        self._check_shape(image)
        out = self._apply(self._embed(image), self.otf_conj)
        return self.xp.ascontiguousarray(out[self.image_slices])


class RLPlan(LinearConvolver):
    """Everything Lucy-Richardson needs for one (PSF, image shape): OTF, back projector, weights.

    Parameters
    ----------
    psf : array
        Non-negative point spread function with one axis per image axis; normalised to unit sum.
    image_shape : tuple of int
        Shape of the images (chunks) this plan deconvolves.
    edge_threshold : float, optional
        Edge weights ``w = b * 1_image`` (``b``: the back projector, ``h^T`` for classic LR)
        below ``edge_threshold * max(w)`` are treated as zero: the estimate is set to zero
        there. Default ``1e-3``.
    xp : module, optional
        Array module (``numpy`` or ``cupy``); default ``numpy``.
    back_projector : BackProjector, optional
        Resolved back projector (:func:`resolve_back_projector`); default classic.

    Notes
    -----
    The plan stores the reciprocal of the thresholded edge weights on the working domain, so the
    per-iteration cost is four real FFTs plus a few elementwise passes, whichever the back
    projector.
    """

    def __init__(
        self,
        psf: Any,
        image_shape: tuple[int, ...],
        *,
        edge_threshold: float = 1e-3,
        xp: ModuleType = np,
        back_projector: BackProjector | None = None,
    ) -> None:
        psf = _prepare_psf(psf, len(tuple(image_shape)), normalize=True)
        super().__init__(psf, image_shape, xp=xp)
        self.edge_threshold = _check_edge_threshold(edge_threshold)
        self.back_projector = back_projector or BackProjector("classic")
        if self.back_projector.kind == "classic":
            self.bp_otf = self.otf_conj
        else:
            kernel = wiener_butterworth_kernel(psf, self.back_projector)
            work = np.zeros(self.work_shape, dtype=np.float32)
            work[tuple(slice(0, k) for k in kernel.shape)] = kernel
            # the kernel's origin (sample K - 1 - c, like the flipped PSF) goes to index 0
            work = np.roll(
                work, [-(k - 1 - (k - 1) // 2) for k in kernel.shape], axis=tuple(range(psf.ndim))
            )
            self.bp_otf = self.fft.rfftn(xp.asarray(work), **self._kw).astype(
                xp.complex64, copy=False
            )
        self.inv_weights = self._inverse_weights(1.0)

    def _inverse_weights(self, data_mask: Any) -> Any:
        """``1 / (b * mask)`` where above the threshold, 0 elsewhere (working domain)."""
        xp = self.xp
        weights = self._apply(self._embed(data_mask), self.bp_otf)
        keep = weights > self.edge_threshold * float(weights.max())
        # 1 / w where kept, 0 elsewhere; the divisor is set to 1 where not kept to avoid warnings
        inv = xp.where(keep, weights, xp.float32(1))
        xp.reciprocal(inv, out=inv)
        xp.multiply(inv, keep, out=inv)
        return inv.astype(xp.float32, copy=False)

    @property
    def nbytes(self) -> int:
        """Device or host memory held by the plan, in bytes."""
        extra = 0 if self.bp_otf is self.otf_conj else int(self.bp_otf.nbytes)
        return super().nbytes + int(self.inv_weights.nbytes) + extra

    def deconvolve(
        self,
        image: Any,
        num_iter: int = 10,
        *,
        eps: float = 1e-6,
        clip: bool = False,
        workers: int = -1,
        callback: Callable[[int, Any], None] | None = None,
        acceleration: str = "none",
    ) -> Any:
        """Run ``num_iter`` Lucy-Richardson iterations on ``image`` (see :func:`richardson_lucy`).

        ``image`` must have the plan's shape; it is moved to the plan's array module if needed.
        ``callback(n, estimate)``, if given, is called after iteration ``n`` (1-based) with a
        read-only view of the current estimate on the image region (copy it to keep it).
        ``acceleration``: ``"none"`` or ``"nesterov"`` (each iteration starts from the
        iterate extrapolated along its last step with the fixed weight ``(n - 2) / (n + 1)``,
        clipped at zero: the same restoration in 3-6x fewer iterations on the 3D benchmark,
        and more noise past the best count; the weights depend on ``n`` only, so a chunk's
        result depends on the data within the halo as without it).
        """
        xp = self.xp
        self._check_shape(image)
        num_iter = _check_num_iter(num_iter)
        eps = _check_positive("eps", eps)
        threads = _check_workers(workers)
        y = _non_negative_data(image, xp)
        after = None if callback is None else (lambda n, x: callback(n, x[self.image_slices]))
        x = self._iterate(
            y,
            num_iter,
            eps,
            threads,
            self.inv_weights,
            on_iteration=after,
            acceleration=acceleration,
        )
        out = xp.ascontiguousarray(x[self.image_slices])
        if clip:
            xp.clip(out, -1, 1, out=out)
        return out

    def holdout_errors(
        self,
        image: Any,
        holdout: Any,
        num_iter: int,
        *,
        eps: float = 1e-6,
        workers: int = -1,
        per_pixel: bool = False,
        acceleration: str = "none",
    ) -> np.ndarray:
        """Prediction errors of held-out pixels after 0, 1, ..., ``num_iter`` iterations.

        The pixels where ``holdout`` is True get zero weight in the data term (their ratio is
        set to zero and the edge weights become ``b * (1 - holdout)``), so the estimate never
        sees them; after each iteration they are predicted through the forward model
        (``h * x``) and compared with the image. Because the noise of those pixels is
        independent of everything the estimate saw, the error measures how well the estimate
        explains new data (a J-invariant criterion, as in Noise2Self and SSI). With the
        sharpening Wiener-Butterworth kernel the masked run can diverge after a few
        iterations where the weights ``b * (1 - holdout)`` come close to zero (so can the
        unmasked run with a small alpha); the criterion then reports large errors and those
        counts are not chosen. (Filling the held-out pixels with the prediction instead, the
        EM treatment of missing data, was measured too: it chose worse alphas on the
        protocol images.)

        Parameters
        ----------
        image : array
            Image of the plan's shape.
        holdout : array of bool
            Pixels to hold out, the image's shape.
        num_iter : int
            Largest iteration count scored.
        per_pixel : bool
            Return every held-out pixel's squared error instead of the sums (for paired
            comparisons between counts).
        acceleration : {"none", "nesterov"}
            As in :meth:`deconvolve`; the errors are those of the iterates.

        Returns
        -------
        numpy.ndarray
            ``float64`` array of shape ``(num_iter + 1, 2)``: row ``n`` (after ``n``
            iterations) holds the sum over the held-out pixels of the squared prediction
            errors ``e^2`` and the sum of ``e^4`` (for the criterion's standard error).
            With ``per_pixel``: ``float32`` array of shape ``(num_iter + 1, held-out pixels)``
            of the squared errors ``e^2``.
        """
        xp = self.xp
        self._check_shape(image)
        num_iter = _check_num_iter(num_iter)
        eps = _check_positive("eps", eps)
        threads = _check_workers(workers)
        y = xp.ascontiguousarray(_to_module(image, xp), dtype=xp.float32)  # scored as measured
        held = xp.asarray(_to_module(holdout, xp), dtype=bool)
        if tuple(held.shape) != self.image_shape:
            raise InputError(
                f"the hold-out mask has shape {tuple(held.shape)} but the image has "
                f"{self.image_shape}; pass a mask of the image's shape"
            )
        keep = (~held).astype(xp.float32)
        errors: list[Any] = []

        def score(blurred_img: Any) -> None:
            squared = (blurred_img - y)[held].astype(xp.float64) ** 2
            if per_pixel:
                errors.append(_to_module(squared.astype(xp.float32), np))
            else:
                errors.append((float(squared.sum()), float((squared**2).sum())))

        x = self._iterate(
            _non_negative_data(y, xp),  # the estimate sees negative values as 0, as in deconvolve
            num_iter,
            eps,
            threads,
            self._inverse_weights(keep),
            data_mask=keep,
            on_blurred=score,
            acceleration=acceleration,
        )
        score(self.convolve_work(x)[self.image_slices])
        if per_pixel:
            return np.stack(errors)
        return np.asarray(errors, dtype=np.float64)

    def convolve_work(self, work: Any) -> Any:
        """Circular convolution of a working-domain array with the PSF (float32)."""
        return self._apply(work, self.otf)

    def _iterate(
        self,
        y: Any,
        num_iter: int,
        eps: float,
        threads: int,
        inv_weights: Any,
        *,
        data_mask: Any = None,
        on_blurred: Callable[[Any], None] | None = None,
        on_iteration: Callable[[int, Any], None] | None = None,
        acceleration: str = "none",
    ) -> Any:
        """The iterations; returns the estimate on the working domain.

        ``data_mask`` (float32, image shape) multiplies the ratio; ``on_blurred`` receives the
        re-blurred estimate on the image region at the start of each iteration;
        ``on_iteration(n, x)`` the working-domain estimate after iteration ``n``.
        ``acceleration="nesterov"``: iteration ``n`` starts from the extrapolated point
        ``max(x + (n - 2) / (n + 1) * (x - x_previous), 0)`` (see :func:`richardson_lucy`).
        """
        xp, fft = self.xp, self.fft
        kw = {"workers": threads} if xp is np else {}
        img = self.image_slices
        shape = self.work_shape
        if data_mask is None:
            mean = float(y.mean(dtype=xp.float64))
        else:
            mean = float((y * data_mask).sum(dtype=xp.float64) / max(float(data_mask.sum()), 1.0))
        x = xp.full(shape, mean, dtype=xp.float32)
        ratio = xp.zeros(shape, dtype=xp.float32)  # zero outside the image region, always
        ratio_img = ratio[img]
        eps32 = xp.float32(eps)
        x_flat = x.reshape(-1)
        inv_w_flat = inv_weights.reshape(-1)
        otf_flat = self.otf.reshape(-1)
        bp_flat = self.bp_otf.reshape(-1)
        n_planes = y.shape[0]
        update_step = _update if self.back_projector.kind == "classic" else _update_clamped
        momentum = _check_acceleration(acceleration) == "nesterov"
        previous = xp.empty_like(x) if momentum else None  # the iterate before x
        current = xp.empty_like(x) if momentum else None

        with _BlockRunner(xp, threads) as run:
            for iteration in range(1, num_iter + 1):
                weight = (iteration - 2) / (iteration + 1) if momentum else 0.0
                if momentum:
                    xp.copyto(current, x)
                if weight > 0:  # x becomes the extrapolated point (in place: x_flat views it)
                    if on_blurred is not None:  # the score is that of the iterate itself
                        on_blurred(self._apply(x, self.otf)[img])
                    xp.subtract(x, previous, out=previous)
                    xp.multiply(previous, xp.float32(weight), out=previous)
                    xp.add(x, previous, out=x)
                    xp.maximum(x, 0, out=x)
                if momentum:
                    previous, current = current, previous
                # h * x on the working domain
                spectrum = xp.ascontiguousarray(fft.rfftn(x, **kw)).reshape(-1)
                run(_mul_inplace, spectrum.size, spectrum, otf_flat)
                blurred = fft.irfftn(spectrum.reshape(self.otf.shape), s=shape, **kw)
                del spectrum
                if on_blurred is not None and weight <= 0:
                    on_blurred(blurred[img])
                # ratio y / max(h * x, eps) on the image region (zero elsewhere, by construction)
                run(_ratio, n_planes, y, blurred[img], ratio_img, eps32)
                del blurred
                if data_mask is not None:
                    xp.multiply(ratio_img, data_mask, out=ratio_img)
                # back-projection b * ratio, edge weights, multiplicative update
                spectrum = xp.ascontiguousarray(fft.rfftn(ratio, **kw)).reshape(-1)
                run(_mul_inplace, spectrum.size, spectrum, bp_flat)
                update = fft.irfftn(spectrum.reshape(self.otf.shape), s=shape, **kw)
                del spectrum
                run(
                    update_step,
                    x_flat.size,
                    x_flat,
                    xp.ascontiguousarray(update).reshape(-1),
                    inv_w_flat,
                )
                del update
                if on_iteration is not None:
                    on_iteration(iteration, x)
        return x


def get_plan(
    psf: Any,
    image_shape: tuple[int, ...],
    *,
    edge_threshold: float = 1e-3,
    xp: ModuleType = np,
    kind: str = "rl",
    back_projector: BackProjector | None = None,
    digest: str | None = None,
) -> LinearConvolver:
    """Return a cached :class:`RLPlan` (``kind='rl'``) or :class:`LinearConvolver` (``'conv'``).

    Plans are kept in a small least-recently-used cache keyed by the PSF's bytes (hashed), its
    shape, the image shape, the dtype, the array module, the edge threshold and the back
    projector, so the PSF's transforms are computed once per chunk shape. ``digest`` is the
    hash of a :class:`PreparedPSF` (its PSF is then used unchecked).
    """
    image_shape = tuple(int(n) for n in image_shape)
    if digest is None:  # a PreparedPSF comes checked and hashed
        host_psf = _prepare_psf(psf, len(image_shape), normalize=False)
        digest = hashlib.blake2b(host_psf.tobytes(), digest_size=16).hexdigest()
    else:
        host_psf = psf
    key = (
        kind,
        digest,
        host_psf.shape,
        image_shape,
        "float32",
        xp.__name__,
        float(edge_threshold) if kind == "rl" else None,
        (back_projector or BackProjector("classic")) if kind == "rl" else None,
    )
    with _plan_lock:
        plan = _plan_cache.get(key)
        if plan is not None:
            _plan_cache.move_to_end(key)
            return plan
    if kind == "rl":
        plan = RLPlan(
            host_psf,
            image_shape,
            edge_threshold=edge_threshold,
            xp=xp,
            back_projector=back_projector,
        )
    elif kind == "conv":
        plan = LinearConvolver(host_psf, image_shape, xp=xp)
    else:
        raise ParameterError(f"plan kind must be 'rl' or 'conv', got {kind!r}")
    with _plan_lock:
        _plan_cache[key] = plan
        _plan_cache.move_to_end(key)
        while len(_plan_cache) > _PLAN_CACHE_SIZE:
            _plan_cache.popitem(last=False)
    return plan


def clear_plan_cache() -> None:
    """Drop every cached plan (frees the OTFs' host or device memory)."""
    with _plan_lock:
        _plan_cache.clear()


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PreparedPSF:
    """A PSF validated, normalised and paired with its resolved back projector, once.

    :func:`prepare_psf` makes it on the client; it crosses the task graph as one key and every
    chunk's :func:`richardson_lucy` uses it as it is: no validation, normalisation, back
    projector resolution or hashing per chunk.
    """

    psf: np.ndarray
    back_projector: BackProjector
    digest: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.psf.shape)

    @property
    def ndim(self) -> int:
        return self.psf.ndim


def prepare_psf(psf: Any, ndim: int, **back_projector_options: Any) -> PreparedPSF:
    """Validate and normalise ``psf`` and resolve the back projector (see
    :func:`resolve_back_projector`) once, for every chunk of a run."""
    if isinstance(psf, PreparedPSF):
        return psf
    host = np.ascontiguousarray(_prepare_psf(psf, ndim, normalize=True), dtype=np.float32)
    spec = resolve_back_projector(host, **back_projector_options)
    digest = hashlib.blake2b(host.tobytes(), digest_size=16).hexdigest()
    return PreparedPSF(psf=host, back_projector=spec, digest=digest)


def lr_default_depth(
    psf_shape: Sequence[int],
    num_iter: int,
    back_projector: str = "classic",
    acceleration: str = "none",
) -> tuple[int, ...]:
    """Halo for Lucy-Richardson from the PSF support and the iteration count.

    Each iteration spreads information by up to the PSF's full extent, but the influence of a
    cut at the chunk's edge decays quickly with distance. Measured on the 17^3 widefield
    protocol PSF (laterally), the error of a cut falls below 1e-4 of the peak at about the full
    PSF extent for 10-20 iterations, 2.4 radii for 50 and 2.75 radii for 100. The rule
    ``radius * (2 + n / 100) + 1`` covers that; ``tests/test_blockwise.py`` checks chunked
    against whole-volume results. Past 100 iterations it keeps growing by one radius per 100
    (it used to stop at 3 radii): SSI's 3D Lucy-Richardson prior at ~190 iterations left
    differences of 1.3e-4 of the range at chunk seams with the capped rule, about 3e-5 with
    this one (``tests/test_ssi_scheduler.py``). Along a widefield PSF's optical axis the influence
    decays far more slowly (the missing cone), which is why the planner keeps z whole
    (DESIGN.md rule 3).

    The Wiener-Butterworth back projector amplifies what it spreads (its transform inverts the
    OTF up to the cut-off), so a cut's influence hardly decays within the ``n + 1`` radii an
    ``n``-iteration run reaches: measured on the 7x9x9 test PSF, a halo of ``(n + 1)`` radii
    keeps the error of a cut below 1e-4 for n = 2, 3 and 5 (2.5 radii left 1e-3 at n = 3).
    Its rule is ``radius * max(2 + n / 100, n + 1) + 1``; it only needs few
    iterations, so the halo stays small.

    With ``acceleration="nesterov"`` the momentum carries a cut's influence further: the
    rule is that of :func:`classic_equivalent` classic iterations (``6 n``: the classic count
    whose measured reach, :func:`ssi_dask.blockwise.lr_measured_depth`, is at least the
    accelerated one's for n = 5-50 on the 3D benchmark's widefield PSF and its 2D section;
    and, measured directly as the error a cut leaves in the deconvolved volume,
    ``benchmarks/lr_halo_seams.py``, n accelerated iterations leave at most the error of
    about 5 n classic ones for n = 20-100 on two of the 3D benchmark's kinds).

    This rule looks only at the PSF's extent; with the PSF at hand :func:`plan_blocks` widens it
    per axis to :func:`lr_measured_depth`, which is what keeps any accepted layout within 1e-3.
    """
    if num_iter < 0:
        raise ParameterError(f"the number of iterations must be >= 0, got {num_iter}")
    num_iter = classic_equivalent(num_iter, acceleration)
    factor = 2.0 + num_iter / 100.0
    if back_projector == "wiener-butterworth":
        factor = max(factor, num_iter + 1.0)
    return tuple(int(math.ceil(factor * (s // 2))) + 1 for s in psf_shape)


def classic_equivalent(num_iter: int, acceleration: str = "none") -> int:
    """Classic iterations whose halo covers ``num_iter`` iterations with ``acceleration``.

    ``num_iter`` itself without acceleration; with ``"nesterov"``, ``6 n`` (see
    :func:`lr_default_depth`).
    """
    if _check_acceleration(acceleration) == "none":
        return int(num_iter)
    return 6 * int(num_iter)


def richardson_lucy(
    image: Any,
    psf: Any,
    num_iter: int = 10,
    *,
    eps: float = 1e-6,
    edge_threshold: float = 1e-3,
    clip: bool = False,
    workers: int = -1,
    back_projector: str = "classic",
    wiener_alpha: float | None = None,
    butterworth_order: float | None = None,
    cutoff: float | Sequence[float] | None = None,
    acceleration: str = "none",
) -> Any:
    """Deconvolve a 2D or 3D image with the Lucy-Richardson algorithm.

    ``x_{k+1} = x_k * (b * (y / (h * x_k))) / (b * 1)``, started from the image mean, on a
    linear working domain (image + PSF - 1 per axis, rounded up to a fast FFT size) with
    Bertero-Boccacci edge weights, so the result has no wrap-around artefacts and is reliable up
    to the image border. The back projector ``b`` is the flipped PSF ``h^T`` (classic) or the
    Wiener-Butterworth kernel of Guo et al. 2020, which needs far fewer iterations (2-5 instead
    of tens; see the module notes for its defaults).

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        2D or 3D image with non-negative values (integers or floats). Negative values are
        treated as 0 (Poisson data cannot be negative; left in, they make the iterations
        diverge to NaN): subtract the background first where it matters. The computation runs
        in ``float32`` on the image's array module (NumPy: CPU with ``scipy.fft``; CuPy: GPU).
        A finite image gives a finite result.
    psf : array
        Point spread function with as many dimensions as ``image``; non-negative, normalised to
        unit sum here. Its sample ``(K - 1) // 2`` on each axis is the centre, as in
        ``scipy.signal.fftconvolve(mode='same')``.
    num_iter : int, optional
        Number of iterations (``>= 0``; ``0`` returns the mean-filled starting estimate).
    eps : float, optional
        Lower bound on the re-blurred estimate in the ratio ``y / max(h * x, eps)``; avoids
        divisions by zero. Default ``1e-6``.
    edge_threshold : float, optional
        Relative threshold on the edge weights ``w = h^T * 1_image``: where
        ``w <= edge_threshold * max(w)`` the estimate is set to zero. Default ``1e-3``.
    clip : bool, optional
        If True, clip the result to ``[-1, 1]`` like ``skimage.restoration.richardson_lucy``.
        Default False.
    workers : int, optional
        CPU threads for the FFTs (``scipy.fft`` ``workers``) and the elementwise steps; ``-1``
        (default) uses every available core. Pass ``1`` when many Dask threads run the kernel
        at once. Ignored on the GPU.
    back_projector : {"classic", "wiener-butterworth"}, optional
        Back projector; default ``"classic"`` (the flipped PSF).
    wiener_alpha : float, optional
        Wiener-Butterworth only: Wiener parameter ``alpha > 0`` (default 0.05, the OTF's
        relative level at the cut-off); larger values regularise more (noisy data).
    butterworth_order : float, optional
        Wiener-Butterworth only: order of the Butterworth low-pass (default 10).
    cutoff : float or sequence of float, optional
        Wiener-Butterworth only: cut-off frequency in cycles per pixel, one for every axis or
        one per axis (``inf``: none); default the extent of the OTF's support at 5 % of its
        peak (:func:`otf_cutoff`).
    acceleration : {"none", "nesterov"}, optional
        Classic back projector only. ``"nesterov"``: iteration ``n`` starts from the
        estimate extrapolated along its last step, ``max(x + (n - 2) / (n + 1) *
        (x - x_previous), 0)`` (a fixed momentum, as in Nesterov's and FISTA's accelerated
        gradient methods). On the 3D benchmark it reaches the classic iterations' best PSNR
        in 3-6x fewer iterations and goes beyond it, and noise grows faster past its best
        count (``benchmarks/RESULTS.md``); the weights depend on ``n`` only, so a chunk's
        result depends on the data within the same halo as without it. Default ``"none"``.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        The ``float32`` estimate, same shape and array module as ``image``.

    Raises
    ------
    InputError
        If ``image`` is not a non-empty 2D/3D real array.
    PSFError
        If ``psf`` does not have ``image.ndim`` dimensions, is empty, negative, all zero or not
        finite.
    ParameterError
        If ``num_iter`` is not an integer ``>= 0``, ``eps`` is not ``> 0``,
        ``edge_threshold`` is not in ``(0, 1)``, ``workers`` is not ``-1`` or ``>= 1``, the
        back projector is unknown or one of its parameters is not ``> 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from ssi_dask.lr import richardson_lucy
    >>> psf = np.ones((5, 5)) / 25
    >>> out = richardson_lucy(np.random.default_rng(0).random((64, 64)), psf, num_iter=5)
    >>> out.dtype, out.shape
    (dtype('float32'), (64, 64))
    """
    _check_image(image)
    xp = get_array_module(image)
    num_iter = _check_num_iter(num_iter)
    eps = _check_positive("eps", eps)
    edge_threshold = _check_edge_threshold(edge_threshold)
    if isinstance(psf, PreparedPSF):  # prepared once for the whole run: used as it is
        given = _wiener_butterworth_options_given(wiener_alpha, butterworth_order, cutoff)
        if given or back_projector != "classic":
            raise ParameterError(
                "a PreparedPSF carries its back projector; pass back projector options to "
                "prepare_psf, not to richardson_lucy"
            )
        if psf.ndim != image.ndim:
            raise PSFError(
                f"the PSF has {psf.ndim} dimensions but the image has {image.ndim}; "
                "pass a PSF with one axis per image axis"
            )
        host_psf, spec, digest = psf.psf, psf.back_projector, psf.digest
    else:
        host_psf = _prepare_psf(psf, image.ndim, normalize=True)
        spec = resolve_back_projector(
            host_psf,
            back_projector,
            wiener_alpha=wiener_alpha,
            butterworth_order=butterworth_order,
            cutoff=cutoff,
        )
        digest = None
    plan = get_plan(
        host_psf,
        tuple(image.shape),
        edge_threshold=edge_threshold,
        xp=xp,
        back_projector=spec,
        digest=digest,
    )
    if _check_acceleration(acceleration) != "none" and spec.kind != "classic":
        raise ParameterError(
            f"acceleration={acceleration!r} applies to the classic back projector only; "
            "pass back_projector='classic' or acceleration='none'"
        )
    return plan.deconvolve(
        image, num_iter, eps=eps, clip=clip, workers=workers, acceleration=acceleration
    )


def convolve_same(image: Any, psf: Any) -> Any:
    """Linear convolution with zero padding, cropped to the image size (``mode='same'``).

    Equals ``scipy.signal.fftconvolve(image, psf, mode='same')`` to ``float32`` precision, but
    runs on the image's array module (NumPy or CuPy) with a cached PSF transform.

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        2D or 3D real image.
    psf : array
        Kernel with as many dimensions as ``image``; used as given (not normalised).

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        ``float32`` array of the image's shape and array module.

    Raises
    ------
    InputError
        If ``image`` is not a non-empty 2D/3D real array.
    PSFError
        If ``psf`` does not match the image's dimensions or is empty or not finite.
    """
    _check_image(image)
    xp = get_array_module(image)
    plan = get_plan(psf, tuple(image.shape), xp=xp, kind="conv")
    return plan.convolve(xp.asarray(image, dtype=xp.float32))
