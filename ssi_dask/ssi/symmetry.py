"""Symmetries of the PSF, used for training augmentation and test-time averaging.

If a flip (or a swap of the two lateral axes) leaves the PSF unchanged, the forward model is
unchanged too, so a flipped patch is an equally valid training sample and the average of the
network's predictions over these transforms (undone) is a valid, less noisy estimate: it cancels
orientation-specific artefacts in the PSF's null space (frequencies the loss cannot see).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = ["psf_symmetries", "apply", "invert"]


def _apply_np(a, flips, swap):
    for ax in flips:
        a = np.flip(a, axis=ax)
    if swap:
        a = np.swapaxes(a, -1, -2)
    return a


def psf_symmetries(psf, tol: float = 2e-3) -> list[tuple[tuple[int, ...], bool]]:
    """All (flip axes, swap lateral axes) transforms that leave ``psf`` unchanged (to ``tol``)."""
    psf = np.asarray(psf, dtype=np.float64)
    nd = psf.ndim
    out = []
    swaps = (False, True) if psf.shape[-1] == psf.shape[-2] else (False,)
    for k in range(nd + 1):
        for flips in itertools.combinations(range(-nd, 0), k):
            for swap in swaps:
                t = _apply_np(psf, flips, swap)
                if t.shape == psf.shape and np.abs(t - psf).max() <= tol * psf.max():
                    out.append((tuple(flips), swap))
    return out


def apply(x: torch.Tensor, transform) -> torch.Tensor:
    flips, swap = transform
    if flips:
        x = torch.flip(x, dims=tuple(flips))
    if swap:
        x = x.transpose(-1, -2)
    return x


def invert(x: torch.Tensor, transform) -> torch.Tensor:
    flips, swap = transform
    if swap:
        x = x.transpose(-1, -2)
    if flips:
        x = torch.flip(x, dims=tuple(flips))
    return x
