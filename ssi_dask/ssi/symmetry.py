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

__all__ = ["psf_symmetries", "apply", "invert", "tta_transforms", "resolve_tta"]


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


def _signature(transform, ndim: int) -> bytes:
    """What a transform does to an asymmetric test array (equal signatures: same transform)."""
    probe = np.arange(3 * 4**ndim, dtype=np.int64)[: 4**ndim].reshape((4,) * ndim)
    probe = probe * 7 % 61  # no symmetry at all
    return np.ascontiguousarray(_apply_np(probe, *transform)).tobytes()


def tta_transforms(symmetries, n: int, ndim: int) -> list:
    """``n`` of the PSF's symmetries to average at test time, forming a subgroup.

    The transforms are taken as a chain of subgroups grown in this order of generators: the
    point reflection (every axis flipped), the swap of the lateral axes, a flip of the first
    axis, then the rest; so 2 transforms are the identity and the point reflection, 4 add the
    swap, and averaging stays symmetric (a subgroup) at every size. Fewer than ``n`` when the
    PSF has fewer symmetries.
    """
    symmetries = [(tuple(f), bool(w)) for f, w in symmetries] or [((), False)]
    by_sig = {_signature(t, ndim): t for t in symmetries}
    identity = _signature(((), False), ndim)
    if identity not in by_sig:
        by_sig[identity] = ((), False)

    def compose(a, b):  # a then b, as an element of the list (or None)
        probe = np.frombuffer(_signature(a, ndim), dtype=np.int64).reshape((4,) * ndim)
        return by_sig.get(np.ascontiguousarray(_apply_np(probe, *b)).tobytes())

    def closure(group: list) -> list | None:
        group = list(group)
        changed = True
        while changed:
            changed = False
            for a in list(group):
                for b in list(group):
                    c = compose(a, b)
                    if c is None:
                        return None
                    if c not in group:
                        group.append(c)
                        changed = True
        return group

    everything = tuple(range(-ndim, 0))
    preferred = [(everything, False), ((), True), ((-ndim,), False), ((-ndim,), True)]
    candidates = [t for t in preferred if t in symmetries]
    candidates += [t for t in symmetries if t not in candidates]
    group = [((), False)]
    for t in candidates:
        if len(group) >= n:
            break
        if t in group:
            continue
        grown = closure([*group, t])
        if grown is not None and len(grown) <= n:
            group = grown
    return group


def resolve_tta(tta, ndim: int) -> int:
    """The number of test-time transforms asked for: ``None`` -> the default for ``ndim``,
    True -> 16 (all), False -> 1, else one of 1, 2, 4, 8, 16."""
    from ..config import SSI_TTA_DEFAULTS, TTA_CHOICES, check_tta  # noqa: PLC0415

    if tta is None:
        return SSI_TTA_DEFAULTS[ndim]
    if tta is True:
        return max(TTA_CHOICES)
    if tta is False:
        return 1
    return check_tta(tta)
