"""Image-quality metrics of the benchmark protocol (METHOD.md, section 4, step 6).

All functions take NumPy arrays of any dimensionality (2D images or 3D volumes) and return
Python floats. They are pure NumPy/SciPy (SSIM wraps scikit-image) and run on the CPU; pass
``cupy`` arrays through ``cupy.asnumpy`` first.

Definitions
-----------
PSNR
    ``10 * log10(data_range**2 / MSE)``; ``inf`` for identical images.
SSIM
    Mean structural similarity (Wang et al. 2004) with a uniform ``win_size``-wide window
    (7 by default), as computed by :func:`skimage.metrics.structural_similarity`.
MI
    Mutual information divided by the joint entropy, ``I(A; B) / H(A, B)``, estimated from a
    ``bins x bins`` joint histogram in which each image is binned over its own min..max range.
    The value lies in ``[0, 1]``; it is 1 when each image determines the other (e.g. identical
    images) and close to 0 for independent images.
SMI
    Spectral mutual information: the same MI computed on the unnormalised DCT-II
    (``scipy.fft.dctn(type=2, norm=None)``, DC term included, all axes) of each image after
    the image has been divided by its L2 norm.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "psnr",
    "ssim",
    "mutual_information",
    "spectral_mutual_information",
    "all_metrics",
]


def _pair(
    reference: ArrayLike, image: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Convert two inputs to float64 arrays of the same shape and check they are finite."""
    ref = np.asarray(reference, dtype=np.float64)
    img = np.asarray(image, dtype=np.float64)
    if ref.shape != img.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs image {img.shape}")
    if ref.size == 0:
        raise ValueError("empty images have no quality metric")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(img))):
        raise ValueError("images must contain only finite values (no NaN or inf)")
    return ref, img


def psnr(reference: ArrayLike, image: ArrayLike, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in decibels.

    Parameters
    ----------
    reference : array_like
        Ground-truth image.
    image : array_like
        Image to evaluate, same shape as ``reference``.
    data_range : float, optional
        Peak-to-peak range of the signal (1.0 for images scaled to [0, 1]).

    Returns
    -------
    float
        ``10 * log10(data_range**2 / mean((reference - image)**2))``; ``inf`` when the images
        are identical.

    Raises
    ------
    ValueError
        If the shapes differ, the inputs are empty or not finite, or ``data_range <= 0``.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    ref, img = _pair(reference, image)
    mse = float(np.mean((ref - img) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(float(data_range) ** 2 / mse)


def ssim(
    reference: ArrayLike,
    image: ArrayLike,
    data_range: float = 1.0,
    win_size: int = 7,
) -> float:
    """Mean structural similarity index (SSIM) of a 2D image or 3D volume.

    Thin wrapper around :func:`skimage.metrics.structural_similarity` with a uniform
    ``win_size``-wide window, constants ``K1 = 0.01``, ``K2 = 0.03`` and sample covariances
    (scikit-image defaults), no channel axis.

    Parameters
    ----------
    reference : array_like
        Ground-truth image (2D or 3D).
    image : array_like
        Image to evaluate, same shape as ``reference``.
    data_range : float, optional
        Data range ``L`` in the stabilising constants ``(K * L)**2``. The benchmark uses 1.0
        for images in [0, 1]; results from the reference era used 2.0.
    win_size : int, optional
        Odd side length of the sliding window (7 by default). Every axis of the image must be at
        least this long.

    Returns
    -------
    float
        Mean SSIM over the image (at most 1; 1 for identical images).

    Raises
    ------
    ValueError
        If the shapes differ, an axis is shorter than ``win_size``, ``win_size`` is even or
        ``data_range <= 0``.
    """
    from skimage.metrics import structural_similarity  # noqa: PLC0415  (heavy import)

    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}")
    ref, img = _pair(reference, image)
    if min(ref.shape) < win_size:
        raise ValueError(f"every axis must be at least win_size={win_size} long, got {ref.shape}")
    return float(structural_similarity(ref, img, win_size=win_size, data_range=float(data_range)))


def _bin_indices(values: NDArray[np.float64], bins: int) -> NDArray[np.intp] | None:
    """Bin ``values`` into ``bins`` equal bins over their own min..max range.

    The last bin is closed on the right, as in :func:`numpy.histogram`. Returns ``None`` for a
    constant array.
    """
    lo = float(values.min())
    hi = float(values.max())
    if hi <= lo:
        return None
    idx = np.floor((values - lo) * (bins / (hi - lo))).astype(np.intp)
    np.clip(idx, 0, bins - 1, out=idx)
    return idx


def _normalised_mi(a: NDArray[np.float64], b: NDArray[np.float64], bins: int) -> float:
    """``I(A; B) / H(A, B)`` from a ``bins x bins`` joint histogram (0 if either is constant)."""
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    ia = _bin_indices(a.ravel(), bins)
    ib = _bin_indices(b.ravel(), bins)
    if ia is None or ib is None:
        # A constant image carries no information: I(A; B) = 0 whatever the other image is.
        return 0.0
    counts = np.bincount(ia * bins + ib, minlength=bins * bins).reshape(bins, bins)
    p_xy = counts / counts.sum()
    p_x = p_xy.sum(axis=1)
    p_y = p_xy.sum(axis=0)
    nz = p_xy > 0
    p_nz = p_xy[nz]
    joint_entropy = -float(np.sum(p_nz * np.log(p_nz)))
    if joint_entropy <= 0.0:
        return 0.0
    outer = np.outer(p_x, p_y)[nz]
    mi = float(np.sum(p_nz * np.log(p_nz / outer)))
    # Guard against tiny negative round-off and values a hair above 1.
    return min(max(mi / joint_entropy, 0.0), 1.0)


def mutual_information(a: ArrayLike, b: ArrayLike, bins: int = 256) -> float:
    """Normalised mutual information ``I(A; B) / H(A, B)`` of two images.

    The joint distribution is estimated from a ``bins x bins`` histogram in which each image is
    binned into ``bins`` equal bins over its own min..max range (the last bin includes the
    maximum, as in :func:`numpy.histogram2d`). Entropies use natural logarithms; the ratio does
    not depend on the base.

    Parameters
    ----------
    a, b : array_like
        Images of the same shape (any dimensionality).
    bins : int, optional
        Number of histogram bins per image (256 in the protocol).

    Returns
    -------
    float
        Value in ``[0, 1]``: 1 when each image determines the other (e.g. ``b`` is an
        increasing affine function of ``a``), near 0 for independent images. If either image
        is constant the mutual information is zero and 0.0 is returned (this includes two
        constant images, whose joint entropy is also zero).

    Raises
    ------
    ValueError
        If the shapes differ, the inputs are empty or not finite, or ``bins < 2``.

    Notes
    -----
    This differs from :func:`skimage.metrics.normalized_mutual_information`, which returns
    ``(H(A) + H(B)) / H(A, B)`` (in ``[1, 2]``); the two are related by
    ``mutual_information = skimage_nmi - 1``.
    """
    x, y = _pair(a, b)
    return _normalised_mi(x, y, int(bins))


def _l2_dct(image: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unnormalised DCT-II (all axes, DC included) of ``image / ||image||_2``."""
    norm = float(np.linalg.norm(image.ravel()))
    scaled = image / norm if norm > 0 else np.zeros_like(image)
    return scipy.fft.dctn(scaled, type=2, norm=None)


def spectral_mutual_information(a: ArrayLike, b: ArrayLike, bins: int = 256) -> float:
    """Spectral mutual information (SMI) of two images.

    Each image is divided by its L2 norm, transformed by the unnormalised DCT-II over all axes
    (``scipy.fft.dctn(x, type=2, norm=None)``, DC coefficient included), and the normalised
    mutual information of the two coefficient arrays is computed as in
    :func:`mutual_information`.

    Parameters
    ----------
    a, b : array_like
        Images of the same shape (any dimensionality).
    bins : int, optional
        Number of histogram bins per image (256 in the protocol).

    Returns
    -------
    float
        Value in ``[0, 1]``; 1 for identical images. An all-zero image has an all-zero (constant)
        spectrum and gives 0.0.

    Raises
    ------
    ValueError
        If the shapes differ, the inputs are empty or not finite, or ``bins < 2``.
    """
    x, y = _pair(a, b)
    return _normalised_mi(_l2_dct(x), _l2_dct(y), int(bins))


def all_metrics(
    reference: ArrayLike,
    image: ArrayLike,
    ssim_data_range: float = 1.0,
) -> dict[str, float]:
    """All protocol metrics of ``image`` against ``reference``, both clipped to [0, 1].

    Parameters
    ----------
    reference : array_like
        Ground-truth image, nominally in [0, 1].
    image : array_like
        Restored (or degraded) image, same shape.
    ssim_data_range : float, optional
        Data range used by SSIM (1.0 by default; the reference era used 2.0). PSNR always uses
        a data range of 1.

    Returns
    -------
    dict of str to float
        ``{"psnr": ..., "ssim": ..., "mi": ..., "smi": ...}``.
    """
    ref, img = _pair(reference, image)
    ref = np.clip(ref, 0.0, 1.0)
    img = np.clip(img, 0.0, 1.0)
    return {
        "psnr": psnr(ref, img, data_range=1.0),
        "ssim": ssim(ref, img, data_range=ssim_data_range),
        "mi": mutual_information(ref, img),
        "smi": spectral_mutual_information(ref, img),
    }
