"""The detector's clipping in the forward model: E[y | x] when the noisy signal is clipped.

A camera (or an export step) clips the noisy signal at its range: ``y = clip(h * x + n, lo, hi)``.
Where the blurred signal lies within a few noise standard deviations of a bound, the clipped
noise no longer averages to zero: a dark background of true value 0 under Gaussian noise of std
0.1 measures 0.04 on average. A forward model ``h * x`` fitted to such data in L2 reproduces
that bias in ``x`` (on the protocol images of METHOD.md, 20-35 % of the pixels are clipped at 0
and the bias is a fifth to a half of every method's squared error). With the noise's standard
deviation ``sigma(s)`` known, the expectation of the clipped measurement has a closed form,

``E[y | s] = lo Phi(a) + hi (1 - Phi(b)) + s (Phi(b) - Phi(a)) + sigma (phi(a) - phi(b))``,
``a = (lo - s) / sigma``, ``b = (hi - s) / sigma``,

smooth and differentiable in ``s``, so the network is trained to give the *unclipped* object
whose clipped, noisy measurement matches the data on average.

This module holds the pure parts: detecting the clip bounds from samples of the image (a pile-up
of values at the minimum or maximum), estimating the noise model ``sigma^2(s) = gain * s + floor``
(from blocks away from the bounds and from the clipped background itself), and the expectation
above in torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage, special

__all__ = ["ClippedSensor", "detect_clip_bounds", "estimate_noise_model"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def detect_clip_bounds(values: np.ndarray, min_fraction: float = 1e-3) -> tuple:
    """Clip bounds of an image from a sample of its values, ``(lower, upper)``, each or None.

    A bound is detected where at least ``min_fraction`` of the values sit exactly at the
    sample's minimum (maximum) and more of them than at the next distinct value: clipping piles
    the tail of the noise up on the bound, while an unclipped tail thins out towards it.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 100:
        return None, None
    bounds = []
    for sign in (1.0, -1.0):
        v = sign * values
        edge = v.min()
        at_edge = np.count_nonzero(v == edge)
        rest = v[v > edge]
        at_next = np.count_nonzero(rest == rest.min()) if rest.size else 0
        clipped = at_edge >= min_fraction * v.size and at_edge > 2 * at_next
        bounds.append(float(sign * edge) if clipped else None)
    return bounds[0], bounds[1]


def estimate_noise_model(
    patches: np.ndarray, lower=None, upper=None, block: int = 8
) -> tuple[float, float]:
    """Fit ``sigma^2(s) = gain * s + floor`` to an image's noise, from patches.

    The patches are cut into blocks of ``block`` pixels per axis, and each block gives a signal
    level and a noise variance in one of two ways:

    * a block away from the bounds (no clipped pixel in it or next to it): the noise of each
      pixel is its difference from the mean of its axis neighbours (the blurred signal is
      smooth, so this high-pass residual is noise; for white noise of variance ``v`` it has
      variance ``v (1 + 1 / (2 ndim))``); the block's variance is the median of the squared
      residuals over its chi-square median, so isolated outliers such as salt-and-pepper do
      not count;
    * a block that touches a bound with at least 30 % of its pixels unclipped (the clipped
      background, where the first way finds no block: on an image of sparse beads on black
      there is none of the first kind at all) is taken as flat signal plus censored noise: a
      probit regression of its sorted unclipped values (ranks 5-95 %) against the normal
      quantiles of their ranks gives the level (intercept) and the standard deviation
      (slope). Blocks whose clipped fraction disagrees with that fit hold an edge and are
      left out, and a trimmed median per bound drops the remaining edge blocks, whose sigma
      is larger (:func:`_flat_background_bin`).

    The first kind is binned by level (ten quantile bins), the second gives one bin per bound
    (measuring the noise where the clipping acts). The line is a least-squares fit through the
    bins' median variances, each bin weighted by its number of blocks, with ``gain >= 0``.

    Returns
    -------
    (gain, floor) : (float, float)
        In the units of ``patches``; ``floor > 0``.
    """
    patches = np.asarray(patches, dtype=np.float64)
    clipped = np.zeros(patches.shape, dtype=bool)
    if lower is not None:
        clipped |= patches <= lower
    if upper is not None:
        clipped |= patches >= upper
    residual = _residual_blocks(patches, clipped, block)
    bins = _level_bins(*residual[:2], 10)
    censored = [_censored_blocks(_blocks(p, block), lower, upper) for p in patches]
    if censored:
        level = np.concatenate([c[0] for c in censored])
        variance = np.concatenate([c[1] for c in censored])
        for bound, other in ((lower, upper), (upper, lower)):
            if bound is None:
                continue
            mine = np.ones(level.shape, dtype=bool)
            if other is not None:  # each block to its nearer bound
                mine = np.abs(level - bound) <= np.abs(level - other)
            bins += _flat_background_bin(level[mine], variance[mine], bound)
    if not bins:  # too little to fit: one variance for all levels
        return 0.0, residual[2]
    xs, ys, counts = (np.asarray(column, dtype=np.float64) for column in zip(*bins))
    gain = floor = -1.0
    if xs.size >= 2 and np.ptp(xs) > 0:
        gain, floor = np.polyfit(xs, ys, 1, w=np.sqrt(counts))
    if gain < 0:  # one level, or variance falling with the signal: a constant
        gain, floor = 0.0, float(np.average(ys, weights=counts))
    floor = max(float(floor), 1e-6 * max(float(np.median(ys)), 1e-12), 1e-12)
    return float(gain), floor


def _residual_blocks(
    patches: np.ndarray, clipped: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Level and variance of the blocks away from the bounds (high-pass residual), and the
    robust variance of all unclipped residuals (a fallback when there are too few blocks)."""
    nd = patches.ndim - 1
    kernel = np.zeros((3,) * nd)
    centre = (1,) * nd
    for ax in range(nd):
        for d in (0, 2):
            idx = list(centre)
            idx[ax] = d
            kernel[tuple(idx)] = -1.0 / (2 * nd)
    kernel[centre] = 1.0
    to_variance = 1.0 / (0.4549364 * (1.0 + 1.0 / (2 * nd)))  # chi-square median, stencil
    trim = (slice(1, -1),) * nd
    levels, variances, pooled = [], [], []
    for p, c in zip(patches, clipped):
        if min(p.shape) < 3:
            continue
        r = ndimage.convolve(p, kernel, mode="reflect")[trim]
        near = ndimage.maximum_filter(c, size=3)[trim]
        pooled.append(r[~near])
        if min(r.shape) < block:
            continue
        rb, nb, sb = (_blocks(a, block) for a in (r, near, p[trim]))
        ok = ~nb.any(axis=1)
        levels.append(sb[ok].mean(axis=1))
        variances.append(np.median(rb[ok] ** 2, axis=1) * to_variance)
    pool = np.concatenate(pooled) if pooled else np.zeros(0)
    if pool.size >= 2:
        fallback = float(np.median(pool**2)) * to_variance
    else:  # everything clipped or tiny: the variance of neighbour differences
        diffs = np.diff(patches.reshape(len(patches), -1), axis=1).ravel()
        fallback = float(np.var(diffs)) / 2 if diffs.size else 0.0
    empty = np.zeros(0)
    return (
        np.concatenate(levels) if levels else empty,
        np.concatenate(variances) if variances else empty,
        max(fallback, 1e-12),
    )


def _flat_background_bin(
    levels: np.ndarray, variances: np.ndarray, bound: float, min_count: int = 5, rounds: int = 3
):
    """One bin ``(level, variance, count)`` of the censored blocks at a bound, or none.

    Blocks with an edge in them fit a larger sigma than flat ones: starting from the median,
    each round keeps the blocks whose sigma is at most 1.5 times the current estimate and
    whose level lies within it of the bound, and takes their median again.
    """
    if levels.size < min_count:
        return []
    sigma = float(np.sqrt(np.median(variances)))
    keep = np.ones(levels.shape, dtype=bool)
    for _ in range(rounds):
        keep = (variances <= (1.5 * sigma) ** 2) & (np.abs(levels - bound) <= sigma)
        if keep.sum() < min_count:
            return []
        sigma = float(np.sqrt(np.median(variances[keep])))
    return [(float(np.median(levels[keep])), sigma**2, int(keep.sum()))]


def _level_bins(levels: np.ndarray, variances: np.ndarray, n_bins: int, min_count: int = 5):
    """``(median level, median variance, count)`` of up to ``n_bins`` quantile bins of level."""
    if levels.size < min_count:
        return []
    edges = np.quantile(levels, np.linspace(0, 1, n_bins + 1))
    bin_of = np.clip(np.searchsorted(edges, levels, side="right") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = bin_of == b
        if sel.sum() >= min_count:
            bins.append(
                (float(np.median(levels[sel])), float(np.median(variances[sel])), sel.sum())
            )
    return bins


def _censored_blocks(
    values: np.ndarray,
    lower=None,
    upper=None,
    min_free: float = 0.3,
    trim: float = 0.05,
    tolerance: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Level and noise variance of blocks that touch a clip bound (one block per row).

    Each block is taken as a constant level plus Gaussian noise, censored at the bounds: its
    unclipped values sorted by rank ``i`` (of ``n``) lie on ``level + sigma * z_i`` with
    ``z_i`` the normal quantile of ``(i + 0.5) / n``. A least-squares line through the ranks
    between ``trim`` and ``1 - trim`` (the extremes hold the outliers) gives both. Blocks with
    no clipped value, fewer than ``min_free`` unclipped, or too few ranks left are skipped, and
    so are blocks whose clipped fraction at either bound differs by more than ``tolerance``
    from the one the fitted level and sigma predict: they are not flat (an edge between a
    clipped region and a brighter one fits a large sigma, and on the protocol images such
    blocks doubled the estimate).
    """
    n = values.shape[1]
    at_lower = values <= lower if lower is not None else np.zeros(values.shape, dtype=bool)
    at_upper = values >= upper if upper is not None else np.zeros(values.shape, dtype=bool)
    clipped = at_lower | at_upper
    n_clipped = clipped.sum(axis=1)
    use = (n_clipped > 0) & (n_clipped <= (1 - min_free) * n)
    if not use.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(values[use], axis=1, kind="stable")
    sorted_values = np.take_along_axis(values[use], order, axis=1)
    free = ~np.take_along_axis(clipped[use], order, axis=1)
    ranks = np.arange(n)
    keep = free & (ranks >= round(trim * n)) & (ranks < n - round(trim * n))
    z = np.broadcast_to(special.ndtri((ranks + 0.5) / n), keep.shape)
    w = keep.astype(np.float64)
    count = w.sum(axis=1)
    enough = count >= max(8, n // 8)
    count = np.maximum(count, 1)
    z_mean = (w * z).sum(axis=1) / count
    y_mean = (w * sorted_values).sum(axis=1) / count
    dz = (z - z_mean[:, None]) * w
    sxx = (dz * dz).sum(axis=1)
    sxy = (dz * (sorted_values - y_mean[:, None])).sum(axis=1)
    valid = enough & (sxx > 0)
    sigma = np.where(valid, sxy / np.where(sxx > 0, sxx, 1), 0.0)
    valid &= sigma > 0
    level = y_mean - sigma * z_mean
    safe_sigma = np.where(valid, sigma, 1.0)
    if lower is not None:
        predicted = special.ndtr((lower - level) / safe_sigma)
        valid &= np.abs(at_lower[use].mean(axis=1) - predicted) <= tolerance
    if upper is not None:
        predicted = special.ndtr((level - upper) / safe_sigma)
        valid &= np.abs(at_upper[use].mean(axis=1) - predicted) <= tolerance
    return level[valid], sigma[valid] ** 2


def _blocks(a: np.ndarray, block: int) -> np.ndarray:
    """Non-overlapping cubes of side ``block`` of ``a`` (remainder dropped), one per row."""
    nd = a.ndim
    counts = tuple(n // block for n in a.shape)
    a = a[tuple(slice(0, n * block) for n in counts)]
    a = a.reshape([x for n in counts for x in (n, block)])
    a = a.transpose(tuple(range(0, 2 * nd, 2)) + tuple(range(1, 2 * nd, 2)))
    return a.reshape(-1, block**nd)


@dataclass(frozen=True)
class ClippedSensor:
    """Expected clipped measurement of a blurred signal (normalised units).

    Parameters
    ----------
    lower, upper : float or None
        Clip bounds (None: not clipped on that side).
    gain, floor : float
        Noise model ``sigma^2(s) = gain * s + floor``.
    """

    lower: float | None
    upper: float | None
    gain: float
    floor: float

    def expectation(self, s: torch.Tensor) -> torch.Tensor:
        """``E[clip(s + sigma(s) Z, lower, upper)]`` elementwise, differentiable in ``s``."""
        s = s.float()
        sigma = (self.gain * s + self.floor).clamp_min(self.floor * 1e-2).sqrt()
        out = s
        if self.lower is not None:
            a = (self.lower - s) / sigma
            pdf_a = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
            out = out + (self.lower - s) * torch.special.ndtr(a) + sigma * pdf_a
        if self.upper is not None:
            b = (self.upper - s) / sigma
            pdf_b = torch.exp(-0.5 * b * b) * _INV_SQRT_2PI
            out = out + (self.upper - s) * torch.special.ndtr(-b) - sigma * pdf_b
        return out

    def as_dict(self) -> dict:
        return asdict(self)
