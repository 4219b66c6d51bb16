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
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from ssi_dask._backend import get_array_module, get_fft_module
from ssi_dask.errors import InputError, ParameterError, PSFError

__all__ = [
    "LinearConvolver",
    "RLPlan",
    "clear_plan_cache",
    "convolve_same",
    "get_plan",
    "richardson_lucy",
]

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
    }


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
            step(0, n, _BLOCK, *arrays)
            return
        bounds = [n * k // self.threads for k in range(self.threads + 1)]
        futures = [
            self.pool.submit(step, bounds[k], bounds[k + 1], _BLOCK, *arrays)
            for k in range(self.threads)
            if bounds[k + 1] > bounds[k]
        ]
        for future in futures:
            future.result()


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
    """Everything Lucy-Richardson needs for one (PSF, image shape): OTF, conjugate, edge weights.

    Parameters
    ----------
    psf : array
        Non-negative point spread function with one axis per image axis; normalised to unit sum.
    image_shape : tuple of int
        Shape of the images (chunks) this plan deconvolves.
    edge_threshold : float, optional
        Edge weights ``w = h^T * 1_image`` below ``edge_threshold * max(w)`` are treated as
        zero: the estimate is set to zero there. Default ``1e-3``.
    xp : module, optional
        Array module (``numpy`` or ``cupy``); default ``numpy``.

    Notes
    -----
    The plan stores the reciprocal of the thresholded edge weights on the working domain, so the
    per-iteration cost is four real FFTs plus a few elementwise passes.
    """

    def __init__(
        self,
        psf: Any,
        image_shape: tuple[int, ...],
        *,
        edge_threshold: float = 1e-3,
        xp: ModuleType = np,
    ) -> None:
        psf = _prepare_psf(psf, len(tuple(image_shape)), normalize=True)
        super().__init__(psf, image_shape, xp=xp)
        self.edge_threshold = _check_edge_threshold(edge_threshold)
        weights = self._apply(self._embed(1.0), self.otf_conj)
        keep = weights > self.edge_threshold * float(weights.max())
        # 1 / w where kept, 0 elsewhere; the divisor is set to 1 where not kept to avoid warnings
        inv = xp.where(keep, weights, xp.float32(1))
        xp.reciprocal(inv, out=inv)
        xp.multiply(inv, keep, out=inv)
        self.inv_weights = inv.astype(xp.float32, copy=False)

    @property
    def nbytes(self) -> int:
        """Device or host memory held by the plan, in bytes."""
        return super().nbytes + int(self.inv_weights.nbytes)

    def deconvolve(
        self,
        image: Any,
        num_iter: int = 10,
        *,
        eps: float = 1e-6,
        clip: bool = False,
        workers: int = -1,
    ) -> Any:
        """Run ``num_iter`` Lucy-Richardson iterations on ``image`` (see :func:`richardson_lucy`).

        ``image`` must have the plan's shape; it is moved to the plan's array module if needed.
        """
        xp, fft = self.xp, self.fft
        self._check_shape(image)
        num_iter = _check_num_iter(num_iter)
        eps = _check_positive("eps", eps)
        threads = _check_workers(workers)
        kw = {"workers": threads} if xp is np else {}
        y = xp.ascontiguousarray(_to_module(image, xp), dtype=xp.float32)
        img = self.image_slices
        shape = self.work_shape
        mean = float(y.mean(dtype=xp.float64))
        x = xp.full(shape, mean, dtype=xp.float32)
        ratio = xp.zeros(shape, dtype=xp.float32)  # zero outside the image region, always
        ratio_img = ratio[img]
        eps32 = xp.float32(eps)
        x_flat = x.reshape(-1)
        inv_w_flat = self.inv_weights.reshape(-1)
        otf_flat = self.otf.reshape(-1)
        otf_conj_flat = self.otf_conj.reshape(-1)
        n_planes = y.shape[0]

        with _BlockRunner(xp, threads) as run:
            for _ in range(num_iter):
                # h * x on the working domain
                spectrum = xp.ascontiguousarray(fft.rfftn(x, **kw)).reshape(-1)
                run(_mul_inplace, spectrum.size, spectrum, otf_flat)
                blurred = fft.irfftn(spectrum.reshape(self.otf.shape), s=shape, **kw)
                del spectrum
                # ratio y / max(h * x, eps) on the image region (zero elsewhere, by construction)
                run(_ratio, n_planes, y, blurred[img], ratio_img, eps32)
                del blurred
                # back-projection h^T * ratio, edge weights, multiplicative update
                spectrum = xp.ascontiguousarray(fft.rfftn(ratio, **kw)).reshape(-1)
                run(_mul_inplace, spectrum.size, spectrum, otf_conj_flat)
                update = fft.irfftn(spectrum.reshape(self.otf.shape), s=shape, **kw)
                del spectrum
                run(
                    _update,
                    x_flat.size,
                    x_flat,
                    xp.ascontiguousarray(update).reshape(-1),
                    inv_w_flat,
                )
                del update
        out = xp.ascontiguousarray(x[img])
        if clip:
            xp.clip(out, -1, 1, out=out)
        return out


def get_plan(
    psf: Any,
    image_shape: tuple[int, ...],
    *,
    edge_threshold: float = 1e-3,
    xp: ModuleType = np,
    kind: str = "rl",
) -> LinearConvolver:
    """Return a cached :class:`RLPlan` (``kind='rl'``) or :class:`LinearConvolver` (``'conv'``).

    Plans are kept in a small least-recently-used cache keyed by the PSF's bytes (hashed), its
    shape, the image shape, the dtype, the array module and the edge threshold, so the PSF's
    transform is computed once per chunk shape.
    """
    image_shape = tuple(int(n) for n in image_shape)
    host_psf = _prepare_psf(psf, len(image_shape), normalize=False)
    digest = hashlib.blake2b(host_psf.tobytes(), digest_size=16).hexdigest()
    key = (
        kind,
        digest,
        host_psf.shape,
        image_shape,
        "float32",
        xp.__name__,
        float(edge_threshold) if kind == "rl" else None,
    )
    with _plan_lock:
        plan = _plan_cache.get(key)
        if plan is not None:
            _plan_cache.move_to_end(key)
            return plan
    if kind == "rl":
        plan = RLPlan(host_psf, image_shape, edge_threshold=edge_threshold, xp=xp)
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
def richardson_lucy(
    image: Any,
    psf: Any,
    num_iter: int = 10,
    *,
    eps: float = 1e-6,
    edge_threshold: float = 1e-3,
    clip: bool = False,
    workers: int = -1,
) -> Any:
    """Deconvolve a 2D or 3D image with the Lucy-Richardson algorithm.

    ``x_{k+1} = x_k * (h^T * (y / (h * x_k))) / (h^T * 1)``, started from the image mean, on a
    linear working domain (image + PSF - 1 per axis, rounded up to a fast FFT size) with
    Bertero-Boccacci edge weights, so the result has no wrap-around artefacts and is reliable up
    to the image border.

    Parameters
    ----------
    image : numpy.ndarray or cupy.ndarray
        2D or 3D image with non-negative values (integers or floats). The computation runs in
        ``float32`` on the image's array module (NumPy: CPU with ``scipy.fft``; CuPy: GPU).
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
        ``edge_threshold`` is not in ``(0, 1)`` or ``workers`` is not ``-1`` or ``>= 1``.

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
    host_psf = _prepare_psf(psf, image.ndim, normalize=True)
    plan = get_plan(host_psf, tuple(image.shape), edge_threshold=edge_threshold, xp=xp)
    return plan.deconvolve(image, num_iter, eps=eps, clip=clip, workers=workers)


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
